"""psfex_dre with the real SExtractor and PSFEx on simulated tiles: the PSF dre reads, bad inputs.

FWHM of a PSF (`fitted_fwhm`): least-squares fit to the PSFEx constant term (as `read_psf` returns
it, unit sum) of a GalSim Moffat with the simulation's beta, drawn pixel-integrated on the same
25x25 grid (GalSim's default method, like PSFEx's model of the pixelised stars), with free FWHM,
sub-pixel centre and amplitude. Its FWHM is compared with the simulated Moffat's.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from astropy.io import fits
from helpers import psfex_hdu, write_psfex

from dre_hpc.cli import psfex_dre
from dre_hpc.errors import PSFError, ToolError, ToolNotFoundError
from dre_hpc.io.catalog import read_catalog
from dre_hpc.models.psf import psf_path_for_image, read_psf
from dre_hpc.preprocess.psfex import check_psf, psfex_all, run_psfex, star_fwhm_range
from dre_hpc.preprocess.sextractor import run_sextractor
from dre_hpc.preprocess.tools import find_tool
from scratch import scratch_dir

N_STARS = 40

pytestmark = pytest.mark.skipif(shutil.which("psfex") is None or (shutil.which("source-extractor") or
                                                                  shutil.which("sex")) is None,
                                reason="SExtractor/PSFEx not installed (bin/install-system-packages)")


def simulate(root, **spec):
    """Tiles/tile.fits under `root`, its truth table and its TileSpec."""
    from dre_hpc.sim.tile import TileSpec, read_truth, simulate_tile
    spec = TileSpec(**spec)
    simulate_tile(spec, root / "Tiles" / "tile.fits", root / "truth.fits")
    return root / "Tiles" / "tile.fits", read_truth(root / "truth.fits"), spec


def fitted_fwhm(psf, beta):
    """FWHM of the pixel-integrated Moffat (given beta) that best fits `psf` (see the module doc)."""
    import galsim
    from scipy.optimize import least_squares
    ny, nx = psf.shape

    def residual(p):
        fwhm, dx, dy, amplitude = p
        model = galsim.Moffat(beta=beta, fwhm=fwhm).shift(dx, dy).drawImage(nx=nx, ny=ny, scale=1.0)
        return (amplitude * model.array - psf).ravel()
    return least_squares(residual, [3.0, 0, 0, 1], bounds=([0.5, -2, -2, 0.1], [15, 2, 2, 10])).x[0]


@pytest.fixture(scope="module")
def prepared(request, tmp_path_factory):
    """A 768x768 tile (40 stars FWHM 2.5 px S/N 100-1000, 15 galaxies) through sex_dre and psfex_dre."""
    root = scratch_dir(request, tmp_path_factory, "psfex_tile")
    image, truth, spec = simulate(root, size=768, n_galaxies=15, n_stars=N_STARS, seed=12)
    catalog = run_sextractor(image, root / "Sextracted").catalog
    done, failed = psfex_all(root / "Sextracted", root / "PSF")
    assert not failed and done == [root / "PSF" / "tile.psf"]
    return root, catalog, truth, spec


def test_psf_sampled_at_pixels_from_the_stars(prepared):
    root, _, _, _ = prepared
    assert sorted(p.name for p in (root / "PSF").iterdir()) == ["tile.psf"]    # no temporary left
    with fits.open(root / "PSF" / "tile.psf") as hdul:
        header = hdul["PSF_DATA"].header
        assert header["PSF_SAMP"] == 1.0 and header["POLNAXIS"] == 0          # PSFVAR_DEGREES 0
        assert (header["PSFAXIS1"], header["PSFAXIS2"], header["PSFAXIS3"]) == (25, 25, 1)
        assert 0.8 * N_STARS <= header["ACCEPTED"] <= N_STARS                  # stars, no galaxy
    assert check_psf(root / "PSF" / "tile.psf", "tile_cat.fits") == [header["ACCEPTED"]]


def test_fwhm_of_constant_term_matches_truth(prepared):
    root, _, _, spec = prepared
    psf = read_psf(psf_path_for_image(root / "PSF", "tile.fits"))
    assert psf.shape == (25, 25) and np.unravel_index(psf.argmax(), psf.shape) == (12, 12)
    assert fitted_fwhm(psf, spec.psf_beta) == pytest.approx(spec.psf_fwhm, rel=0.10)


def test_star_fwhm_range_brackets_the_stars_only(prepared):
    _, catalog, truth, _ = prepared
    cat = read_catalog(catalog)
    xy = np.c_[cat["X_IMAGE"], cat["Y_IMAGE"]]
    low, high, count = star_fwhm_range(catalog)
    for kind in ("star", "galaxy"):
        rows = truth[truth["KIND"] == kind]
        nearest = [np.argmin(np.hypot(*(xy - (x, y)).T)) for x, y in zip(rows["X"], rows["Y"])]
        fwhm = 2 * np.asarray(cat["FLUX_RADIUS"])[nearest]
        inside = (fwhm >= low) & (fwhm <= high)
        assert inside.mean() >= 0.9 if kind == "star" else not inside.any()
    assert 0.8 * N_STARS <= count <= N_STARS


def test_galaxy_rich_tile_gets_the_stellar_psf(tmp_path):
    """150 galaxies, 15 stars: PSFEx's densest-quarter selection would take galaxies."""
    image, _, spec = simulate(tmp_path, size=1024, n_galaxies=150, n_stars=15, seed=5, min_separation=30)
    catalog = run_sextractor(image, tmp_path / "Sextracted").catalog
    psf_file = run_psfex(catalog, tmp_path / "PSF")
    assert fits.getheader(psf_file, "PSF_DATA")["ACCEPTED"] <= 15
    assert fitted_fwhm(read_psf(psf_file), spec.psf_beta) == pytest.approx(spec.psf_fwhm, rel=0.05)


def test_multi_extension_tile(prepared, tmp_path):
    """EXT_NUMBER counts image HDUs from 1; PSFEx writes PSF_DATA HDU k for extension k."""
    root, _, _, _ = prepared
    data = fits.getdata(root / "Tiles" / "tile.fits")
    fits.HDUList([fits.PrimaryHDU(header=fits.getheader(root / "Tiles" / "tile.fits")),
                  fits.ImageHDU(data), fits.ImageHDU(data[::-1])]).writeto(tmp_path / "mef.fits")
    catalog = run_sextractor(tmp_path / "mef.fits", tmp_path / "S").catalog
    with fits.open(catalog) as hdul:
        assert [set(h.data["EXT_NUMBER"]) for h in hdul if h.name == "LDAC_OBJECTS"] == [{1}, {2}]
    psf_file = run_psfex(catalog, tmp_path / "P")
    assert check_psf(psf_file, catalog) == [fits.getheader(psf_file, k)["ACCEPTED"] for k in (1, 2)]
    assert read_psf(psf_file, ext_number=1).shape == (25, 25)   # 0-based: the second extension


def test_subdir_catalogues_and_forced_settings(prepared, tmp_path, monkeypatch):
    root, catalog, _, _ = prepared
    (tmp_path / "S" / "tile").mkdir(parents=True)
    shutil.copy(catalog, tmp_path / "S" / "tile" / "tile_cat.fits")
    noisy = tmp_path / "noisy.psfex"                       # plots, XML and check images asked for
    noisy.write_text("PSF_SAMPLING 1.0\nPSF_SIZE 25,25\nPSFVAR_DEGREES 0\nCHECKPLOT_DEV PNG\n"
                     "WRITE_XML Y\nCHECKIMAGE_TYPE CHI,PROTOTYPES\n")
    monkeypatch.chdir(tmp_path)
    assert psfex_dre.main(["-i", "S", "-o", "P", "-c", str(noisy)]) == 0
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["noisy.psfex", "tile.psf",
                                                                          "tile_cat.fits"]


def test_corrupt_catalogue_among_good(prepared, tmp_path, caplog):
    _, catalog, _, _ = prepared
    (tmp_path / "S").mkdir()
    shutil.copy(catalog, tmp_path / "S" / "good_cat.fits")
    (tmp_path / "S" / "bad_cat.fits").write_bytes(b"not a catalogue" * 100)
    assert psfex_dre.main(["-i", str(tmp_path / "S"), "-o", str(tmp_path / "P")]) == 1
    assert (tmp_path / "P" / "good.psf").is_file() and not (tmp_path / "P" / "bad.psf").exists()
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert any("bad_cat.fits" in m and "\n" not in m for m in errors)


def test_no_star_accepted(prepared, tmp_path):
    _, catalog, _, _ = prepared
    with fits.open(catalog) as hdul:
        hdul["LDAC_OBJECTS"].data["FLAGS"][:] = 2          # every source flagged: no candidate
        hdul.writeto(tmp_path / "flagged_cat.fits")
    with pytest.raises(PSFError) as info:
        run_psfex(tmp_path / "flagged_cat.fits", tmp_path / "P")
    assert "flagged_cat.fits" in str(info.value) and "accepted no star" in str(info.value)
    assert not list((tmp_path / "P").iterdir())


@pytest.mark.parametrize("samp, accepted, words", [(0.5, 10, "PSF_SAMPLING 1.0"), (1.0, 0, "no star")])
def test_check_psf_refuses(tmp_path, samp, accepted, words):
    path = write_psfex(tmp_path / "x.psf", [psfex_hdu(np.ones((1, 25, 25)), accepted, samp)])
    with pytest.raises(PSFError, match=words):
        check_psf(path, "x_cat.fits")


@pytest.mark.parametrize("make", [lambda p: None, lambda p: p.mkdir()])
def test_missing_or_empty_input_dir(tmp_path, capsys, make):
    make(tmp_path / "S")
    assert psfex_dre.main(["-i", str(tmp_path / "S"), "-o", str(tmp_path / "P")]) == 2
    assert str(tmp_path / "S") in capsys.readouterr().err


def test_psfex_exits_nonzero(prepared, tmp_path):
    _, catalog, _, _ = prepared
    script = tmp_path / "fake-psfex"
    script.write_text("#!/bin/sh\necho 'Error: psfex exploded' >&2\nexit 3\n")
    script.chmod(0o755)
    with pytest.raises(ToolError) as info:
        run_psfex(catalog, tmp_path / "P", executable=str(script))
    assert str(script) in str(info.value) and "code 3" in str(info.value) and "exploded" in str(info.value)
    assert not list((tmp_path / "P").iterdir())
    assert psfex_dre.main(["-i", str(catalog.parent), "-o", str(tmp_path / "P"), "--psfex", str(script)]) == 1


def test_psfex_not_found(prepared, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("DRE_PSFEX", raising=False)
    with pytest.raises(ToolNotFoundError, match="psfex"):
        find_tool("psfex")
    assert psfex_dre.main(["-i", str(prepared[1].parent), "-o", str(tmp_path / "P")]) == 2
    assert "PSFEx not found" in capsys.readouterr().err

