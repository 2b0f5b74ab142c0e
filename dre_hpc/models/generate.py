"""Make model cubes: render the distinct models of a grid once, and keep the preset cubes cached.

Two presets are generated into :func:`dre_hpc.paths.cache_dir` on first use (:func:`ensure_cube`):

* ``bulge`` (the default): ``ModelGrid.default()``, the published DRE grid (n = 4 only) without its
  duplicate 180-degree column: 2,520 models, 2,289 distinct, about 165 MB;
* ``sersic``: :func:`sersic_grid`, the same q, angle and radius axes for n = 0.5, 1.0, ..., 6.0:
  30,240 models, 27,468 distinct, about 2 GB.

A cache file's name carries the renderer version and a fingerprint of the grid, so a renderer or
grid change makes a new file. :func:`resolve_model` turns a preset name or a file name into the
path of a cube.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from pathlib import Path

import numpy as np

from .. import __version__
from ..errors import InputError
from ..paths import cache_dir
from .cube_io import read_cube, write_cube
from .grid import Axis, ModelGrid
from .sersic import ATOL, RENDERER_VERSION, RTOL, render_units

log = logging.getLogger(__name__)

#: Sersic-index axis of the ``sersic`` preset: n = 0.5 (Gaussian), 1 (exponential disc), ... 4 (de
#: Vaucouleurs), ... 6. Step 0.5 is finer than a fit can tell n apart at the usual S/N (an
#: uncertainty of a few tenths, more for n > 4) and covers the observed range of discs to giant
#: ellipticals; it keeps the integer indices exactly on the grid.
SERSIC_INDEX_AXIS = Axis("INDEX", 0.5, 0.5, 12)
PRESETS = ("bulge", "sersic")
DEFAULT_PRESET = "bulge"


def generator_cards() -> list:
    """Header cards naming the generator and the renderer settings."""
    return [
        ("GENERATR", f"dre_hpc {__version__}", "program that rendered the models"),
        ("RENDERV", RENDERER_VERSION, "dre_hpc Sersic renderer version"),
        ("RENDRTOL", RTOL, "pixel integral: relative error budget"),
        ("RENDATOL", ATOL, "pixel integral: absolute budget per px^2"),
    ]


def sersic_grid() -> ModelGrid:
    """The ``sersic`` preset: the default grid's q, angle and radius axes for n = 0.5..6 step 0.5."""
    default = ModelGrid.default()
    return ModelGrid(SERSIC_INDEX_AXIS, default.ax_ratio, default.angle, default.logr,
                     boxsize=default.boxsize, has_index_axis=True)


def preset_grid(name: str) -> ModelGrid:
    """The grid of a preset (``'bulge'`` or ``'sersic'``)."""
    if name == "bulge":
        return ModelGrid.default()
    if name == "sersic":
        return sersic_grid()
    raise InputError(f"unknown model preset {name!r}: presets are 'bulge' and 'sersic'")


def make_cube(grid: ModelGrid, workers=None):
    """Render every model of ``grid``, each distinct model once.

    Parameters
    ----------
    grid : ModelGrid
    workers : int or None
        Processes rendering at once (None: `dre_hpc.models.sersic.default_workers`, the usable
        CPUs up to 8); the cube is the same, bit for bit, whatever the number.

    Returns
    -------
    cube : ndarray of float32, shape ``grid.shape + (boxsize, boxsize)``
        A view of one array in the on-disk tile layout (so `write_cube` writes it without a copy);
        it is not C-contiguous.
    grid : ModelGrid
    """
    representatives, inverse = grid.unique_models()
    nn, nq, na, nr = grid.shape
    box = grid.boxsize
    tiles = np.empty((nn, nq, na * box, nr * box), dtype=np.float32)
    cube = tiles.reshape(nn, nq, na, box, nr, box).swapaxes(3, 4)
    # the cells of each distinct model: cells[first[k]:first[k + 1]]
    cells = np.argsort(inverse, kind="stable")
    first = np.searchsorted(inverse[cells], np.arange(representatives.size + 1))

    def store(models, stamps):
        counts = first[models + 1] - first[models]
        offsets = np.repeat(first[models] - np.cumsum(counts) + counts, counts)
        targets = cells[offsets + np.arange(counts.sum())]
        cube[np.unravel_index(targets, grid.shape)] = np.repeat(stamps, counts, axis=0)

    par = grid.parameters(representatives)
    start = time.perf_counter()
    render_units(par["INDEX"], par["AX_RATIO"], par["ANGLE"], 10.0 ** par["LOGR"], box, store,
                 workers=workers)
    log.info("rendered %d distinct models of %d (%dx%d px) in %.1f s", representatives.size,
             grid.size, box, box, time.perf_counter() - start)
    return cube, grid


def cube_path(grid: ModelGrid, name: str) -> Path:
    """Cache path of a generated cube: ``dre_<name>_cube_r<renderer version>_<grid fingerprint>.fits``."""
    fingerprint = hashlib.sha1(repr(grid.to_header_cards()).encode()).hexdigest()[:8]
    return cache_dir() / f"dre_{name}_cube_r{RENDERER_VERSION}_{fingerprint}.fits"


def default_cube_path() -> Path:
    """Cache path of the default cube; the name holds the renderer version and a grid fingerprint."""
    return preset_path(DEFAULT_PRESET)


def preset_path(name: str) -> Path:
    """Cache path of a preset's cube (``'bulge'`` or ``'sersic'``), whether it exists or not."""
    return cube_path(preset_grid(name), _cache_name(name))


def _cache_name(preset: str) -> str:
    """The file-name part of a preset's cached cube (the ``bulge`` cube is the historical 'default')."""
    return "default" if preset == "bulge" else preset


def ensure_cube(grid: ModelGrid, name: str, workers=None) -> Path:
    """Path of the cached cube of ``grid`` (file name part ``name``), generating it on first use.

    The cube is written to a temporary file and renamed into place, so a reader never sees a partial
    cube. Concurrent first uses (several jobs sharing a cache) wait for one another on a lock file
    where the file system supports locks, so the cube is rendered once; where it does not, each
    renders and the last rename wins (the files are identical).
    """
    path = cube_path(grid, name)
    if path.is_file():
        return path
    with _cache_lock(path):
        if path.is_file():  # another process made it while we waited
            return path
        log.info("generating the %s model cube (%d models) into %s", name, grid.size, path)
        cube, grid = make_cube(grid, workers=workers)
        write_cube(path, cube, grid, overwrite=True, extra_cards=generator_cards())
        del cube
        log.info("wrote %s (%.0f MB)", path, path.stat().st_size / 1e6)
    return path


def ensure_default_cube() -> Path:
    """Path of the default (``bulge``) cube, generating it on first use (see `ensure_cube`)."""
    return ensure_preset(DEFAULT_PRESET)


def ensure_preset(name: str, workers=None) -> Path:
    """Path of a preset's cached cube (``'bulge'`` or ``'sersic'``), generating it on first use."""
    return ensure_cube(preset_grid(name), _cache_name(name), workers=workers)


def resolve_model(name_or_path=None) -> Path:
    """The cube file a model option names.

    Parameters
    ----------
    name_or_path : str, os.PathLike or None
        None, ``''`` or ``'bulge'``: the default cube (n = 4); ``'sersic'``: the cube with the
        Sersic-index axis n = 0.5..6; both are generated into the cache on first use. Anything
        else is the path of a cube file (write ``./sersic`` for a file of that name).

    Raises
    ------
    InputError
        The path does not name an existing file.
    """
    if name_or_path is None or (isinstance(name_or_path, str) and name_or_path in ("",) + PRESETS):
        return ensure_preset(name_or_path or DEFAULT_PRESET)
    path = Path(name_or_path).expanduser()
    if not path.is_file():
        why = "is not a file" if path.exists() else "not found"
        raise InputError(f"model cube {str(name_or_path)!r} {why}; give a cube file or a preset "
                         f"(presets are 'bulge' and 'sersic')")
    return path


def load_default_cube():
    """The default cube and its grid, generating the file on first use: ``(cube, grid)``."""
    return read_cube(ensure_default_cube())


@contextlib.contextmanager
def _cache_lock(path: Path):
    """An exclusive lock on ``.<name>.lock`` beside ``path``; no lock where locks do not work."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    lock_path = path.with_name(f".{path.name}.lock")
    try:
        handle = open(lock_path, "a+b")
    except OSError as exc:
        log.warning("cannot open lock file %s (%s); generating without a lock", lock_path, exc)
        yield
        return
    with handle:
        try:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info("waiting for another process generating %s", path)
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        except OSError as exc:  # e.g. ENOLCK on a file system without locks: still correct
            log.warning("cannot lock %s (%s); generating without a lock", lock_path, exc)
        yield
