"""Recovery of known truth: GalSim galaxies fitted with the default cube (the issue's accuracy targets).

Truth: n = 4 Sersic galaxies, b/a uniform in [0.1, 1.0], angle uniform in [0, 180), log10 r_e
uniform in [0.2, 1.3] (1.6 to 20 px: resolved by the 2.5 px FWHM Moffat PSF, inside the grid),
S/N 50-200 (optimal), centres uniform within +-0.5 px of the cut centre.
Targets: best model within one grid step of truth in b/a, angle (for b/a <= 0.8) and log10 r for
>= 90 % of objects; FLUX within 5 % of the truth for >= 90 %.
"""

from __future__ import annotations

import numpy as np
import pytest

from dre_hpc.fit.engine import FitOptions, fit_cutouts
from dre_hpc.flags import FitFlag
from dre_hpc.sim.match import angle_distance, recovered

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wls_fit(default_models, sim_galaxies):
    cuts, truth, psf = sim_galaxies
    return fit_cutouts(default_models.for_psf(psf), cuts, FitOptions()), truth


def test_shape_within_one_grid_step(wls_fit, default_models):
    res, truth = wls_fit
    ok = recovered(res, truth, default_models.grid)
    for name in ("b/a", "log r", "angle"):
        assert ok[name].mean() >= 0.9, (name, ok[name].mean())


def test_flux_within_five_percent(wls_fit, default_models):
    res, truth = wls_fit
    ratio = res["FLUX"] / truth["FLUX"]
    assert recovered(res, truth, default_models.grid)["flux"].mean() >= 0.9, np.percentile(ratio, [5, 50, 95])


def test_surface_means_and_errors_are_consistent(wls_fit):
    """Posterior means sit near truth within a few of their errors; errors are positive."""
    res, truth = wls_fit
    for name in ("AX_RATIO", "LOGR"):
        pull = (res[f"{name}_MEAN"] - truth[name]) / res[f"{name}_ERR"]
        assert np.all(res[f"{name}_ERR"] > 0)
        assert np.median(np.abs(pull)) < 2.0, (name, np.median(np.abs(pull)))
    elongated = truth["AX_RATIO"] <= 0.8
    pull = angle_distance(res["ANGLE_MEAN"], truth["ANGLE"]) / res["ANGLE_ERR"]
    assert np.median(pull[elongated]) < 2.0


def test_chi2_per_dof_near_one(wls_fit):
    res, _ = wls_fit
    reduced = res["CHI2"] / res["DOF"]
    assert 0.8 < np.median(reduced) < 1.5, np.median(reduced)
    assert np.allclose(res["CHI"], reduced, rtol=1e-4)


def test_clean_fits_have_no_failure_flags(wls_fit):
    res, _ = wls_fit
    bad = FitFlag.FIT_FAILED | FitFlag.NONPOSITIVE_FLUX | FitFlag.EMPTY_MASK | FitFlag.FEW_PIXELS
    assert not np.any(res["FLAGS"] & int(bad))


def test_original_statistic_recovers_shapes(default_models, sim_galaxies):
    """--statistic dre: the original formula also finds the truth (looser: it ignores weights)."""
    cuts, truth, psf = sim_galaxies
    sub = cuts.subset(slice(0, 40))
    res = fit_cutouts(default_models.for_psf(psf), sub, FitOptions(statistic="dre"))
    t = truth[:40]
    grid = default_models.grid
    assert (np.abs(res["AX_RATIO"] - t["AX_RATIO"]) <= grid.ax_ratio.step + 1e-9).mean() >= 0.8
    assert (np.abs(res["LOGR"] - t["LOGR"]) <= grid.logr.step + 1e-9).mean() >= 0.8


def test_flux_errors_are_calibrated(wls_fit):
    """FLUX_ERR includes the shape degeneracy: pulls are near unit Gaussian (median |pull| 0.674).

    Measured on 200 objects of another seed: median |pull| 0.71, 89.5 % within 2 sigma; with the
    fixed-shape error alone it was 1.21 and 65 %.
    """
    res, truth = wls_fit
    pull = (res["FLUX"] - truth["FLUX"]) / res["FLUX_ERR"]
    assert 0.45 < np.median(np.abs(pull)) < 1.0, np.median(np.abs(pull))
    assert np.mean(np.abs(pull) < 2) > 0.8
