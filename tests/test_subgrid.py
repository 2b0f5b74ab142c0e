"""Sub-grid refinement (`dre_hpc.fit.subgrid`): exact where the models are quadratic in the grid's
coordinates, honest flags, and better than the grid on simulated galaxies.

The synthetic model sets are random pixel vectors that vary with each cell's grid coordinates as a
quadratic polynomial (cross terms included), on the real grids (the default n = 4 grid and the
``sersic`` preset's): quadratic Lagrange interpolation between the window's models reproduces them
exactly, so noiseless data give back the parameters and the flux to rounding, and the errors equal
the Fisher matrix's (J^T W J)^-1 of the same model. The last test fits GalSim galaxies (S/N 50-200,
continuous parameters) with the default cube and compares with truth.
"""

from __future__ import annotations

import numpy as np
import pytest

from dre_hpc.fit import subgrid
from dre_hpc.fit.engine import FitOptions, fit_cutouts
from dre_hpc.fit.subgrid import (SYSTEMATIC, UNIFORM_ANGLE_ERR, refine, refined_axes, second_minimum, window,
                                 window_products)
from dre_hpc.flags import FitFlag
from dre_hpc.models.generate import sersic_grid
from dre_hpc.models.grid import ModelGrid
from dre_hpc.sim.match import angle_distance

N_PIX = 60
SIGMA = 0.05


def _coords(grid):
    """(cells, 4) grid indices of every cell of the full grid."""
    mesh = np.meshgrid(*(np.arange(a.count, dtype=float) for a in grid.axes), indexing="ij")
    return np.stack([m.ravel() for m in mesh], axis=1)


class QuadraticModels:
    """Pixel vectors m(x) = base + sum_j x_j A_j + sum_{j<=k} x_j x_k B_jk of grid coordinates x
    (indices, on the refined axes; ``flat`` axes left out), scaled to unit sum at the centre."""

    def __init__(self, grid, seed=3, flat=()):
        rng = np.random.default_rng(seed)
        self.grid, self.axes = grid, [i for i in refined_axes(grid) if grid.axes[i].name not in flat]
        d = len(self.axes)
        self.base = 10 + rng.random(N_PIX)
        self.lin = rng.normal(0, 1.0, (d, N_PIX))
        self.quad = {(j, k): rng.normal(0, 0.05, N_PIX) for j in range(d) for k in range(j, d)}

    def at(self, x):
        """(..., P) models at grid coordinates x (..., 4)."""
        x = np.asarray(x, float)[..., self.axes] - np.array([self.grid.axes[i].count / 2 for i in self.axes])
        m = self.base + np.einsum("...j,jp->...p", x, self.lin)
        for (j, k), b in self.quad.items():
            m = m + (x[..., j] * x[..., k])[..., None] * b
        return m / 1000.0

    def matrix(self):
        return np.ascontiguousarray(self.at(_coords(self.grid)).T.astype(np.float32))   # (P, K)


def _refine(grid, models, data, best_idx, weight=1 / SIGMA ** 2, var_b=None, reduced_chi2=1.0):
    """refine() of one object: window products from `models` (P, K), every cell its own model;
    ``var_b``: the variance of the sky level (None: no background term)."""
    best_full = np.array([np.ravel_multi_index(tuple(best_idx), grid.shape)])
    cells, centre = window(grid, np.array([best_idx]))
    d = data[None, :].astype(np.float32)
    w = np.full_like(d, weight)
    b, gram, u = window_products(np, models, d, w, cells)
    c_total = (w.astype(float) * d * d).sum(axis=1)
    values = {k: np.atleast_1d(v) for k, v in grid.parameters(best_full).items()}
    background = None if var_b is None else (u, w.sum(axis=1, dtype=float), np.array([var_b]),
                                              (w.astype(float) * d).sum(axis=1))
    return refine(grid, values, best_full, centre, b, gram, c_total, np.ones(1), np.array([1.0]),
                  np.array([0.1]), np.array([reduced_chi2]), background)


def _fisher_errors(qm, x_true, amp):
    """1-sigma errors (parameter units; flux last) from (J^T W J)^-1 of a m(x) at x_true."""
    cols = []
    for i in qm.axes:
        dx = np.zeros(4)
        dx[i] = 1e-5
        cols.append(amp * (qm.at(x_true + dx) - qm.at(x_true - dx)) / 2e-5)
    cols.append(qm.at(x_true))
    jac = np.stack(cols, 1)
    cov = np.linalg.inv(jac.T @ jac / SIGMA ** 2)
    steps = [qm.grid.axes[i].step for i in qm.axes] + [1.0]
    return np.sqrt(np.diag(cov)) * np.array(steps)


@pytest.mark.parametrize("grid_name", ["default", "sersic"])
def test_quadratic_models_are_recovered_exactly(grid_name):
    grid = ModelGrid.default() if grid_name == "default" else sersic_grid()
    qm = QuadraticModels(grid)
    x_true = np.array([0.0 if grid_name == "default" else 5.37, 4.3, 5.4, 10.6])
    data = 3.0 * qm.at(x_true)
    out = _refine(grid, qm.matrix(), data, np.rint(x_true).astype(int))
    assert out["FLAGS"][0] == 0
    errors = _fisher_errors(qm, x_true, 3.0)
    for j, i in enumerate(qm.axes):
        a = grid.axes[i]
        value = a.start + x_true[i] * a.step
        floor = SYSTEMATIC[a.name] * (value if a.name == "INDEX" else 1.0)
        assert out[f"{a.name}_FIT"][0] == pytest.approx(value, abs=1e-4 * a.step)
        assert out[f"{a.name}_FIT_ERR"][0] == pytest.approx(np.hypot(errors[j], floor), rel=1e-3)
    assert out["FLUX_FIT"][0] == pytest.approx(3.0, rel=1e-5)
    assert out["FLUX_FIT_ERR"][0] == pytest.approx(np.hypot(errors[-1], 3.0 * SYSTEMATIC["FLUX"]), rel=1e-3)
    if grid_name == "default":                       # a one-value axis keeps its value, no error
        assert out["INDEX_FIT"][0] == 4.0 and np.isnan(out["INDEX_FIT_ERR"][0])


def test_a_poor_fit_widens_every_error_but_the_angles():
    """A reduced chi-square of 4 doubles the statistical errors of the index, b/a, radius and flux;
    the angle's stays that of the Fisher matrix (`refine`: the excess comes from the core, the
    angle's information from the outskirts); the values do not move."""
    grid = sersic_grid()
    qm = QuadraticModels(grid)
    x_true = np.array([5.37, 4.3, 5.4, 10.6])
    data = 3.0 * qm.at(x_true)
    good = _refine(grid, qm.matrix(), data, np.rint(x_true).astype(int))
    poor = _refine(grid, qm.matrix(), data, np.rint(x_true).astype(int), reduced_chi2=4.0)
    errors = _fisher_errors(qm, x_true, 3.0)
    for j, i in enumerate(qm.axes):
        a = grid.axes[i]
        floor = SYSTEMATIC[a.name] * ((a.start + x_true[i] * a.step) if a.name == "INDEX" else 1.0)
        want = errors[j] if a.name == "ANGLE" else 2.0 * errors[j]
        assert poor[f"{a.name}_FIT_ERR"][0] == pytest.approx(np.hypot(want, floor), rel=1e-3), a.name
        assert poor[f"{a.name}_FIT"][0] == good[f"{a.name}_FIT"][0]
    assert poor["FLUX_FIT_ERR"][0] == pytest.approx(np.hypot(2.0 * errors[-1], 3.0 * SYSTEMATIC["FLUX"]), rel=1e-3)


def test_background_level_enters_the_errors_as_a_nuisance():
    """With the sky level's variance given, the errors are those of the Fisher matrix of
    ``a m(x) + c`` with a Gaussian prior on c, marginalised over c: larger than without it for the
    flux (a raised sky mimics flux), equal to them when the variance is 0. Data without a sky
    level: the values are those without the background term."""
    grid = sersic_grid()
    qm = QuadraticModels(grid)
    x_true = np.array([5.37, 4.3, 5.4, 10.6])
    data = 3.0 * qm.at(x_true)
    var_b = (0.4 * SIGMA) ** 2
    plain = _refine(grid, qm.matrix(), data, np.rint(x_true).astype(int))
    with_sky = _refine(grid, qm.matrix(), data, np.rint(x_true).astype(int), var_b=var_b)
    zero = _refine(grid, qm.matrix(), data, np.rint(x_true).astype(int), var_b=0.0)
    cols = []
    for i in qm.axes:
        dx = np.zeros(4)
        dx[i] = 1e-5
        cols.append(3.0 * (qm.at(x_true + dx) - qm.at(x_true - dx)) / 2e-5)
    jac = np.stack(cols + [qm.at(x_true), np.ones(N_PIX)], 1)
    fisher = jac.T @ jac / SIGMA ** 2
    fisher[-1, -1] += 1 / var_b
    errors = np.sqrt(np.diag(np.linalg.inv(fisher)))[:-1] * np.array([grid.axes[i].step for i in qm.axes] + [1.0])
    for j, i in enumerate(qm.axes):
        a = grid.axes[i]
        floor = SYSTEMATIC[a.name] * (with_sky[f"{a.name}_FIT"][0] if a.name == "INDEX" else 1.0)
        assert with_sky[f"{a.name}_FIT"][0] == pytest.approx(plain[f"{a.name}_FIT"][0], abs=1e-4 * a.step)
        assert with_sky[f"{a.name}_FIT_ERR"][0] == pytest.approx(np.hypot(errors[j], floor), rel=1e-3)
        assert zero[f"{a.name}_FIT_ERR"][0] == pytest.approx(plain[f"{a.name}_FIT_ERR"][0], rel=1e-9)
    flux_err = np.hypot(errors[-1], 3.0 * SYSTEMATIC["FLUX"])
    assert with_sky["FLUX_FIT_ERR"][0] == pytest.approx(flux_err, rel=1e-3)
    assert with_sky["FLUX_FIT_ERR"][0] > 1.5 * plain["FLUX_FIT_ERR"][0]


def test_without_a_minimum_with_the_sky_level_the_fit_goes_on_without_it(monkeypatch):
    """Where the products with the level profiled out give no minimum (here made so: a negated
    Gram matrix), the values are those of the fit without the level and the errors those with the
    level marginalised (the Fisher matrix of ``a m(x) + c`` with its prior), flags clear."""
    grid = sersic_grid()
    qm = QuadraticModels(grid)
    x_true = np.array([5.37, 4.3, 5.4, 10.6])
    data, start, var_b = 3.0 * qm.at(x_true), np.rint(x_true).astype(int), (0.4 * SIGMA) ** 2
    plain = _refine(grid, qm.matrix(), data, start)
    marginal = _refine(grid, qm.matrix(), data, start, var_b=var_b)
    monkeypatch.setattr(subgrid, "_sky_profiled", lambda b, gram, c_total, *_: (b, -gram, c_total))
    fallback = _refine(grid, qm.matrix(), data, start, var_b=var_b)
    assert fallback["FLAGS"][0] == 0
    for name in ("INDEX", "AX_RATIO", "ANGLE", "LOGR", "FLUX"):
        assert fallback[f"{name}_FIT"][0] == plain[f"{name}_FIT"][0]
        assert fallback[f"{name}_FIT_ERR"][0] == pytest.approx(marginal[f"{name}_FIT_ERR"][0], rel=1e-3)


def test_sky_level_is_fitted_with_its_prior():
    """Data ``3 m(x) + c0`` (a sky level the background map missed): with the level fitted under
    a wide prior the parameters and flux come back to the truth, as the exact minimum of
    ``|d - a m(x) - c|^2 + c^2 / var_b`` puts them; without the background term they are off.
    Under a narrow prior c is held near 0 and the values move little. The models are peaked (a
    galaxy's profile, not the near-constant base of the other tests: that one a sky level mimics)."""
    grid = sersic_grid()
    qm = QuadraticModels(grid)
    qm.base = 40 * np.exp(-0.5 * ((np.arange(N_PIX) - N_PIX / 2) / 6.0) ** 2)
    x_true = np.array([5.37, 4.3, 5.4, 10.6])
    data = 3.0 * qm.at(x_true) + 0.5 * SIGMA
    start = np.rint(x_true).astype(int)
    plain = _refine(grid, qm.matrix(), data, start)
    wide = _refine(grid, qm.matrix(), data, start, var_b=(1e3 * SIGMA) ** 2)
    narrow = _refine(grid, qm.matrix(), data, start, var_b=(1e-3 * SIGMA) ** 2)
    assert wide["FLAGS"][0] == 0
    assert wide["FLUX_FIT"][0] == pytest.approx(3.0, rel=1e-4)
    assert abs(plain["FLUX_FIT"][0] - 3.0) > 100 * abs(wide["FLUX_FIT"][0] - 3.0)
    assert narrow["FLUX_FIT"][0] == pytest.approx(plain["FLUX_FIT"][0], rel=1e-3)
    for i in qm.axes:
        a = grid.axes[i]
        assert wide[f"{a.name}_FIT"][0] == pytest.approx(a.start + x_true[i] * a.step, abs=1e-3 * a.step)


def test_round_galaxy_keeps_the_grid_angle():
    """Models that do not change with the angle: the rest is fitted exactly, the angle is the best
    cell's with the spread of a uniform angle."""
    grid = ModelGrid.default()
    qm = QuadraticModels(grid, flat=("ANGLE",))
    x_true = np.array([0.0, 4.3, 7.0, 10.6])
    out = _refine(grid, qm.matrix(), 2.0 * qm.at(x_true), np.array([0, 4, 7, 11]))
    assert out["FLAGS"][0] == 0
    assert out["AX_RATIO_FIT"][0] == pytest.approx(0.1 + 4.3 * 0.1, abs=1e-5)
    assert out["LOGR_FIT"][0] == pytest.approx(-0.70 + 10.6 * 0.12, abs=1e-5)
    assert out["ANGLE_FIT"][0] == pytest.approx(7 * 15.0)
    assert out["ANGLE_FIT_ERR"][0] == pytest.approx(UNIFORM_ANGLE_ERR)


def test_minimum_beyond_a_grid_step_is_found_and_flagged():
    """A best cell 1.4 radius steps from the truth (as a noisy surface could give): the minimum is
    still found exactly, and REFINE_FAR says that it moved."""
    grid = ModelGrid.default()
    qm = QuadraticModels(grid)
    x_true = np.array([0.0, 4.3, 5.4, 10.6])
    out = _refine(grid, qm.matrix(), 3.0 * qm.at(x_true), np.array([0, 4, 5, 12]))
    assert out["FLAGS"][0] & FitFlag.REFINE_FAR
    assert out["LOGR_FIT"][0] == pytest.approx(-0.70 + 10.6 * 0.12, abs=1e-3 * 0.12)


def test_no_positive_amplitude_fails_and_keeps_the_grid_values():
    grid = ModelGrid.default()
    qm = QuadraticModels(grid)
    out = _refine(grid, qm.matrix(), -qm.at(np.array([0.0, 4.3, 5.4, 10.6])), np.array([0, 4, 5, 11]))
    assert out["FLAGS"][0] & FitFlag.REFINE_FAILED
    assert out["LOGR_FIT"][0] == pytest.approx(-0.70 + 11 * 0.12)
    assert np.isnan(out["LOGR_FIT_ERR"][0])


@pytest.mark.parametrize("depth,flagged", [(0.5, True), (3.0, False)])
def test_second_minimum_within_one_delta_chi2(depth, flagged):
    grid = ModelGrid.default()
    x = _coords(grid)
    well = lambda centre: (x[:, 1] - centre[0]) ** 2 + (x[:, 3] - centre[1]) ** 2
    chi2 = np.minimum(well((2, 8)), well((7, 14)) + depth) + 1e-3 * x[:, 2] ** 2
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


def test_model_major_products_equal_the_pixel_major_ones():
    """The window products from the model-major copy (small cubes) and from the pixel-major matrix
    by slabs (large cubes) agree to float32 rounding."""
    grid = ModelGrid.default()
    qm = QuadraticModels(grid)
    models = qm.matrix()
    rng = np.random.default_rng(4)
    idx = np.stack([np.zeros(5, int), rng.integers(0, 10, 5), rng.integers(0, 12, 5), rng.integers(0, 21, 5)], 1)
    cells, _ = window(grid, idx)
    d = rng.normal(0, 1, (5, N_PIX)).astype(np.float32)
    w = rng.uniform(0.5, 2, (5, N_PIX)).astype(np.float32)
    extent = np.array([N_PIX, 40, 50, N_PIX, 30])
    w[np.arange(N_PIX)[None, :] >= extent[:, None]] = 0
    b1, g1, u1 = window_products(np, models, d, w, cells, extent)
    b2, g2, u2 = window_products(np, models, d, w, cells, extent, np.ascontiguousarray(models.T))
    np.testing.assert_allclose(b2, b1, rtol=1e-5, atol=1e-6 * np.abs(b1).max())
    np.testing.assert_allclose(g2, g1, rtol=1e-5, atol=1e-6 * np.abs(g1).max())
    expected_u = np.einsum("gp,pgc->gc", w.astype(float), models[:, cells].astype(float))   # M^T w
    np.testing.assert_allclose(u1, expected_u, rtol=1e-5)
    np.testing.assert_allclose(u2, expected_u, rtol=1e-5)
