"""The Sersic renderer against GalSim, an exact ray-integral reference and analytic fluxes."""

import time

import galsim
import numpy as np
import pytest
from scipy.integrate import quad
from scipy.special import gammainc

from dre_hpc.models.grid import Axis, ModelGrid
from dre_hpc.models.sersic import (enclosed_fraction, render_grid, render_models, render_sersic,
                                   sersic_bn)

BOX = 128
C = BOX // 2


def galsim_stamp(n, q, angle, r_e, method, **gsparams):
    """GalSim's pixel-convolved profile centred on the centre of 0-based pixel [64, 64].

    GalSim puts the profile at the true centre of the image, 1-based (64.5, 64.5) for a 128 image,
    i.e. the corner between 0-based pixels 63 and 64; the (0.5, 0.5) offset moves it onto the centre
    of 0-based pixel 64.
    """
    prof = galsim.Sersic(n, half_light_radius=r_e * np.sqrt(q), flux=1.0)
    prof = prof.shear(q=q, beta=angle * galsim.degrees).withGSParams(galsim.GSParams(**gsparams))
    return prof.drawImage(nx=BOX, ny=BOX, scale=1.0, method=method, offset=(0.5, 0.5)).array


def square_flux(n, q, angle, r_e, x0, x1, y0, y1):
    """Exact flux over a box (profile centre at the origin): rays from the centre, with the
    analytic flux inside an ellipse, F(rho) = P(2n, b (rho / r_e)^(1/n))."""
    b, theta = sersic_bn(n), np.deg2rad(angle)

    def integrand(psi):
        u = (np.cos(psi), np.sin(psi))
        lo, hi = 0.0, np.inf
        for ui, a0, a1 in ((u[0], x0, x1), (u[1], y0, y1)):
            if abs(ui) < 1e-300:
                if not a0 <= 0 <= a1:
                    return 0.0
                continue
            lo, hi = max(lo, min(a0 / ui, a1 / ui)), min(hi, max(a0 / ui, a1 / ui))
        if hi <= lo:
            return 0.0
        qe = np.cos(psi - theta) ** 2 + (np.sin(psi - theta) / q) ** 2
        frac = gammainc(2 * n, b * (np.array([lo, hi]) * np.sqrt(qe) / r_e) ** (1.0 / n))
        return (frac[1] - frac[0]) / (2 * np.pi * q * qe)

    corners = np.arctan2([y0, y0, y1, y1], [x0, x1, x0, x1])
    if x0 <= 0 <= x1 and y0 <= 0 <= y1:
        lo, hi = 0.0, 2 * np.pi
        corners = np.mod(corners, 2 * np.pi)
    else:
        mid = np.arctan2(y0 + y1, x0 + x1)
        corners = mid + np.angle(np.exp(1j * (corners - mid)))
        lo, hi = corners.min(), corners.max()
    breaks = np.concatenate([corners, theta + np.arange(-4, 9) * np.pi / 2])
    breaks = np.unique(breaks[(breaks > lo) & (breaks < hi)])
    return quad(integrand, lo, hi, points=breaks if breaks.size else None,
                epsabs=1e-14, epsrel=1e-12, limit=400)[0]


def pixel_flux(n, q, angle, r_e, row, col):
    dx, dy = col - C, row - C
    return square_flux(n, q, angle, r_e, dx - 0.5, dx + 0.5, dy - 0.5, dy + 0.5)


def test_sersic_bn_and_half_light():
    assert sersic_bn(1.0) == pytest.approx(1.678346990, rel=1e-8)
    assert sersic_bn(4.0) == pytest.approx(7.669249443, rel=1e-8)
    for n in (0.5, 1.0, 2.5, 4.0, 6.0):
        assert enclosed_fraction(n, 3.0, 3.0) == pytest.approx(0.5, abs=1e-12)


# GalSim real-space drawing integrates the profile over each pixel directly. Its FFT drawing ('auto')
# truncates at maxk and errs at the cusp by up to 0.7 % of the peak with default GSParams (n = 4,
# r_e = 30), and needs FFTs of > 30 GB for r_e = 0.2 px with q < 1; it is checked separately below.
GALSIM_CASES = [(1.0, 0.5, 70.0, 3.0), (4.0, 1.0, 0.0, 0.2), (4.0, 0.35, 28.9, 0.2),
                (4.0, 0.7, 120.0, 30.0), (2.5, 0.2, 10.0, 5.0), (1.0, 0.3, 100.0, 30.0)]


@pytest.mark.parametrize("n, q, angle, r_e", GALSIM_CASES)
def test_matches_galsim_real_space(n, q, angle, r_e):
    mine = render_sersic(n, q, angle, r_e).astype(np.float64)
    ref = galsim_stamp(n, q, angle, r_e, "real_space")
    peak = mine.max()
    assert np.unravel_index(np.argmax(ref), ref.shape) == (C, C) == np.unravel_index(np.argmax(mine),
                                                                                      mine.shape)
    assert np.abs(mine - ref).max() < 2e-5 * peak  # achieved: <= 1.5e-6 * peak
    assert mine.sum() == pytest.approx(ref.sum(), rel=1e-5)


@pytest.mark.parametrize("gsparams, tol", [({}, 1e-3), ({"maxk_threshold": 1e-5}, 1e-5)])
def test_matches_galsim_fft(gsparams, tol):
    mine = render_sersic(1.0, 0.5, 70.0, 3.0).astype(np.float64)
    ref = galsim_stamp(1.0, 0.5, 70.0, 3.0, "auto", **gsparams)
    assert np.abs(mine - ref).max() < tol * mine.max()
    assert mine.sum() == pytest.approx(ref.sum(), rel=5e-3)


@pytest.mark.parametrize("n, q, angle, r_e", [(4.0, 0.1, 173.1, 0.2), (6.0, 0.35, 46.8, 50.0),
                                              (0.5, 0.1, 25.9, 8.0), (1.0, 1.0, 135.1, 0.2)])
def test_pixels_match_exact_integral(n, q, angle, r_e):
    """Central 7x7 pixels and pixels along the major axis, to the pixel-integration budget."""
    stamp = render_sersic(n, q, angle, r_e, dtype=np.float64)
    theta = np.deg2rad(angle)
    pixels = [(C + i, C + j) for i in range(-3, 4) for j in range(-3, 4)]
    pixels += [(int(round(C + d * np.sin(theta))), int(round(C + d * np.cos(theta))))
               for d in (5, 9, 17, 33, 60)]
    for row, col in pixels:
        ref = pixel_flux(n, q, angle, r_e, row, col)
        assert abs(stamp[row, col] - ref) <= 2e-5 * ref + 1e-10, (row, col)


def test_centre_and_point_symmetry():
    for box in (BOX, 33):
        stamp = render_sersic(2.0, 0.45, 33.0, 4.0, boxsize=box, dtype=np.float64)
        c = box // 2
        inner = stamp[c - (box - 1 - c):, c - (box - 1 - c):]  # the part symmetric about pixel c
        np.testing.assert_allclose(inner, inner[::-1, ::-1], rtol=1e-12, atol=0)
        rows, cols = np.indices(inner.shape) + c - (box - 1 - c)  # indices in the stamp
        assert (inner * rows).sum() / inner.sum() == pytest.approx(c, abs=1e-9)
        assert (inner * cols).sum() / inner.sum() == pytest.approx(c, abs=1e-9)


def test_odd_box_is_a_crop_of_the_even_box():
    big = render_sersic(4.0, 0.3, 75.0, 1.5, boxsize=64, dtype=np.float64)
    small = render_sersic(4.0, 0.3, 75.0, 1.5, boxsize=33, dtype=np.float64)
    np.testing.assert_allclose(small, big[16:49, 16:49], rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("angle", [30.0, 120.0, 165.0])
def test_angle_convention_from_second_moments(angle):
    """A Gaussian (n = 0.5): the moments give the angle (from +x = axis 1 towards +y = axis 0)
    and b/a exactly, once the 1/12 px^2 of pixel integration is removed."""
    q = 0.5
    stamp = render_sersic(0.5, q, angle, 5.0, dtype=np.float64)
    y, x = np.indices(stamp.shape) - C
    w = stamp / stamp.sum()
    qxx, qyy, qxy = (w * x * x).sum() - 1 / 12, (w * y * y).sum() - 1 / 12, (w * x * y).sum()
    measured = np.rad2deg(0.5 * np.arctan2(2 * qxy, qxx - qyy)) % 180
    assert measured == pytest.approx(angle, abs=1e-3)
    eig = np.linalg.eigvalsh([[qxx, qxy], [qxy, qyy]])
    assert np.sqrt(eig[0] / eig[1]) == pytest.approx(q, abs=1e-4)
    # radius along the major axis: Gaussian sigma = r_e / sqrt(2 ln 2)
    assert np.sqrt(eig[1]) == pytest.approx(5.0 / np.sqrt(2 * np.log(2)), rel=1e-4)


def test_unit_total_flux_for_a_small_model():
    stamp = render_sersic(4.0, 0.5, 20.0, 0.2, dtype=np.float64)
    assert stamp.sum() == pytest.approx(1.0, abs=2e-5)
    exact = square_flux(4.0, 0.5, 20.0, 0.2, -C - 0.5, C - 0.5, -C - 0.5, C - 0.5)
    assert stamp.sum() == pytest.approx(exact, rel=1e-6)


def test_flux_falls_off_a_huge_model():
    stamp = render_sersic(4.0, 1.0, 0.0, 50.0, dtype=np.float64)
    inside_circle = enclosed_fraction(4.0, 50.0, C - 0.5)  # circle inscribed in the stamp
    outside_circle = enclosed_fraction(4.0, 50.0, (C + 0.5) * np.sqrt(2))
    assert inside_circle < stamp.sum() < outside_circle < 0.8
    exact = square_flux(4.0, 1.0, 0.0, 50.0, -C - 0.5, C - 0.5, -C - 0.5, C - 0.5)
    assert stamp.sum() == pytest.approx(exact, rel=1e-6)


def test_symmetric_duplicates_render_alike():
    round_ = render_models([4.0] * 3, [1.0] * 3, [0.0, 37.0, 150.0], [2.0] * 3)
    np.testing.assert_allclose(round_[1:], round_[:1].repeat(2, axis=0), rtol=1e-6, atol=1e-12)
    turned = render_models([1.0, 1.0], [0.4, 0.4], [30.0, 210.0], [3.0, 3.0])
    np.testing.assert_allclose(turned[0], turned[1], rtol=1e-6, atol=1e-12)


def test_render_grid_selects_cells():
    grid = ModelGrid(Axis("INDEX", 1.0, 3.0, 2), Axis("AX_RATIO", 0.5, 0.5, 2),
                     Axis("ANGLE", 0.0, 60.0, 2), Axis("LOGR", 0.0, 0.5, 2), boxsize=24)
    stamps = render_grid(grid, [0, 13])
    assert stamps.shape == (2, 24, 24) and stamps.dtype == np.float32
    par = grid.parameters(13)
    one = render_sersic(par["INDEX"], par["AX_RATIO"], par["ANGLE"], 10 ** par["LOGR"], boxsize=24)
    np.testing.assert_array_equal(stamps[1], one)
    assert render_grid(grid).shape == (16, 24, 24)


@pytest.mark.parametrize("bad", [dict(n=0.0), dict(ax_ratio=0.0), dict(ax_ratio=1.2),
                                 dict(r_e=-1.0), dict(r_e=np.nan)])
def test_bad_parameters_raise(bad):
    args = dict(n=4.0, ax_ratio=0.5, angle_deg=0.0, r_e=1.0)
    args.update(bad)
    with pytest.raises(ValueError):
        render_sersic(**args)


@pytest.mark.slow
def test_default_grid_renders_fast_and_sane():
    grid = ModelGrid.default()
    reps, _ = grid.unique_models()
    start = time.perf_counter()
    stamps = render_grid(grid, reps)
    elapsed = time.perf_counter() - start
    assert elapsed < 60.0  # about 5 s on one core of the development machine
    assert np.all(np.isfinite(stamps)) and stamps.min() >= 0
    par = grid.parameters(reps)
    sums = stamps.astype(np.float64).sum(axis=(1, 2))
    assert np.all(sums <= 1 + 1e-5)
    inscribed = enclosed_fraction(4.0, 10 ** par["LOGR"], C - 0.5)
    assert np.all(sums >= inscribed - 1e-5)  # the ellipse of major semi-axis C - 1/2 fits inside


@pytest.mark.parametrize("n, q, angle, r_e", [(4.0, 0.3, 165.0, 2.0), (1.0, 0.1, 100.0, 6.0),
                                              (0.5, 0.6, -30.0, 1.0), (2.5, 0.45, 253.0, 0.4)])
def test_mirrored_angles_match_direct_integration(n, q, angle, r_e):
    """Angles are rendered from their mirror image in [0, 90] (theta and 180 - theta cost one
    integration); the result is the direct integration at ``angle`` to rounding."""
    from dre_hpc.models.sersic import _half_planes, _mirror
    box = 33
    direct = _mirror(_half_planes(n, np.array([q]), np.array([angle]), np.array([r_e]), box), box)[0]
    stamp = render_sersic(n, q, angle, r_e, boxsize=box, dtype=np.float64)
    np.testing.assert_allclose(stamp, direct, rtol=1e-9, atol=1e-300)
    mirror = render_sersic(n, q, 180.0 - angle, r_e, boxsize=box, dtype=np.float64)
    np.testing.assert_array_equal(stamp, mirror[:, ::-1])  # odd box: the mirror is exact


def test_angle_must_be_finite():
    with pytest.raises(ValueError, match="position angle"):
        render_sersic(4.0, 0.5, np.nan, 1.0)
