"""Tests of dre_hpc.models.convolve: linear, centre-preserving cube convolution and its cache."""

import numpy as np
import pytest
from scipy.signal import fftconvolve

from dre_hpc.models import convolve as conv
from dre_hpc.models.convolve import convolve_cube, fft_shape

B = 64


def gaussian(n, sigma, centre=None):
    c = n // 2 if centre is None else centre
    y, x = np.mgrid[:n, :n]
    g = np.exp(-((x - c) ** 2 + (y - c) ** 2) / (2 * sigma ** 2))
    return g / g.sum()


def direct(stamp, psf):
    """Reference linear convolution, cropped so PSF pixel (p//2, p//2) is the centre.

    (``fftconvolve(mode='same')`` crops at (p-1)//2, which differs by one pixel for even p.)
    """
    full = fftconvolve(stamp.astype(np.float64), psf, mode="full")
    oy, ox = psf.shape[0] // 2, psf.shape[1] // 2
    return full[oy:oy + stamp.shape[0], ox:ox + stamp.shape[1]]


@pytest.mark.parametrize("psf_shape", [(25, 25), (24, 24), (13, 18)])
def test_matches_direct_linear_convolution(psf_shape):
    rng = np.random.default_rng(0)
    stamps = rng.random((5, B, B)).astype(np.float32)
    psf = rng.random(psf_shape)
    psf /= psf.sum()
    out = convolve_cube(stamps, psf, block=2)
    assert out.dtype == np.float32 and out.shape == stamps.shape and out.flags.c_contiguous
    ref = np.stack([direct(s, psf) for s in stamps])
    np.testing.assert_allclose(out, ref, atol=2e-6 * ref.max())
    if psf_shape[0] % 2 and psf_shape[1] % 2:  # odd PSFs: identical to mode="same"
        same = fftconvolve(stamps[0].astype(np.float64), psf, mode="same")
        np.testing.assert_allclose(out[0], same, atol=2e-6 * ref.max())


@pytest.mark.parametrize("p", [25, 24])
def test_centre_stays_put(p):
    delta = np.zeros((1, 128, 128), np.float32)
    delta[0, 64, 64] = 1.0
    psf = gaussian(p, 2.0)  # centred on pixel p//2
    out = convolve_cube(delta, psf)[0]
    assert np.unravel_index(out.argmax(), out.shape) == (64, 64)
    c = p // 2
    np.testing.assert_allclose(out[64 - c:64 - c + p, 64 - c:64 - c + p], psf, atol=1e-7)


def test_flux_conserved_and_gaussian_variances_add():
    s1, s2 = 3.0, 2.0
    model = gaussian(B, s1)[None].astype(np.float32)
    out = convolve_cube(model, gaussian(25, s2))[0].astype(np.float64)
    np.testing.assert_allclose(out.sum(), 1.0, rtol=1e-5)
    y, x = np.mgrid[:B, :B]
    cy, cx = (out * y).sum(), (out * x).sum()
    assert abs(cy - B // 2) < 1e-4 and abs(cx - B // 2) < 1e-4
    var = (out * (x - cx) ** 2).sum()
    np.testing.assert_allclose(var, s1 ** 2 + s2 ** 2, rtol=1e-3)


def test_no_wrap_around():
    stamps = np.zeros((2, B, B), np.float32)
    stamps[0, B // 2, B - 1] = 1.0  # on the right edge
    stamps[1, 0, B // 2] = 1.0  # on the top edge
    out = convolve_cube(stamps, np.ones((25, 25)) / 625.0)
    assert out[0, B // 2, B - 1] == pytest.approx(1 / 625.0, rel=1e-5)
    assert np.abs(out[0, :, : B - 13]).max() < 1e-9  # nothing leaks to the left edge
    assert np.abs(out[1, 13:, :]).max() < 1e-9  # nothing leaks to the bottom edge
    np.testing.assert_allclose(out.sum(axis=(1, 2)), 13 * 25 / 625.0, rtol=1e-5)  # half lost


def test_psf_larger_than_stamp_and_single_stamp():
    rng = np.random.default_rng(3)
    stamp = rng.random((16, 16)).astype(np.float32)
    psf = rng.random((45, 38))  # wider than 2 stamps: only offsets < 16 matter
    out = convolve_cube(stamp, psf)
    assert out.shape == (16, 16)
    np.testing.assert_allclose(out, direct(stamp, psf), rtol=1e-5)
    assert fft_shape((128, 128), (25, 25))[0] >= 128 + 12


@pytest.mark.parametrize("p, q", [(1, 1), (2, 7), (9, 10), (17, 4), (33, 32)])
def test_minimal_fft_length_is_enough(monkeypatch, p, q):
    """With the FFT length not rounded up, the bound B + p//2 alone must avoid wrap-around."""
    monkeypatch.setattr(conv.scipy.fft, "next_fast_len", lambda n, real=False: n)
    rng = np.random.default_rng(p * 100 + q)
    stamp, psf = rng.random((17, 17)).astype(np.float32), rng.random((p, q))
    assert fft_shape(stamp.shape, psf.shape) == (17 + p // 2, 17 + q // 2)
    np.testing.assert_allclose(convolve_cube(stamp, psf), direct(stamp, psf), rtol=1e-5, atol=1e-6)




@pytest.mark.parametrize("stamp_shape", [(B, B), (40, 56)])
def test_pixels_gathered_in_a_given_order_are_the_stamps(stamp_shape):
    """``order``: each stamp's pixels taken straight from the transform in that order, the same
    values as the cropped stamps' (rectangular stamps: rows and columns not mixed up)."""
    rng = np.random.default_rng(3)
    stamps = rng.random((7,) + stamp_shape).astype(np.float32)
    psf = gaussian(15, 2.0)
    order = rng.permutation(stamp_shape[0] * stamp_shape[1])[:500]
    cropped = convolve_cube(stamps, psf, block=3)
    gathered = convolve_cube(stamps, psf, block=3, order=order)
    assert gathered.shape == (7, 500) and gathered.dtype == np.float32
    np.testing.assert_array_equal(gathered, cropped.reshape(7, -1)[:, order])
    with pytest.raises(ValueError, match="out must be float32 of shape"):
        convolve_cube(stamps, psf, order=order, out=np.empty((7,) + stamp_shape, np.float32))
