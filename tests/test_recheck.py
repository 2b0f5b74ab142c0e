"""The float64 re-check of the float32 ``wls`` products: its tolerance is safe, its choice exact.

Real simulated galaxies (GalSim, the default cube) at S/N 50-200 and, scaled, at S/N ~10^4, with
their own masks and with masks that fill the stamp. The float32 products are the fit's: each
block of models stopped at its support (`ModelMatrix.column_blocks`). The reference is every
model's chi-square summed in float64 over every pixel (no float32, no truncation).
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
        chi32, _ = wls_chi2(np, grp.d, grp.w, mm.models[:grp.n], mm.models_sq[:grp.n], mm.column_blocks(grp.n))
        out.append((mm, grp, chi32, *_float64_chi2(mm, grp)))
    return out


@pytest.mark.parametrize("case", range(4))
def test_float32_error_is_far_inside_the_tolerance(cases, case):
    """Near each object's minimum (within 1e-3 C, where the best model and every candidate lie)
    the float32 products' error is their rounding alone (the truncated tails there are smaller);
    far from it, a small model cut at its support against a large galaxy errs by up to about
    5e-5 C, which cannot bring it within the re-check's tolerance of the minimum."""
    _, _, chi32, chi64, c = cases[case]
    finite = np.isfinite(chi64)
    error = np.abs(np.where(finite, chi32.astype(np.float64) - chi64, 0)) / c[:, None]
    near = finite & (chi64 - chi64.min(axis=1, keepdims=True) < 1e-3 * c[:, None])
    assert error[near].max() < RECHECK_TOLERANCE / 10, error[near].max()
    assert error.max() < RECHECK_TOLERANCE / 2, error.max()


def test_blocks_stop_the_products_where_the_models_end(cases):
    """Over stamp-filling masks the blocks skip a good part of the products, never a row that a
    model's support needs, and the float32 chi-squares stay within the tolerance above."""
    mm, grp = cases[1][:2]
    blocks = mm.column_blocks(grp.n)
    assert blocks[0][0] == 0 and blocks[-1][1] == mm.n_models
    assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))
    for k0, k1, rows in blocks:
        assert rows <= grp.n and np.all(np.minimum(mm.support[k0:k1], grp.n) <= rows)
    done = sum((k1 - k0) * rows for k0, k1, rows in blocks) / (grp.n * mm.n_models)
    assert grp.n == mm.n_pixels and done < 0.8, done
    # the unique models are ordered by their reach, so their supports rise along the matrix
    support = mm.support.astype(float)
    assert np.corrcoef(np.arange(support.size), support)[0, 1] > 0.8


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
