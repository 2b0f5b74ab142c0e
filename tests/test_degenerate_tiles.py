"""Tiles with nothing to fit end ``done`` with 0 objects and show as such in status, collate and
the report: pure noise (no detection), an image with no valid pixel, an image mostly zero, and a
tile whose detections are all cut away."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

from batch_helpers import dre_batch, make_run, sim_tiles, write_config  # noqa: F401
from dre_hpc.batch.config import load_config
from dre_hpc.batch.prep_job import run_prep
from scratch import scratch_dir

pytestmark = pytest.mark.skipif(shutil.which("psfex") is None, reason="SExtractor/PSFEx not installed")


@pytest.fixture(scope="module")
def empty_tiles(request, tmp_path_factory):
    root = scratch_dir(request, tmp_path_factory, "empty")
    rng = np.random.default_rng(5)
    fits.writeto(root / "noise.fits", rng.normal(100, 3, (300, 300)).astype(np.float32))
    fits.writeto(root / "blank.fits", np.full((300, 300), np.nan, np.float32))
    mostly = rng.normal(100, 3, (300, 300)).astype(np.float32)
    mostly[:, :240] = 0
    fits.writeto(root / "mostly_zero.fits", mostly)
    tiles = root / "tiles.txt"
    tiles.write_text("".join(f"{root / n}.fits\n" for n in ("noise", "blank", "mostly_zero")))
    return tiles


@pytest.mark.slow
def test_empty_tiles_are_done_with_zero_objects(tmp_path, empty_tiles, default_cube_file):
    run = tmp_path / "run"
    config = write_config(tmp_path / "run.yaml", prep={"gain": 1.0})
    assert dre_batch("setup", config, empty_tiles, "--run-dir", run).returncode == 0
    result = dre_batch("run", run)
    # the mostly-zero image has spurious detections along its edge and no star: its prep fails,
    # and says why the image is suspect
    assert result.returncode == 1 and "prep mostly_zero: failed: PSFEx accepted no star" in result.stdout
    assert "(note: 80 % of the image's pixels are NaN, infinite or zero)" in result.stdout
    for tile in ("noise", "blank"):
        prep = json.loads((run / "markers" / "prep" / f"{tile}.done").read_text())
        assert prep["n_objects"] == 0 and prep["psf"] == {"source": "none", "reason": "no object to fit"}
    status = dre_batch("status", run)
    assert "2 tile(s) done with 0 objects (nothing to fit): noise, blank" in status.stdout
    assert "prep blank: the image holds no valid pixel" in status.stdout
    listing = json.loads(dre_batch("status", run, "--json").stdout)
    counts = {t["name"]: t["n_objects"] for t in listing["tiles"]}
    assert counts == {"noise": 0, "blank": 0, "mostly_zero": None}
    assert dre_batch("collate", run, "--allow-missing").returncode == 0
    tiles = Table.read(run / "collated" / "batch_test_dre.fits", hdu="TILES")
    assert list(tiles["TILE"]) == ["noise", "blank"] and list(tiles["ROWS"]) == [0, 0]
    assert list(tiles["PSFSRC"]) == ["none"] * 2
    report = dre_batch("report", run, "--text")
    assert report.returncode == 0, report.stderr
    assert "tile noise: SExtractor detected no object" in report.stdout
    assert "tile blank: the image holds no valid pixel" in report.stdout


def test_a_tile_without_a_galaxy_after_the_cuts(tmp_path, sim_tiles):
    image = sim_tiles.parent / "Tiles" / "tile_a.fits"
    rundir = make_run(tmp_path, [image], ["prep.max_stellarity=0.0"])
    done = run_prep(rundir, load_config(rundir.config), rundir.tiles()[0])
    assert done["n_objects"] == 0 and done["n_chunks"] == 1
    assert "no galaxy left after the cuts" in done["warnings"][0] and "by stellarity" in done["warnings"][0]
    assert not (rundir.root / "tiles" / "tile_a" / "PSF" / "tile_a.psf").exists()
