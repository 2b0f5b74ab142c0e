"""`dre_kernel.dre_chi_t` against a plain float64 NumPy evaluation of the original DRE statistic.

With S an object's usable pixels: ``s_k = sum_S d / sum_S m_k`` and
``chi_k = nanmean_S (d - s_k m_k)^2 / (s_k m_k + rms^2)`` (NaN where no term is finite). The
reference below computes exactly that in float64 from the float32 inputs. The kernel must give
the same best model (argmin over k), chi within 1e-5 relative and the scale within 1e-5, on
realistic inputs: the default cube's models (every fourth unique model) convolved with the
simulated PSF, pixel-major with the rows in radial order, and simulated galaxies at S/N 50-200 and
at high S/N (peak pixels thousands of times the rms), with masks of many sizes, sparse subsets of
the radial prefix, non-finite terms, an empty mask, and an ill-conditioned denominator.
"""

from __future__ import annotations

import numpy as np
import pytest

from dre_hpc.fit import compiled, dre_kernel
from dre_hpc.fit.dre_kernel import dre_chi_t, model_row_min
from dre_hpc.models.convolve import convolve_cube
from dre_hpc.sim.cutouts import SimSpec, simulate_cutouts

RTOL = 1e-5


@pytest.fixture(params=[True, False], ids=["compiled", "numpy-passes"], autouse=True)
def pass_two(request, monkeypatch):
    """Every test twice: pass 2 by the compiled sweep (NumPy's default) and by the NumPy passes
    (what CuPy runs)."""
    monkeypatch.setattr(compiled, "FUSED", request.param)
    return request.param




def reference(data, rms, pixels, models_t):
    """float64 chi and scale of every model (the original's nansum/nanmean semantics)."""
    d = data[pixels].astype(np.float64)
    v = rms[pixels].astype(np.float64) ** 2
    m = models_t[pixels].astype(np.float64)
    with np.errstate(all="ignore"):
        scale = d.sum() / m.sum(axis=0)
        u = scale * m
        terms = (d[:, None] - u) ** 2 / (u + v[:, None])
        finite = np.isfinite(terms)
        count = finite.sum(axis=0)
        chi = np.where(count > 0, np.where(finite, terms, 0).sum(axis=0) / np.maximum(count, 1), np.nan)
    return chi, scale


def best(chi):
    return int(np.argmin(np.where(np.isfinite(chi), chi, np.inf)))


def assert_matches_reference(data, rms, pixels, models_t, tiny=False, **kwargs):
    """The kernel agrees with the reference: NaN where it is NaN, chi and scale to RTOL, same best model.

    ``tiny``: a mask of a few pixels, where some models fit almost exactly and chi is orders of
    magnitude below the terms' scale; a float32 residual d - s m is off by about eps32 d, so chi
    is then only good to about ``4 eps32 sqrt(chi max_S d^2 / rms^2)`` (absolute), in any float32
    kernel. The best model must be the reference's unless the reference's two best are within
    the tolerance.
    """
    chi, scale = dre_chi_t(np, data, rms, pixels, models_t, **kwargs)
    chi_ref, scale_ref = reference(data, rms, pixels, models_t)
    assert chi.dtype == np.float32 and scale.dtype == np.float32
    assert chi.shape == scale.shape == (models_t.shape[1],)
    np.testing.assert_array_equal(np.isfinite(chi), np.isfinite(chi_ref))
    finite = np.isfinite(chi_ref)
    tol = RTOL * np.abs(chi_ref[finite])
    if tiny:
        q = float(np.max(data[pixels].astype(np.float64) ** 2 / rms[pixels].astype(np.float64) ** 2))
        eps = float(np.finfo(np.float32).eps)
        tol = tol + 4 * eps * np.sqrt(np.abs(chi_ref[finite]) * q) + (4 * eps) ** 2 * q
    bad = np.abs(chi[finite] - chi_ref[finite]) > tol
    assert not bad.any(), (f"{bad.sum()} of {finite.sum()} chi off by more than the tolerance, e.g. "
                           f"{chi[finite][bad][:3]} vs {chi_ref[finite][bad][:3]}")
    finite_scale = np.isfinite(scale_ref)
    np.testing.assert_allclose(scale[finite_scale], scale_ref[finite_scale], rtol=RTOL)
    if finite.any():
        order = np.argsort(np.where(finite, chi_ref, np.inf))
        first = int(order[0])
        margin = 2 * float(np.max(tol)) if tiny else 2 * RTOL * abs(chi_ref[first])
        if order.size < 2 or chi_ref[order[1]] - chi_ref[first] > margin:
            assert best(chi) == first
        else:
            assert chi_ref[best(chi)] <= chi_ref[first] + margin
    return chi, scale


def radial_order(boxsize):
    c = boxsize // 2
    y, x = np.indices((boxsize, boxsize))
    return np.argsort(np.hypot(y - c, x - c).ravel(), kind="stable")


def as_objects(cuts, order):
    """(data, rms, pixels) per cutout, in radial order; pixels: the mask's, ascending."""
    return [(np.ascontiguousarray(d.ravel()[order]), np.ascontiguousarray(r.ravel()[order]),
             np.flatnonzero(m.ravel()[order])) for d, r, m in zip(cuts.data, cuts.rms, cuts.mask)]


@pytest.fixture(scope="module")
def radial(default_cube, sim_galaxies):
    """(models_t, order, objects): every fourth unique default model convolved with the simulated
    PSF, (P, K) float32 with rows in radial order; the first 24 simulated galaxies (S/N 50-200)."""
    cube, grid = default_cube
    representatives, _ = grid.unique_models()
    b = grid.boxsize
    stamps = np.asarray(cube, dtype=np.float32).reshape(-1, b, b)[representatives[::4]]
    cuts, _, psf = sim_galaxies
    conv = convolve_cube(stamps, psf)
    order = radial_order(b)
    models_t = np.ascontiguousarray(conv.reshape(len(conv), -1)[:, order].T)
    return models_t, order, as_objects(cuts, order)[:24]


@pytest.fixture(scope="module")
def bright(radial):
    """Four high-S/N galaxies: peak pixels up to about 1e4 x rms, masks of thousands of pixels."""
    cuts, _, _ = simulate_cutouts(SimSpec(n_objects=4, seed=7, snr=(3e3, 3e4)))
    return as_objects(cuts, radial[1])


def test_realistic_objects_match_the_reference(radial):
    models_t, _, objects = radial
    sizes = [p.size for _, _, p in objects]
    assert min(sizes) < 300 and max(sizes) > 800             # masks of various sizes
    for data, rms, pixels in objects:
        assert_matches_reference(data, rms, pixels, models_t)


def test_high_signal_to_noise_objects_match_the_reference(radial, bright):
    """Peak pixels thousands of times the rms; masks reaching the models' faint (partly negative,
    from the FFT convolution) outskirts, where some models' s m + rms^2 cancels (redone in float64)."""
    models_t = radial[0]
    peaks = [float(np.max(d[p] / r[p])) for d, r, p in bright]
    assert max(peaks) > 5e3
    ill = 0
    for data, rms, pixels in bright:
        assert_matches_reference(data, rms, pixels, models_t)
        _, scale = reference(data, rms, pixels, models_t)
        u = models_t[pixels].astype(np.float64) * scale
        ill += int((u < -0.5 * rms[pixels, None].astype(np.float64) ** 2).any(axis=0).sum())
    assert ill > 0                                              # the case is exercised


@pytest.mark.parametrize("block_rows", [1, 7, 16, 64, 100_000])
def test_block_sizes(radial, block_rows):
    models_t, _, objects = radial
    for data, rms, pixels in objects[:4]:
        assert_matches_reference(data, rms, pixels, models_t, block_rows=block_rows)


@pytest.mark.parametrize("size", [2, 5, 33, 200, 2000, 16384])
def test_prefix_masks_of_various_sizes(radial, size):
    """The first `size` radial rows, all usable (a dense prefix, from two pixels to the stamp)."""
    models_t, _, objects = radial
    data, rms, _ = objects[0]
    assert_matches_reference(data, rms, np.arange(size), models_t, tiny=size < 10)


def test_one_pixel(radial):
    """One pixel: every model matches it exactly (chi 0 up to rounding, no relative precision)."""
    models_t, _, objects = radial
    data, rms, _ = objects[0]
    chi, scale = dre_chi_t(np, data, rms, np.array([0]), models_t)
    chi_ref, scale_ref = reference(data, rms, np.array([0]), models_t)
    np.testing.assert_allclose(scale, scale_ref, rtol=RTOL)
    assert np.all(np.abs(chi) <= 1e-6 * float(data[0]) ** 2 / float(rms[0]) ** 2)


@pytest.mark.parametrize("keep", [0.02, 0.1, 0.3, 0.5, 0.7, 0.9])
def test_sparse_subsets_of_the_prefix(radial, keep):
    """Pixels that fill a fraction `keep` of the prefix at random: gathered, used in place, or both."""
    models_t, _, objects = radial
    rng = np.random.default_rng(int(keep * 100))
    data, rms, mask = objects[3]
    prefix = int(mask[-1]) + 1
    pixels = np.flatnonzero(rng.random(prefix) < keep)
    assert_matches_reference(data, rms, pixels, models_t)
    # a dense core and sparse outskirts in one mask
    core = np.arange(prefix // 3)
    outskirts = np.arange(prefix // 3, 3 * prefix)[rng.random(3 * prefix - prefix // 3) < keep / 4]
    assert_matches_reference(data, rms, np.concatenate([core, outskirts]), models_t)


def test_pixels_in_any_order(radial):
    models_t, _, objects = radial
    data, rms, pixels = objects[5]
    shuffled = np.random.default_rng(1).permutation(pixels)
    chi, scale = assert_matches_reference(data, rms, shuffled, models_t)
    np.testing.assert_allclose(chi, dre_chi_t(np, data, rms, pixels, models_t)[0], rtol=RTOL)


def test_empty_pixel_set(radial):
    models_t, _, objects = radial
    data, rms, _ = objects[0]
    chi, scale = dre_chi_t(np, data, rms, np.array([], dtype=np.int64), models_t)
    assert chi.shape == scale.shape == (models_t.shape[1],)
    assert np.isnan(chi).all() and np.isnan(scale).all()


def test_row_min_given_or_not_gives_the_same_result(radial, bright):
    models_t = radial[0]
    row_min = model_row_min(np, models_t)
    for data, rms, pixels in radial[2][:3] + bright[:1]:
        plain = dre_chi_t(np, data, rms, pixels, models_t)
        given = dre_chi_t(np, data, rms, pixels, models_t, row_min=row_min)
        np.testing.assert_array_equal(plain[0], given[0])
        np.testing.assert_array_equal(plain[1], given[1])


def test_non_finite_terms(radial):
    """Float32 overflow of one term, a model with an infinite value (its other terms count: the
    mean over the finite terms), a model with no flux (NaN), a NaN model value outside the mask
    inside a block used in place (must not count)."""
    models_t, _, objects = radial
    data, rms, pixels = (a.copy() for a in objects[2])
    models_t = models_t.copy()
    k = models_t.shape[1]
    gap = int(pixels[20])                           # inside the first block of rows, not in S
    pixels = np.delete(pixels, 20)
    p = int(pixels[len(pixels) // 2])
    rms[p] = 1e-20 * abs(float(data[p]))           # d^2 / rms^2 = 1e40: float32 terms overflow
    models_t[p, 7] = 0.0                            # ... where the model is 0 (chi ~ 1e40 / S)
    models_t[int(pixels[3]), 11] = np.inf           # scale 0, one NaN term, the others finite
    models_t[:, 13] = 0.0                           # no flux: infinite scale, no finite term
    dense, _ = dre_kernel._plan(pixels, int(pixels[-1]) + 1, dre_kernel._block_rows(np, k, pixels.size))
    assert any(lo <= gap < hi for lo, hi in dense)   # a row read in place, weight 0
    models_t[gap, 17] = np.nan
    chi, scale = assert_matches_reference(data, rms, pixels, models_t)
    assert np.isfinite(chi[7]) and chi[7] > 1e35
    assert np.isfinite(chi[11]) and scale[11] == 0
    assert np.isnan(chi[13])
    assert np.isfinite(chi[17])
    assert np.isfinite(np.delete(chi, 13)).all() and k > 17


def make_ill_conditioned(models_t, data, rms, pixels, k, p, delta=1e-5):
    """Set model k at pixel p (in S) so that s m + rms^2 = delta rms^2 there, s the new scale."""
    d_sum = float(data[pixels].astype(np.float64).sum())
    m_sum = float(models_t[pixels, k].astype(np.float64).sum()) - float(models_t[p, k])
    v = float(rms[p]) ** 2
    models_t[p, k] = -(1 - delta) * v * m_sum / (d_sum + (1 - delta) * v)


def test_ill_conditioned_denominator(radial):
    """A negative model value with s m close to -rms^2: s m + rms^2 cancels, float32 would be off
    by far more than RTOL; the kernel redoes that model in float64."""
    models_t, _, objects = radial
    data, rms, pixels = objects[4]
    models_t = models_t.copy()
    k = 5
    make_ill_conditioned(models_t, data, rms, pixels, k, int(pixels[len(pixels) // 3]))
    chi, _ = assert_matches_reference(data, rms, pixels, models_t)
    chi_ref, _ = reference(data, rms, pixels, models_t)
    assert chi_ref[k] > 100 * np.median(chi_ref)           # the term dominates this model's chi
    with pytest.MonkeyPatch.context() as mp:                # without the re-do: off by >> RTOL
        mp.setattr(dre_kernel, "ILL_CONDITIONED", np.inf)
        unguarded, _ = dre_chi_t(np, data, rms, pixels, models_t)
    assert abs(unguarded[k] / chi_ref[k] - 1) > 10 * RTOL
    np.testing.assert_allclose(np.delete(unguarded, k), np.delete(chi, k), rtol=0)


def test_guarded_namespace_ill_conditioned_and_sparse(radial):
    """The same code off NumPy (the CuPy stand-in of test_device_namespace): equal results."""
    guarded_module = pytest.importorskip("test_device_namespace")
    xp, to_host = guarded_module.guarded, guarded_module.to_host
    models_t, _, objects = radial
    data, rms, pixels = objects[4]
    models_t = models_t[:4096].copy()
    make_ill_conditioned(models_t, data, rms, pixels, 3, int(pixels[10]))
    outskirts = np.flatnonzero(np.random.default_rng(3).random(4096) < 0.1)
    mixed = np.concatenate([pixels[: len(pixels) // 2], outskirts[outskirts > pixels[-1]]])
    for pix in (pixels, mixed):
        host = dre_chi_t(np, data, rms, pix, models_t, block_rows=32)
        dev = dre_chi_t(xp, xp.asarray(data), xp.asarray(rms), xp.asarray(pix), xp.asarray(models_t),
                        block_rows=32)
        assert all(isinstance(a, xp.ndarray) for a in dev)
        np.testing.assert_array_equal(to_host(dev[0]), host[0])
        np.testing.assert_array_equal(to_host(dev[1]), host[1])
        assert_matches_reference(data, rms, pix, models_t, block_rows=32)


def test_the_compiled_sweep_is_there_and_agrees_with_the_passes(radial, bright, monkeypatch):
    """Numba is a dependency: the compiled pass is used, and it gives the NumPy passes' chi to
    float32 summation order (2e-6) and the same best model."""
    assert dre_kernel._compiled_terms() is not None
    models_t, _, objects = radial
    for data, rms, pixels in objects[:8] + bright:
        monkeypatch.setattr(compiled, "FUSED", True)
        chi_c, scale_c = dre_chi_t(np, data, rms, pixels, models_t)
        monkeypatch.setattr(compiled, "FUSED", False)
        chi_p, scale_p = dre_chi_t(np, data, rms, pixels, models_t)
        np.testing.assert_array_equal(scale_c, scale_p)
        np.testing.assert_allclose(chi_c, chi_p, rtol=2e-6)
        assert best(chi_c) == best(chi_p)
