"""Sub-grid refinement (`dre_hpc.fit.subgrid`): exact on quadratic surfaces, honest flags, and
better than the grid on simulated galaxies.

The synthetic surfaces are chi-squares defined on the real grids (the default n = 4 grid and the
``sersic`` preset's) from a known vertex and Hessian; for them the central-difference quadratic is
exact, so vertex, covariance and flux must come back to rounding. The last test fits GalSim
galaxies (S/N 50-200, continuous parameters) with the default cube and compares with truth.
"""

from __future__ import annotations

import numpy as np
import pytest

from dre_hpc.fit.engine import FitOptions, fit_cutouts
from dre_hpc.fit.subgrid import UNIFORM_ANGLE_ERR, refine, refined_axes, second_minimum
from dre_hpc.flags import FitFlag
from dre_hpc.models.generate import sersic_grid
from dre_hpc.models.grid import ModelGrid
from dre_hpc.sim.match import angle_distance


def _coords(grid):
    """(cells, 4) parameter values of every cell of the full grid."""
    mesh = np.meshgrid(*(a.values for a in grid.axes), indexing="ij")
    return np.stack([m.ravel() for m in mesh], axis=1)


def _surface(grid, vertex, hess, angle_period=180.0):
    """chi2 = 10 + 1/2 (x - v)^T H (x - v) over the grid (x in parameter units, the angle
    difference wrapped to +-90 degrees) and ln(amp) = 5 + 0.3 (logr - v_logr)."""
    x = _coords(grid)
    dx = x - np.asarray(vertex)
    dx[:, 2] = (dx[:, 2] + angle_period / 2) % angle_period - angle_period / 2
    chi2 = 10.0 + 0.5 * np.einsum("ci,ij,cj->c", dx, hess, dx)
    amp = np.exp(5.0 + 0.3 * dx[:, 3])
    return chi2, amp


def _run(grid, chi2, amp, best=None, reduced=1.0):
    """refine() on one object whose full-grid surfaces are `chi2` and `amp`."""
    best = int(np.argmin(chi2)) if best is None else best

    def fetch(cells, rows):
        return chi2[cells].astype(np.float64), amp[cells].astype(np.float64)

    values = {k: np.atleast_1d(v) for k, v in grid.parameters(np.array([best])).items()}
    return refine(grid, values, np.array([best]), fetch, np.array([amp[best]]),
                  np.array([0.01 * amp[best]]), np.array([reduced]))


def _hessian(sigmas, corr=0.3):
    """A Hessian 2 C^-1 for the covariance C of the given sigmas, neighbours correlated."""
    d = len(sigmas)
    c = np.eye(d) + corr * (np.eye(d, k=1) + np.eye(d, k=-1))
    cov = c * np.outer(sigmas, sigmas)
    return 2 * np.linalg.inv(cov), cov


@pytest.mark.parametrize("grid_name", ["default", "sersic"])
def test_quadratic_surface_is_recovered_exactly(grid_name):
    grid = ModelGrid.default() if grid_name == "default" else sersic_grid()
    vertex = [4.0 if grid_name == "default" else 2.3, 0.43, 52.0, 0.61]
    sig = np.array([0.3, 0.05, 6.0, 0.04])
    if grid_name == "default":
        hess3, cov3 = _hessian(sig[1:])
        hess, cov = np.zeros((4, 4)), np.zeros((4, 4))
        hess[1:, 1:], cov[1:, 1:] = hess3, cov3
    else:
        hess, cov = _hessian(sig)
    chi2, amp = _surface(grid, vertex, hess)
    out = _run(grid, chi2, amp)
    assert out["FLAGS"][0] == 0
    names = ("INDEX", "AX_RATIO", "ANGLE", "LOGR")
    for i in (refined_axes(grid)):
        assert out[f"{names[i]}_FIT"][0] == pytest.approx(vertex[i], abs=1e-9)
        assert out[f"{names[i]}_FIT_ERR"][0] == pytest.approx(np.sqrt(cov[i, i]), rel=1e-9)
    assert out["FLUX_FIT"][0] == pytest.approx(np.exp(5.0), rel=1e-9)
    if grid_name == "default":                       # a one-value axis keeps its value, no error
        assert out["INDEX_FIT"][0] == 4.0 and np.isnan(out["INDEX_FIT_ERR"][0])


def test_reduced_chi2_above_one_inflates_the_errors():
    grid = ModelGrid.default()
    hess = np.diag([0.0, 2 / 0.05 ** 2, 2 / 6.0 ** 2, 2 / 0.04 ** 2])
    chi2, amp = _surface(grid, [4.0, 0.43, 52.0, 0.61], hess)
    plain, inflated = _run(grid, chi2, amp, reduced=0.8), _run(grid, chi2, amp, reduced=4.0)
    assert plain["LOGR_FIT_ERR"][0] == pytest.approx(0.04, rel=1e-9)
    assert inflated["LOGR_FIT_ERR"][0] == pytest.approx(0.08, rel=1e-9)


def test_angle_wraps_around_180_degrees():
    grid = ModelGrid.default()
    hess = np.diag([0.0, 2 / 0.05 ** 2, 2 / 5.0 ** 2, 2 / 0.04 ** 2])
    chi2, amp = _surface(grid, [4.0, 0.43, 177.0, 0.61], hess)
    out = _run(grid, chi2, amp)
    assert out["FLAGS"][0] == 0
    assert out["ANGLE_FIT"][0] == pytest.approx(177.0, abs=1e-9)


def test_round_galaxy_keeps_the_grid_angle():
    """No curvature along the angle: the rest is refined, the angle gets a uniform spread."""
    grid = ModelGrid.default()
    hess = np.diag([0.0, 2 / 0.05 ** 2, 0.0, 2 / 0.04 ** 2])
    chi2, amp = _surface(grid, [4.0, 0.93, 30.0, 0.61], hess)
    out = _run(grid, chi2, amp)
    assert out["FLAGS"][0] == 0
    assert out["AX_RATIO_FIT"][0] == pytest.approx(0.93, abs=1e-9)
    assert out["LOGR_FIT"][0] == pytest.approx(0.61, abs=1e-9)
    assert out["ANGLE_FIT_ERR"][0] == pytest.approx(UNIFORM_ANGLE_ERR)
    assert out["ANGLE_FIT"][0] in grid.angle.values


def test_no_minimum_is_flagged_and_keeps_the_grid_values():
    grid = ModelGrid.default()
    chi2, amp = _surface(grid, [4.0, 0.43, 52.0, 0.61], np.diag([0.0, -50.0, -0.01, -400.0]))
    best = int(np.argmin(chi2))
    out = _run(grid, chi2, amp, best=best)
    assert out["FLAGS"][0] & FitFlag.REFINE_FAILED
    values = grid.parameters(np.array([best]))
    for name in ("AX_RATIO", "ANGLE", "LOGR"):
        assert out[f"{name}_FIT"][0] == pytest.approx(values[name][0])
        assert np.isnan(out[f"{name}_FIT_ERR"][0])


def test_vertex_far_from_the_grid_best_is_flagged():
    """A best cell two radius steps from the vertex (as a noisy surface could give): the Newton
    step on the grid still finds the vertex, and the flag says it moved."""
    grid = ModelGrid.default()
    hess = np.diag([0.0, 2 / 0.05 ** 2, 2 / 6.0 ** 2, 2 / 0.1 ** 2])
    chi2, amp = _surface(grid, [4.0, 0.43, 52.0, 0.61], hess)
    idx = list(np.unravel_index(int(np.argmin(chi2)), grid.shape))
    idx[3] -= 2
    out = _run(grid, chi2, amp, best=int(np.ravel_multi_index(idx, grid.shape)))
    assert out["FLAGS"][0] & FitFlag.REFINE_FAR
    assert out["LOGR_FIT"][0] == pytest.approx(0.61, abs=1e-9)


@pytest.mark.parametrize("depth,flagged", [(0.5, True), (3.0, False)])
def test_second_minimum_within_one_delta_chi2(depth, flagged):
    grid = ModelGrid.default()
    x = _coords(grid)
    well = lambda centre: ((x[:, 1] - centre[0]) / 0.05) ** 2 + ((x[:, 3] - centre[1]) / 0.05) ** 2
    chi2 = np.minimum(well((0.3, 0.2)), well((0.8, 1.0)) + depth) + 1e-3 * (x[:, 2] / 15.0) ** 2
    best = int(np.argmin(chi2))
    found = second_minimum(grid, chi2[None, :], np.array([best]), np.arange(grid.size))
    assert bool(found[0]) is flagged


@pytest.mark.slow
def test_refined_parameters_beat_the_grid_on_simulated_galaxies(default_models, sim_galaxies):
    """n = 4 GalSim galaxies with continuous b/a, angle and radius: the refined radius, b/a and
    angle scatter less than the grid's best cell, without a bias larger than a tenth of a step."""
    cuts, truth, psf = sim_galaxies
    res = fit_cutouts(default_models.for_psf(psf), cuts, FitOptions())
    clean = (res["FLAGS"] & int(FitFlag.REFINE_FAILED | FitFlag.FIT_FAILED)) == 0
    assert clean.mean() > 0.95

    def disp(err):
        return np.percentile(np.abs(err - np.median(err)), 68)

    for name, step in (("LOGR", 0.12), ("AX_RATIO", 0.1)):
        grid_err = (res[name] - truth[name])[clean]
        fit_err = (res[f"{name}_FIT"] - truth[name])[clean]
        assert disp(fit_err) < 0.7 * disp(grid_err), (name, disp(fit_err), disp(grid_err))
        assert abs(np.median(fit_err)) < 0.1 * step, (name, np.median(fit_err))
    elongated = clean & (truth["AX_RATIO"] < 0.7)
    assert np.percentile(angle_distance(res["ANGLE_FIT"], truth["ANGLE"])[elongated], 68) < 3.0
    assert np.all(res["LOGR_FIT_ERR"][clean] > 0) and np.all(res["FLUX_FIT_ERR"][clean] > 0)
