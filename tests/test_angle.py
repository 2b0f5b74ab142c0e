"""The sub-grid angle by cubic interpolation along the angle (`fit.angle`)."""

from __future__ import annotations

import numpy as np
import pytest

from dre_hpc.fit import engine
from dre_hpc.fit.angle import NODES, cubic_weights
from dre_hpc.fit.engine import FitOptions
from dre_hpc.io.cuts import CutoutSet, empty_objects
from dre_hpc.preprocess.neighbours import object_models
from dre_hpc.sim.cutouts import SimSpec, draw_psf


def test_cubic_weights_reproduce_cubics():
    s = np.linspace(-0.5, 1.5, 9)
    w = cubic_weights(s)
    assert np.allclose(w.sum(axis=1), 1.0)
    for power in range(4):
        assert np.allclose(w @ NODES ** power, s ** power)
    assert np.allclose(cubic_weights(NODES), np.eye(4))


def _elongated(grid, psf, angles):
    """Noiseless cutouts of n = 4, b/a 0.3 galaxies drawn with the fit's own renderer at `angles`
    (between the grid's), radius and b/a on grid nodes: the only error left is the interpolation."""
    n = len(angles)
    params = {"INDEX_FIT": np.full(n, 4.0), "AX_RATIO_FIT": np.full(n, 0.3), "ANGLE_FIT": np.asarray(angles),
              "LOGR_FIT": np.full(n, grid.axes[3].values[12]), "FLUX_FIT": np.full(n, 1e4),
              "dx": np.zeros(n), "dy": np.zeros(n)}
    data = object_models(params, np.arange(n), psf, True, grid.boxsize)
    sigma = float(data.max()) / 3e4
    objects = empty_objects(n)
    objects["NUMBER"] = np.arange(1, n + 1)
    objects["DX"] = objects["DY"] = 0.0
    cuts = CutoutSet(data, data > 30 * sigma, np.full_like(data, sigma), objects, "simulated")
    cuts.names = [f"00_{k:04d}" for k in objects["NUMBER"]]
    return cuts


def test_angles_between_the_grids_come_back(default_models, monkeypatch):
    """Noiseless galaxies 0.2-0.45 of a 15-degree step from a grid angle: the cubic interpolation
    finds their angles within 0.1 degrees; the quadratic one alone (the polish switched off)
    overshoots by 0.2 degrees or more (towards the middle of the step)."""
    psf = draw_psf(SimSpec())
    mm = default_models.for_psf(psf)
    grid = mm.grid
    assert grid.axes[2].name == "ANGLE" and grid.axes[2].step == 15.0
    truth = np.array([33.0, 36.0, 39.0, 41.5, 96.0, 98.5, 142.0, 144.0])
    cuts = _elongated(grid, psf, truth)
    options = FitOptions().for_grid(grid)
    polished = engine.fit_cutouts(mm, cuts, options)["ANGLE_FIT"]
    monkeypatch.setattr(engine, "polish", lambda *a, **k: (np.zeros(0, np.int64), np.zeros(0)))
    quadratic = engine.fit_cutouts(mm, cuts, options)["ANGLE_FIT"]
    wrap = lambda a: (a - truth + 90.0) % 180.0 - 90.0
    assert np.abs(wrap(polished)).max() < 0.1, wrap(polished)
    assert np.median(np.abs(wrap(quadratic))) > 0.2, wrap(quadratic)
