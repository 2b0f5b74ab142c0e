"""sex_dre with the real SExtractor on a simulated tile: outputs, positions, gain, bad inputs."""

from __future__ import annotations

import logging
import os
import shutil

import numpy as np
import pytest
from astropy.io import fits

from dre_hpc.cli import sex_dre
from dre_hpc.errors import InputError, ToolError, ToolNotFoundError
from dre_hpc.io.catalog import find_catalog, read_catalog
from dre_hpc.preprocess.layout import list_tile_images as list_images
from dre_hpc.preprocess.sextractor import (SexOptions, output_paths, resolve_gain,
                                           run_sextractor, sextract_all)
from dre_hpc.preprocess.tools import config_path, find_tool, run_tool
from scratch import scratch_dir

N_STARS, N_GALAXIES, SIZE = 40, 15, 768
COLUMNS = ("NUMBER", "EXT_NUMBER", "X_IMAGE", "Y_IMAGE", "XWIN_IMAGE", "YWIN_IMAGE", "A_IMAGE",
           "B_IMAGE", "THETA_IMAGE", "ELONGATION", "FLUX_AUTO", "FLUXERR_AUTO", "MAG_AUTO",
           "MAGERR_AUTO", "FLUX_APER", "FLUXERR_APER", "FLUX_RADIUS", "SNR_WIN", "CLASS_STAR",
           "FLAGS", "FWHM_IMAGE", "BACKGROUND", "VIGNET")

pytestmark = pytest.mark.skipif(shutil.which("source-extractor") is None and shutil.which("sex") is None,
                                reason="SExtractor is not installed (bin/install-system-packages)")


@pytest.fixture(scope="module")
def tile(request, tmp_path_factory):
    """A 768x768 simulated tile: 40 Moffat stars (FWHM 2.5 px, S/N 100-1000), 15 Sersic galaxies,
    sky 100 ADU, gain 4 e-/ADU, EXPTIME 100 s; returns (Tiles dir, truth table)."""
    from dre_hpc.sim.tile import TileSpec, read_truth, simulate_tile
    root = scratch_dir(request, tmp_path_factory, "sex_tile")
    spec = TileSpec(size=SIZE, n_galaxies=N_GALAXIES, n_stars=N_STARS, seed=11)
    simulate_tile(spec, root / "Tiles" / "tile.fits", root / "truth.fits")
    return root / "Tiles", read_truth(root / "truth.fits")


@pytest.fixture(scope="module")
def sextracted(request, tile, tmp_path_factory):
    out = scratch_dir(request, tmp_path_factory, "sex_out") / "Sextracted"
    done, failed = sextract_all(tile[0], out)
    assert not failed and len(done) == 1
    return done[0]


def test_outputs_named_and_ldac(sextracted, tile):
    out = sextracted
    assert out.catalog.name == "tile_cat.fits"
    for path, suffix in ((out.nb, "_nb"), (out.rms, "_rms"), (out.seg, "_seg")):
        assert path == out.catalog.parent / f"tile{suffix}.fits" and path.is_file()
        assert fits.getdata(path).shape == (SIZE, SIZE)
    assert not list(out.catalog.parent.glob("*.part")) and not list(out.catalog.parent.glob(".*"))
    with fits.open(out.catalog) as hdul:
        assert [h.name for h in hdul] == ["PRIMARY", "LDAC_IMHEAD", "LDAC_OBJECTS"]
        data = hdul["LDAC_OBJECTS"].data
        assert set(COLUMNS) <= set(data.columns.names)
        assert data["VIGNET"].shape[1:] == (35, 35)
        assert set(data["EXT_NUMBER"]) == {1}          # what SExtractor writes for a one-HDU image
    assert np.median(fits.getdata(out.nb)) == pytest.approx(0.0, abs=1.0)     # sky 100 removed
    assert np.median(fits.getdata(out.rms)) == pytest.approx(5.0, rel=0.1)    # sqrt(100 / 4)
    assert find_catalog(out.catalog.parent, "tile") == out.catalog
    assert len(read_catalog(out.catalog)) == out.n_objects


def test_stars_and_galaxies_detected_at_their_positions(sextracted, tile):
    truth = tile[1]
    cat = read_catalog(sextracted.catalog)
    xy = np.c_[cat["X_IMAGE"], cat["Y_IMAGE"]]
    for kind, needed in (("star", 0.95), ("galaxy", 0.9)):
        rows = truth[truth["KIND"] == kind]
        dist = np.hypot(*(xy[None, :, :] - np.c_[rows["X"], rows["Y"]][:, None, :]).transpose(2, 0, 1))
        assert np.mean(dist.min(axis=1) < 1.0) >= needed, kind


def test_subdir_layout_and_gain_in_catalogue_header(tile, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    out = tmp_path / "Sextracted"
    assert sex_dre.main(["-i", str(tile[0]), "-o", str(out), "--subdir", "--gain", "cps"]) == 0
    paths = output_paths(out, "tile", subdir=True)
    assert all(p.is_file() for p in paths.values())
    assert paths["cat"] == out / "tile" / "tile_cat.fits"
    assert find_catalog(out, "tile") == paths["cat"]
    cards = fits.getdata(paths["cat"], "LDAC_IMHEAD")[0][0]       # the image header, one card a row
    header = fits.Header.fromstring("".join(str(card).ljust(80) for card in cards))
    assert header["SEXGAIN"] == pytest.approx(400.0)                 # 4 e-/ADU x 100 s
    assert any("(1/1) tile.fits" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("header, mode, key, expected", [
    ({"GAIN": 4.0, "EXPTIME": 100.0}, "counts", "auto", 4.0),
    ({"GAIN": 4.0, "EXPTIME": 100.0}, "cps", "auto", 400.0),
    ({"GAIN": 4.0}, "2.5", "auto", 2.5),
    ({}, 3.0, "auto", 3.0),
    ({"CCDGAIN": 1.5}, "counts", "auto", 1.5),
    ({"GAIN": 4.0, "EGAIN": 2.0}, "counts", "egain", 2.0),
    ({"GAIN": 0.0}, "counts", "auto", 0.0),
])
def test_resolve_gain(header, mode, key, expected):
    assert resolve_gain(fits.Header(header), mode, key) == pytest.approx(expected)


@pytest.mark.parametrize("header, mode, key, words", [
    ({"EXPTIME": 1.0}, "counts", "auto", ["t.fits", "none", "--gain"]),
    ({"GAINA": 1.0, "GAINB": 2.0}, "counts", "auto", ["t.fits", "GAINA, GAINB"]),
    ({"GAIN": 4.0}, "cps", "auto", ["t.fits", "EXPTIME"]),
    ({"GAIN": 4.0}, "counts", "EGAIN", ["t.fits", "EGAIN"]),
    ({"GAIN": "high"}, "counts", "auto", ["t.fits", "GAIN", "not a number"]),
    ({"GAIN": -1.0}, "counts", "auto", ["t.fits", "-1"]),
    ({"GAIN": 4.0}, "adu", "auto", ["'adu'", "counts"]),
])
def test_resolve_gain_errors(header, mode, key, words):
    with pytest.raises(InputError) as info:
        resolve_gain(fits.Header(header), mode, key, source="t.fits")
    assert all(w in str(info.value) for w in words)


def test_compressed_tile_is_unpacked(tile, tmp_path):
    with fits.open(tile[0] / "tile.fits") as hdul:
        fits.CompImageHDU(hdul[0].data, hdul[0].header).writeto(tmp_path / "packed.fits.fz")
    out = run_sextractor(tmp_path / "packed.fits.fz", tmp_path / "S")
    assert out.catalog == tmp_path / "S" / "packed_cat.fits" and out.n_objects >= N_STARS
    assert fits.getdata(out.seg).shape == (SIZE, SIZE)
    assert sorted(p.name for p in (tmp_path / "S").iterdir()) == [
        "packed_cat.fits", "packed_nb.fits", "packed_rms.fits", "packed_seg.fits"]


def test_corrupt_fits_among_good_tiles(tile, tmp_path, caplog, capsys):
    tiles = tmp_path / "Tiles"
    tiles.mkdir()
    shutil.copy(tile[0] / "tile.fits", tiles / "good.fits")
    (tiles / "bad.fits").write_bytes(b"SIMPLE  =  garbage, not FITS" * 50)
    (tiles / "good_wht.fits").write_bytes(b"")              # a weight map, never a tile
    assert [p.name for p in list_images(tiles)] == ["bad.fits", "good.fits"]
    assert sex_dre.main(["-i", str(tiles), "-o", str(tmp_path / "Sextracted")]) == 1
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert any("bad.fits" in m and "not a readable FITS file" in m and "\n" not in m for m in errors)
    assert any("FAILED" in m and "bad.fits" in m for m in errors)
    assert (tmp_path / "Sextracted" / "good_cat.fits").is_file()
    assert not (tmp_path / "Sextracted" / "bad_cat.fits").exists()


@pytest.mark.parametrize("make, words", [
    (lambda p: None, ["does not exist"]),
    (lambda p: p.mkdir(), ["no images"]),
])
def test_missing_or_empty_input_dir(tmp_path, capsys, make, words):
    make(tmp_path / "Tiles")
    assert sex_dre.main(["-i", str(tmp_path / "Tiles"), "-o", str(tmp_path / "S")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sex_dre: error:") and str(tmp_path / "Tiles") in err
    assert all(w in err for w in words)


@pytest.mark.parametrize("args, words", [
    (["--set", "DETECT_THRESH"], "KEY=VALUE"),
    (["--set", "CATALOG_TYPE=ASCII"], "CATALOG_TYPE"),
    (["--set", "GAIN=3"], "--gain"),
    (["--gain", "lots"], "'lots'"),
    (["--flags", "no-such-dir"], "no-such-dir"),
    (["-c", "no-such.sex"], "no-such.sex"),
])
def test_bad_options_fail_up_front(tile, tmp_path, capsys, args, words):
    assert sex_dre.main(["-i", str(tile[0]), "-o", str(tmp_path / "S")] + args) == 2
    assert words in capsys.readouterr().err and not (tmp_path / "S").exists()


def test_settings_and_short_parameter_file(tile, tmp_path, caplog):
    param = tmp_path / "short.param"
    param.write_text("NUMBER\nX_IMAGE\nY_IMAGE\n")
    assert sex_dre.main(["-i", str(tile[0]), "-o", str(tmp_path / "S"), "-p", str(param),
                         "--set", "DETECT_THRESH=50"]) == 0
    cat = read_catalog(tmp_path / "S" / "tile_cat.fits")
    assert cat.colnames == ["NUMBER", "X_IMAGE", "Y_IMAGE"] and 0 < len(cat) < N_STARS + N_GALAXIES
    assert any("VIGNET" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")


def test_weight_and_flag_maps(tile, tmp_path, caplog):
    weights, flags = tmp_path / "weights", tmp_path / "flags"
    weights.mkdir(), flags.mkdir()
    args = ["-i", str(tile[0]), "-o", str(tmp_path / "S"), "--weights", str(weights)]
    assert sex_dre.main(args) == 1                          # the weight map is missing
    assert any(str(weights / "tile_wht.fits") in r.getMessage() for r in caplog.records)
    fits.PrimaryHDU(np.ones((SIZE, SIZE), np.float32)).writeto(weights / "tile_wht.fits")
    fits.PrimaryHDU(np.zeros((SIZE, SIZE), np.int16)).writeto(flags / "tile_flag.fits")
    assert sex_dre.main(args + ["--flags", str(flags)]) == 0
    cat = read_catalog(tmp_path / "S" / "tile_cat.fits")
    assert "IMAFLAGS_ISO" in cat.colnames and not cat["IMAFLAGS_ISO"].any()
    assert not list((tmp_path / "S").glob(".*"))            # the parameter-file copy is gone


def _failing_tool(tmp_path):
    script = tmp_path / "fake-sextractor"
    script.write_text("#!/bin/sh\necho 'half a line' > \"$(dirname \"$0\")/ran\"\n"
                      "echo 'Error: boom happened' >&2\nexit 3\n")
    script.chmod(0o755)
    return script


def test_tool_exits_nonzero(tile, tmp_path, capsys):
    script = _failing_tool(tmp_path)
    out = tmp_path / "S"
    stale = output_paths(out, "tile")
    out.mkdir()
    for path in stale.values():                             # outputs of an earlier run
        path.write_bytes(b"old")
    with pytest.raises(ToolError) as info:
        run_sextractor(tile[0] / "tile.fits", out, SexOptions(executable=str(script)))
    message = str(info.value)
    assert str(script) in message and "code 3" in message and "boom happened" in message
    assert info.value.returncode == 3 and (tmp_path / "ran").is_file()
    assert not list(out.iterdir())                          # nothing half-done, nothing stale
    assert sex_dre.main(["-i", str(tile[0]), "-o", str(out), "--sextractor", str(script)]) == 1


def test_tool_not_found(tmp_path, monkeypatch, tile, capsys):
    fake = tmp_path / "bin"
    fake.mkdir()
    impostor = fake / "sex"                                  # an unrelated program called sex
    impostor.write_text("#!/bin/sh\necho 'sex: the other tool, version 1.0'\n")
    impostor.chmod(0o755)
    monkeypatch.setenv("PATH", str(fake))
    monkeypatch.delenv("DRE_SEXTRACTOR", raising=False)
    with pytest.raises(ToolNotFoundError) as info:
        find_tool("sextractor")
    assert all(name in str(info.value) for name in ("source-extractor", "sex", "sextractor", "apt-get"))
    assert sex_dre.main(["-i", str(tile[0]), "-o", str(tmp_path / "S")]) == 2
    assert "source-extractor" in capsys.readouterr().err


def test_find_tool_configured_paths(tmp_path, monkeypatch):
    real = shutil.which("source-extractor") or shutil.which("sex")
    monkeypatch.setenv("DRE_SEXTRACTOR", real)
    assert find_tool("sextractor") == real
    plain = tmp_path / "not-executable"
    plain.write_text("")
    with pytest.raises(ToolNotFoundError, match="not executable"):
        find_tool("sextractor", plain)
    with pytest.raises(ToolNotFoundError, match="does not exist"):
        find_tool("psfex", tmp_path / "missing")


def test_run_tool_log_and_unexecutable(tmp_path):
    log = tmp_path / "tool.log"
    result = run_tool(["sh", "-c", "echo out; echo err >&2"], log_file=log)
    assert (result.returncode, result.stdout.strip(), result.stderr.strip()) == (0, "out", "err")
    assert "$ sh -c" in log.read_text() and "err" in log.read_text()
    with pytest.raises(ToolError, match="cannot execute"):
        run_tool([str(tmp_path / "nothing-here")])


def test_shipped_configuration():
    params = config_path("sextractor/dre.param").read_text().split()
    assert {"VIGNET(35,35)", "FLUX_APER(1)", "FLUXERR_APER(1)", "SNR_WIN"} <= set(params)
    sex = config_path("sextractor/dre.sex").read_text()
    assert "FITS_LDAC" in sex and sex.startswith("# Default configuration file for SExtractor")
    assert os.path.isfile(config_path("sextractor/default.nnw"))
    with pytest.raises(ToolNotFoundError):
        config_path("sextractor/nothing.sex")
