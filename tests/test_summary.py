"""Catalogue columns from chi-square surfaces: circular angle, posterior moments, edges, README table."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dre_hpc.fit.summary import edge_flags, posterior_weights, surface_moments
from dre_hpc.flags import FitFlag
from dre_hpc.models.grid import ModelGrid
from dre_hpc.sim.match import angle_distance


def _surface_at(grid, cells_chi2):
    chi2 = np.full((1, grid.size), 1e6)
    for index, value in cells_chi2.items():
        chi2[0, np.ravel_multi_index(index, grid.shape)] = value
    return chi2


def test_angle_mean_wraps_at_180_degrees():
    """Equal weight at 165 and 15 degrees: the circular mean is 0 (=180), not the linear 90."""
    grid = ModelGrid.default()
    chi2 = _surface_at(grid, {(0, 4, 11, 10): 0.0, (0, 4, 1, 10): 0.0})
    out = surface_moments(grid, posterior_weights(chi2))
    assert angle_distance(out["ANGLE_MEAN"], 0.0)[0] < 1e-6
    assert 14 < out["ANGLE_ERR"][0] < 20


def test_sharp_surface_gives_grid_step_floor():
    grid = ModelGrid.default()
    chi2 = _surface_at(grid, {(0, 4, 3, 10): 0.0})
    out = surface_moments(grid, posterior_weights(chi2))
    assert np.isclose(out["AX_RATIO_MEAN"][0], 0.5) and np.isclose(out["LOGR_MEAN"][0], grid.logr.values[10])
    assert np.isclose(out["AX_RATIO_ERR"][0], 0.1 / np.sqrt(12))
    assert np.isclose(out["LOGR_ERR"][0], 0.12 / np.sqrt(12))
    assert np.isclose(out["ANGLE_MEAN"][0], 45.0)


def test_posterior_mean_between_two_cells():
    grid = ModelGrid.default()
    chi2 = _surface_at(grid, {(0, 4, 3, 10): 0.0, (0, 4, 3, 11): 2 * np.log(3.0)})  # weights 3:1
    out = surface_moments(grid, posterior_weights(chi2))
    expected = (3 * grid.logr.values[10] + grid.logr.values[11]) / 4
    assert np.isclose(out["LOGR_MEAN"][0], expected)


def test_rows_without_finite_chi2_get_zero_weights():
    p = posterior_weights(np.array([[np.inf, np.nan], [1.0, 3.0]]))
    assert np.all(p[0] == 0) and np.isclose(p[1].sum(), 1)


def test_edge_flags():
    grid = ModelGrid.default()
    idx = np.array([[0, 0, 5, 0], [0, 5, 5, 20], [0, 5, 5, 10]])
    flags = edge_flags(grid, idx)
    assert flags[0] == FitFlag.EDGE_LOGR_MIN | FitFlag.EDGE_AX_RATIO_MIN
    assert flags[1] == FitFlag.EDGE_LOGR_MAX
    assert flags[2] == 0


def test_readme_documents_every_flag():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for value, name, description in FitFlag.describe():
        assert f"| {value} | `{name}` | {description} |" in readme, name
