"""Make model cubes: render the distinct models of a grid once, and keep the default cube cached.

The default cube (``ModelGrid.default()``, the published DRE grid without its duplicate 180-degree
column) is generated into :func:`dre_hpc.paths.cache_dir` on first use. Its file name carries the
renderer version and a fingerprint of the grid, so a renderer or grid change makes a new file.
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path

from .. import __version__
from ..paths import cache_dir
from .cube_io import read_cube, write_cube
from .grid import ModelGrid
from .sersic import ATOL, RENDERER_VERSION, RTOL, render_grid

log = logging.getLogger(__name__)


def generator_cards() -> list:
    """Header cards naming the generator and the renderer settings."""
    return [
        ("GENERATR", f"dre_hpc {__version__}", "program that rendered the models"),
        ("RENDERV", RENDERER_VERSION, "dre_hpc Sersic renderer version"),
        ("RENDRTOL", RTOL, "pixel integral: relative error budget"),
        ("RENDATOL", ATOL, "pixel integral: absolute budget per px^2"),
    ]


def make_cube(grid: ModelGrid):
    """Render every model of ``grid``, each distinct model once.

    Returns
    -------
    cube : ndarray of float32, shape ``grid.shape + (boxsize, boxsize)``
    grid : ModelGrid
    """
    representatives, inverse = grid.unique_models()
    start = time.perf_counter()
    stamps = render_grid(grid, representatives)
    log.info("rendered %d distinct models of %d (%dx%d px) in %.1f s", representatives.size,
             grid.size, grid.boxsize, grid.boxsize, time.perf_counter() - start)
    cube = stamps[inverse].reshape(grid.shape + (grid.boxsize, grid.boxsize))
    return cube, grid


def default_cube_path() -> Path:
    """Cache path of the default cube; the name holds the renderer version and a grid fingerprint."""
    cards = repr(ModelGrid.default().to_header_cards()).encode()
    fingerprint = hashlib.sha1(cards).hexdigest()[:8]
    return cache_dir() / f"dre_default_cube_r{RENDERER_VERSION}_{fingerprint}.fits"


def ensure_default_cube() -> Path:
    """Path of the default cube, generating it on first use.

    Concurrent first uses each render and then atomically rename a complete file into place, so a
    reader never sees a partial cube.
    """
    path = default_cube_path()
    if path.is_file():
        return path
    grid = ModelGrid.default()
    log.info("generating the default model cube (%d models) into %s", grid.size, path)
    cube, grid = make_cube(grid)
    write_cube(path, cube, grid, overwrite=True, extra_cards=generator_cards())
    log.info("wrote %s (%.0f MB)", path, path.stat().st_size / 1e6)
    return path


def load_default_cube():
    """The default cube and its grid, generating the file on first use: ``(cube, grid)``."""
    return read_cube(ensure_default_cube())
