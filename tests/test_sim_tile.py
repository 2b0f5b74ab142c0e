"""Simulated survey tiles (dre_hpc.sim.tile) and the dre-sim command."""

import dataclasses

import numpy as np
import pytest
from astropy.io import fits

import dre_hpc
from dre_hpc.cli.dre_sim import main
from dre_hpc.errors import InputError
from dre_hpc.sim.tile import TRUTH_COLUMNS, TileSpec, read_truth, render_tile, simulate_tile
from scratch import scratch_dir

SPEC = TileSpec(size=1024, n_galaxies=40, n_stars=40, seed=7)


@pytest.fixture(scope="module")
def tile(request, tmp_path_factory):
    """The small tile written once: (image path, truth path)."""
    out = scratch_dir(request, tmp_path_factory, "tile")
    return simulate_tile(SPEC, out / "Tiles" / "t.fits", out / "Truth" / "t_truth.fits")


@pytest.fixture(scope="module")
def clean():
    """The noiseless objects of the small tile and its truth."""
    return render_tile(SPEC)


def _nearest(truth):
    xy = np.c_[truth["X"], truth["Y"]]
    dist = np.hypot(*(xy[:, None] - xy[None]).T)
    np.fill_diagonal(dist, np.inf)
    return dist.min(axis=0)


def _box(image, x, y, half):
    """The numpy pixels within `half` of the 1-based FITS position (x, y), and their FITS X, Y."""
    i, j = int(round(x - 1)), int(round(y - 1))
    rows, cols = slice(max(j - half, 0), j + half + 1), slice(max(i - half, 0), i + half + 1)
    yy, xx = np.mgrid[rows, cols]
    return image[rows, cols], xx + 1, yy + 1


def test_image_header_and_shape(tile):
    with fits.open(tile[0]) as hdul:
        header, data = hdul[0].header, hdul[0].data
    assert data.dtype == np.dtype(">f4") and data.shape == (1024, 1024)
    expected = {"GAIN": 4.0, "EXPTIME": 100.0, "MAGZERO": 30.0, "SKYLEVEL": 100.0, "PSF_FWHM": 2.5,
                "PSF_BETA": 3.5, "SEED": 7, "NGAL": 40, "NSTAR": 40, "SKYSIG": 5.0}
    assert {key: header[key] for key in expected} == expected
    assert header["CREATOR"] == f"dre_hpc {dre_hpc.__version__}"
    assert dre_hpc.__version__ in str(header["COMMENT"])


def test_truth_columns_counts_and_ranges(tile):
    truth = read_truth(tile[1])
    assert tuple(truth.colnames) == TRUTH_COLUMNS and len(truth) == 80
    assert list(truth["ID"]) == list(range(1, 81))
    galaxy, star = truth["KIND"] == "galaxy", truth["KIND"] == "star"
    assert galaxy.sum() == 40 and star.sum() == 40
    assert np.all(truth["INDEX"][galaxy] == 4.0) and np.all(np.isnan(truth["LOGR"][star]))
    assert np.all((truth["AX_RATIO"][galaxy] >= 0.15) & (truth["AX_RATIO"][galaxy] <= 1.0))
    assert np.all((truth["LOGR"][galaxy] >= 0.2) & (truth["LOGR"][galaxy] <= 1.1))
    assert np.all((truth["SNR"][star] >= 100) & (truth["SNR"][star] <= 1000))
    np.testing.assert_allclose(truth["MAG"], 30.0 - 2.5 * np.log10(truth["FLUX"]))
    for axis in ("X", "Y"):
        assert truth[axis].min() >= 16.5 and truth[axis].max() <= 1024.5 - 16
    assert _nearest(truth).min() >= 40.0
    assert truth.meta["PSF_FWHM"] == 2.5 and truth.meta["SNR_HI"] == 300.0 and truth.meta["IMAGE"] == "t.fits"


def test_same_seed_same_tile_other_seed_other_tile(tile, tmp_path):
    again = simulate_tile(SPEC, tmp_path / "t.fits", tmp_path / "t_truth.fits")
    assert again[0].read_bytes() == tile[0].read_bytes() and again[1].read_bytes() == tile[1].read_bytes()
    other = simulate_tile(dataclasses.replace(SPEC, seed=8, size=256, n_galaxies=3, n_stars=2),
                          tmp_path / "b.fits", tmp_path / "b_truth.fits")
    assert not np.allclose(read_truth(other[1])["X"], read_truth(tile[1])["X"][:5])


def test_positions_are_fits_pixels_like_sextractor(clean):
    image, truth = clean
    star = truth["KIND"] == "star"
    k = np.flatnonzero(star)[np.argmax(_nearest(truth)[star])]       # the most isolated star
    box, xx, yy = _box(image, truth["X"][k], truth["Y"][k], 15)
    assert abs((box * xx).sum() / box.sum() - truth["X"][k]) < 0.05
    assert abs((box * yy).sum() / box.sum() - truth["Y"][k]) < 0.05
    assert abs(truth["X"][k] - truth["Y"][k]) > 1                     # a transposition would show


def test_optimal_snr_of_isolated_galaxies_matches_truth(clean):
    image, truth = clean
    nearest = _nearest(truth)
    chosen = np.flatnonzero((truth["KIND"] == "galaxy") & (nearest > 80))
    assert len(chosen) >= 5
    for k in chosen:
        box, _, _ = _box(image, truth["X"][k], truth["Y"][k], int(nearest[k] / 2))
        snr = np.sqrt(np.square(box).sum()) / SPEC.sky_sigma
        assert snr == pytest.approx(truth["SNR"][k], rel=0.05)


def test_noise_is_sky_plus_poisson(tile, clean):
    data = fits.getdata(tile[0]).astype(np.float64)
    image, _ = clean
    empty = np.abs(image) < 0.05                                      # 1 % of the sky noise
    assert empty.mean() > 0.5
    assert data[empty].mean() == pytest.approx(100.0, abs=0.05)
    assert data[empty].std() == pytest.approx(np.sqrt(100.0 / 4.0), rel=0.05)
    bright = image > 100.0                                            # where the object noise dominates
    pulls = (data - 100.0 - image) / np.sqrt((100.0 + image) / 4.0)
    assert bright.sum() > 100 and pulls[bright].std() == pytest.approx(1.0, abs=0.1)


def test_crowded_field_is_refused():
    with pytest.raises(InputError, match="cannot place 200 objects at least 40 px apart"):
        render_tile(TileSpec(size=256, n_galaxies=150, n_stars=50))


def test_cli_writes_image_and_truth_where_documented(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["--name", "sim", "--size", "200", "--galaxies", "3", "--stars", "2", "--tiles", "2",
                 "--seed", "11", "--snr", "50", "60"]) == 0
    assert sorted(p.name for p in (tmp_path / "Tiles").iterdir()) == ["sim_000.fits", "sim_001.fits"]
    assert sorted(p.name for p in (tmp_path / "Truth").iterdir()) == ["sim_000_truth.fits", "sim_001_truth.fits"]
    assert [fits.getheader(tmp_path / "Tiles" / f"sim_00{k}.fits")["SEED"] for k in (0, 1)] == [11, 12]
    truth = read_truth(tmp_path / "Truth" / "sim_001_truth.fits")
    assert len(truth) == 5 and truth["SNR"][:3].min() >= 50 and truth["SNR"][:3].max() <= 60
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("Tiles/sim_000.fits: 5 objects")


def test_cli_single_tile_keeps_the_name(tmp_path):
    assert main(["-o", str(tmp_path / "T"), "--truth-dir", str(tmp_path / "U"), "--name", "one",
                 "--size", "128", "--galaxies", "1", "--stars", "0"]) == 0
    assert (tmp_path / "T" / "one.fits").is_file() and len(read_truth(tmp_path / "U" / "one_truth.fits")) == 1


@pytest.mark.parametrize("argv, option", [
    (["--size", "32"], "--size"), (["--size", "abc"], "--size"), (["--galaxies", "-1"], "--galaxies"),
    (["--stars", "2.5"], "--stars"), (["--snr", "300", "20"], "--snr"), (["--logr", "0", "nan"], "--logr"),
    (["--ax-ratio", "0", "1"], "--ax-ratio"), (["--index", "4", "9"], "--index"), (["--gain", "0"], "--gain"),
    (["--sky", "-1"], "--sky"), (["--psf-fwhm", "x"], "--psf-fwhm"), (["--tiles", "0"], "--tiles"),
])
def test_cli_rejects_bad_options_in_one_line(tmp_path, capsys, argv, option):
    assert main(argv + ["-o", str(tmp_path / "T"), "--truth-dir", str(tmp_path / "U")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dre-sim: error: " + option)
    assert not (tmp_path / "T").exists()
