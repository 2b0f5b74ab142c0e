"""Tests of dre_hpc.models.psf: reading PSFEx ``.psf`` files and FITS image PSFs.

Real PSFEx output is tested by the preprocessing tests (which run SExtractor and PSFEx); here the
``.psf`` format (PSF_DATA binary tables with a PSF_MASK column of shape (1, ncomp, ny, nx) and the
ACCEPTED / PSF_SAMP / PSFAXISn / POLNAXIS keys) is built by hand with astropy.
"""

import logging

import numpy as np
import pytest
from astropy.io import fits

from dre_hpc.errors import InputError, PSFError
from dre_hpc.models.psf import (MAX_PSF_SIDE, image_stem, psf_centre, psf_path_for_image,
                                read_psf, resample_psf)

from helpers import psfex_hdu, write_psfex


def gaussian(n, sigma, dy=0.0, dx=0.0):
    y, x = np.mgrid[:n, :n] - n // 2
    return np.exp(-((x - dx) ** 2 + (y - dy) ** 2) / (2 * sigma ** 2))


def six_components(constant):
    """A degree-2 PSFEx polynomial: the constant term plus 5 other (non-zero) components."""
    rng = np.random.default_rng(1)
    others = rng.normal(0, 0.01, size=(5,) + constant.shape)
    return np.concatenate([constant[None], others])


def test_constant_term_taken_and_normalised(tmp_path):
    constant = 3.0 * gaussian(25, 2.0)
    path = write_psfex(tmp_path / "img.psf", [psfex_hdu(six_components(constant))])
    with fits.open(path) as hdul:  # check the hand-built layout is what astropy gives for PSFEx
        assert hdul[1].data["PSF_MASK"].shape == (1, 6, 25, 25)
    psf = read_psf(path)
    assert psf.dtype == np.float64 and psf.shape == (25, 25)
    np.testing.assert_allclose(psf.sum(), 1.0, rtol=1e-12)
    np.testing.assert_allclose(psf, constant / constant.sum(), rtol=1e-5, atol=1e-9)
    assert np.unravel_index(psf.argmax(), psf.shape) == psf_centre(psf) == (12, 12)


def test_negative_pixels_clipped(tmp_path):
    constant = gaussian(25, 2.0)
    constant[0, :5] = -0.3
    path = write_psfex(tmp_path / "neg.psf", [psfex_hdu(constant[None])])
    psf = read_psf(path)
    assert psf.min() == 0.0 and np.all(psf[0, :5] == 0)
    clipped = np.clip(constant, 0, None)
    np.testing.assert_allclose(psf, clipped / clipped.sum(), rtol=1e-5, atol=1e-9)


def test_extension_selection(tmp_path):
    hdus = [psfex_hdu(gaussian(25, 1.0 + i)[None], accepted=0 if i == 1 else 12) for i in range(3)]
    path = write_psfex(tmp_path / "mef.psf", hdus)
    for ext in (0, 2):
        ref = gaussian(25, 1.0 + ext)
        np.testing.assert_allclose(read_psf(path, ext_number=ext), ref / ref.sum(), rtol=1e-5,
                                   atol=1e-9)
    with pytest.raises(PSFError, match=r"mef.psf.*extension 1.*ACCEPTED = 0.*\[0, 2\]"):
        read_psf(path, ext_number=1)
    with pytest.raises(PSFError, match="no PSF for image extension 5"):
        read_psf(path, ext_number=5)


def test_single_psf_only_for_extension_zero(tmp_path):
    path = write_psfex(tmp_path / "one.psf", [psfex_hdu(gaussian(25, 2.0)[None])])
    assert read_psf(path, ext_number=0).shape == (25, 25)
    with pytest.raises(PSFError, match="single PSF.*extension 3"):
        read_psf(path, ext_number=3)
    bad = write_psfex(tmp_path / "none.psf", [psfex_hdu(gaussian(25, 2.0)[None], accepted=0)])
    with pytest.raises(PSFError, match="ACCEPTED = 0.*none"):
        read_psf(bad)


def second_moment(img):
    """Mean of the x and y variances about the centroid, in pixels^2."""
    y, x = np.mgrid[: img.shape[0], : img.shape[1]]
    total = img.sum()
    cy, cx = (img * y).sum() / total, (img * x).sum() / total
    return 0.5 * ((img * (x - cx) ** 2).sum() + (img * (y - cy) ** 2).sum()) / total, (cy, cx)


def test_oversampled_psf_refused_then_resampled(tmp_path, caplog):
    sigma = 1.5  # image pixels; PSF_SAMP = 0.5 means 2 PSF pixels per image pixel
    path = write_psfex(tmp_path / "fine.psf", [psfex_hdu(gaussian(51, 2 * sigma)[None], samp=0.5)])
    with pytest.raises(PSFError, match=r"sampled at 0\.5 .*PSF_SAMPLING 1\.0.*resample=True"):
        read_psf(path)
    with caplog.at_level(logging.WARNING, logger="dre_hpc.models.psf"):
        psf = read_psf(path, resample=True)
    assert "PSF_SAMP = 0.5" in caplog.text
    assert psf.shape == (25, 25) and psf_centre(psf) == (12, 12)
    var, (cy, cx) = second_moment(psf)
    assert abs(np.sqrt(var) / sigma - 1) < 0.03
    assert abs(cy - 12) < 1e-6 and abs(cx - 12) < 1e-6
    np.testing.assert_allclose(psf.sum(), 1.0)


def test_resample_keeps_offset_centre_physical():
    sigma, samp = 2.0, 0.5
    fine = gaussian(41, sigma / samp, dx=2.0)  # 2 PSF pixels = 1 image pixel to the right
    out = resample_psf(fine, samp)
    _, (cy, cx) = second_moment(out)
    assert abs(cx - (out.shape[1] // 2 + 1.0)) < 0.02 and abs(cy - out.shape[0] // 2) < 1e-6


def test_sampling_close_to_one_accepted(tmp_path):
    path = write_psfex(tmp_path / "ok.psf", [psfex_hdu(gaussian(25, 2)[None], samp=1.0004)])
    assert read_psf(path).shape == (25, 25)


def test_fits_image_psf(tmp_path):
    img = gaussian(33, 2.5)
    fits.PrimaryHDU(img.astype(np.float32)).writeto(tmp_path / "psf.fits")
    psf = read_psf(tmp_path / "psf.fits", ext_number=4)  # ext_number is ignored for images
    np.testing.assert_allclose(psf, img / img.sum(), rtol=1e-6, atol=1e-10)
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(img[None])]).writeto(tmp_path / "psf2.fits")
    np.testing.assert_allclose(read_psf(tmp_path / "psf2.fits"), img / img.sum(), rtol=1e-12)


@pytest.mark.parametrize("data, message", [
    (np.zeros((5, 5)), "zero everywhere"),
    (-np.ones((5, 5)), "zero everywhere"),
    (np.full((5, 5), np.nan), "non-finite"),
    (np.ones((2, 3, 5)), "expected a 2-D PSF"),
    (np.ones((MAX_PSF_SIDE + 1, 3)), "larger than"),
])
def test_bad_image_psfs(tmp_path, data, message):
    fits.PrimaryHDU(data).writeto(tmp_path / "bad.fits")
    with pytest.raises(PSFError, match=message):
        read_psf(tmp_path / "bad.fits")


def test_missing_garbage_and_empty_files(tmp_path):
    with pytest.raises(PSFError, match="does not exist"):
        read_psf(tmp_path / "nope.psf")
    garbage = tmp_path / "garbage.psf"
    garbage.write_bytes(b"this is not a FITS file\n" * 200)
    with pytest.raises(PSFError, match="garbage.psf is not a readable FITS file"):
        read_psf(garbage)
    fits.PrimaryHDU().writeto(tmp_path / "empty.fits")
    with pytest.raises(PSFError, match="holds no PSF"):
        read_psf(tmp_path / "empty.fits")
    table = fits.BinTableHDU.from_columns([fits.Column(name="A", format="E", array=[1.0])])
    fits.HDUList([fits.PrimaryHDU(), table]).writeto(tmp_path / "cat.fits")
    with pytest.raises(PSFError, match="holds no PSF"):
        read_psf(tmp_path / "cat.fits")
    assert issubclass(PSFError, InputError)


def test_psf_centre_even():
    assert psf_centre(np.zeros((24, 26))) == (12, 13)


def test_psf_path_for_image(tmp_path):
    psf_dir = tmp_path / "psfs"
    psf_dir.mkdir()
    (psf_dir / "field1.psf").write_bytes(b"")
    (psf_dir / "field1.fits").write_bytes(b"")
    (psf_dir / "field2.fits").write_bytes(b"")
    assert psf_path_for_image(psf_dir, "data/field1.fits") == psf_dir / "field1.psf"
    assert psf_path_for_image(psf_dir, "field2.fits.fz") == psf_dir / "field2.fits"
    assert psf_path_for_image(psf_dir / "field2.fits", "anything") == psf_dir / "field2.fits"
    assert psf_path_for_image(None, "field1") is None
    with pytest.raises(PSFError, match=r"no PSF for image field3.*field3\.psf.*field3\.fits"):
        psf_path_for_image(psf_dir, "field3.fits")
    with pytest.raises(PSFError, match="does not exist"):
        psf_path_for_image(tmp_path / "missing", "field1")
    assert image_stem("a/b/img.cuts.h5") == "img.cuts"
