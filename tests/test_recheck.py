"""The float64 re-check of the float32 ``wls`` products: its tolerance is safe, its choice exact.

Real simulated galaxies (GalSim, the default cube) at S/N 50-200 and, scaled, at S/N ~10^4, with
their own masks and with masks that fill the stamp. The reference is every model's chi-square
summed in float64 (no float32 anywhere).
"""

from __future__ import annotations

import numpy as np
import pytest

from dre_hpc.fit import engine
from dre_hpc.fit.chi2 import RECHECK_TOLERANCE, recheck_wls, wls_chi2

pytestmark = pytest.mark.slow


def _groups(default_models, sim_galaxies):
    cuts, _, psf = sim_galaxies
    mm = default_models.for_psf(psf)
    for scale in (1.0, 100.0):                    # S/N x100: the cancellation grows with S/N
        for full in (False, True):
            c = cuts.subset(np.arange(len(cuts)))
            c.data[...] *= scale
            if full:
                c.mask[...] = True
            clean = engine.clean_cutouts(c)
            extent = engine.footprint_extent(mm, clean[2], clean[4], True)
            n = int(extent.max())
            yield mm, engine.prepare_group(np, mm, clean, np.arange(len(c)), n, True, 16)


def _float64_chi2(mm, grp):
    m = mm.models[:grp.n].astype(np.float64)
    w = grp.w.astype(np.float64)
    wd = w * grp.d
    a, b, c = np.maximum(wd @ m, 0), w @ (m * m), (wd * grp.d).sum(axis=1)
    return np.where(b > 0, c[:, None] - a * a / np.where(b > 0, b, 1), np.inf), c


@pytest.fixture(scope="module")
def cases(default_models, sim_galaxies):
    """(models, group, float32 chi2, float64 chi2, C) of each of the four cases."""
    out = []
    for mm, grp in _groups(default_models, sim_galaxies):
        chi32, _ = wls_chi2(np, grp.d, grp.w, mm.models[:grp.n], mm.models_sq[:grp.n])
        out.append((mm, grp, chi32, *_float64_chi2(mm, grp)))
    return out


@pytest.mark.parametrize("case", range(4))
def test_float32_error_is_far_inside_the_tolerance(cases, case):
    _, _, chi32, chi64, c = cases[case]
    finite = np.isfinite(chi64)
    error = np.abs(np.where(finite, chi32.astype(np.float64) - chi64, 0)).max(axis=1) / c
    assert error.max() < RECHECK_TOLERANCE / 5, error.max()


@pytest.mark.parametrize("case", range(4))
def test_recheck_picks_the_float64_best(cases, case):
    mm, grp, chi32, chi64, _ = cases[case]
    best, chi_best, amp, err = recheck_wls(np, grp.d, grp.w, mm.models[:grp.n], chi32)
    rows = np.arange(len(best))
    # the chosen model is the float64 minimum (up to float64 ties), its value the float64 value
    assert np.all(chi64[rows, best] <= chi64.min(axis=1) * (1 + 1e-12))
    np.testing.assert_allclose(chi_best, chi64[rows, best], rtol=1e-9)
    assert np.all(amp >= 0) and np.all(err > 0)
    # read from the model-major copy instead: the same models, so the same bytes
    assert mm.models_major is not None
    again = recheck_wls(np, grp.d, grp.w, mm.models[:grp.n], chi32, models_major=mm.models_major)
    for x, y in zip((best, chi_best, amp, err), again):
        np.testing.assert_array_equal(x, y)
