"""Per-tile photometry from the FITS headers: ``fit.zero_point``, ``fit.gain`` and ``prep.gain``
as ``header:KEY``; a tile missing the key fails with the key and the file."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

from batch_helpers import dre_batch, make_run, sim_tiles, write_config  # noqa: F401
from dre_hpc.batch.config import ConfigError, load_config, resolve
from dre_hpc.batch.fit_job import provenance, tile_photometry
from dre_hpc.batch.prep_job import run_prep
from dre_hpc.errors import InputError
from dre_hpc.preprocess.sextractor import resolve_gain

tools = pytest.mark.skipif(shutil.which("psfex") is None, reason="SExtractor/PSFEx not installed")
HEADER = ["fit.zero_point=header:magzero", "fit.gain=header:GAIN", "prep.gain=header:GAIN"]


def test_config_accepts_header_keys_and_numbers():
    cfg = resolve(None, HEADER)
    assert cfg.fit["zero_point"] == "header:MAGZERO"
    assert cfg.fit["gain"] == cfg.prep["gain"] == "header:GAIN"
    assert resolve(None, ["fit.zero_point=25"]).fit["zero_point"] == 25.0
    for bad in ("fit.zero_point=header:", "fit.gain=header:WAY_TOO_LONG", "prep.gain=headers"):
        with pytest.raises(ConfigError, match="header:KEY"):
            resolve(None, [bad])


def test_prep_gain_from_a_header_key():
    assert resolve_gain({"EGAIN": 2.5}, "header:EGAIN", source="t.fits") == 2.5
    with pytest.raises(InputError, match="t.fits: header key EGAIN is missing"):
        resolve_gain({"GAIN": 2.5}, "header:EGAIN", source="t.fits")


@tools
def test_prep_records_each_tiles_values_and_the_fit_uses_them(tmp_path, sim_tiles):
    image = sim_tiles.parent / "Tiles" / "tile_a.fits"
    rundir = make_run(tmp_path, [image], HEADER + ["prep.margin=40"])
    config = load_config(rundir.config)
    done = run_prep(rundir, config, rundir.tiles()[0])
    assert done["photometry"] == {"zero_point": 30.0, "gain": 4.0}
    assert tile_photometry(config, done) == {"zero_point": 30.0, "gain": 4.0}
    cards = provenance(config, rundir.tiles()[0], 0, 1, (0, 1), "tiles/x.psf", done)
    assert (cards["ZEROPT"], cards["GAIN"], cards["PSFSRC"]) == (30.0, 4.0, "psfex")


@tools
def test_a_tile_missing_the_key_fails_naming_key_and_file(tmp_path, sim_tiles):
    image = sim_tiles.parent / "Tiles" / "tile_a.fits"
    rundir = make_run(tmp_path, [image], ["fit.zero_point=header:ZPT_AB"])
    with pytest.raises(InputError, match=r"tile_a.fits: header key ZPT_AB is missing \(fit.zero_point"):
        run_prep(rundir, load_config(rundir.config), rundir.tiles()[0])
    assert not (rundir.root / "tiles" / "tile_a").exists()


@tools
@pytest.mark.slow
def test_two_tiles_with_their_own_zero_points(tmp_path, sim_tiles, default_cube_file):
    """MAG uses each tile's MAGZERO; the flat catalogue's TILES extension lists both."""
    tile_b = tmp_path / "tile_b.fits"
    with fits.open(sim_tiles.parent / "Tiles" / "tile_b.fits") as hdul:
        hdul[0].header["MAGZERO"] = 25.0
        hdul.writeto(tile_b)
    tiles = tmp_path / "tiles.txt"
    tiles.write_text(f"{sim_tiles.parent / 'Tiles' / 'tile_a.fits'}\n{tile_b}\n")
    config = write_config(tmp_path / "run.yaml", chunks_per_tile=1, fit={"zero_point": "header:MAGZERO"},
                          prep={"margin": 40})
    run = tmp_path / "run"
    assert dre_batch("setup", config, tiles, "--run-dir", run).returncode == 0
    result = dre_batch("run", run)
    assert result.returncode == 0, result.stdout + result.stderr
    assert dre_batch("collate", run).returncode == 0
    flat = run / "collated" / "batch_test_dre.fits"
    listing = Table.read(flat, hdu="TILES")
    assert dict(zip(listing["TILE"], listing["ZEROPT"])) == {"tile_a": "30.0", "tile_b": "25.0"}
    assert fits.getheader(flat, 1)["ZEROPT"] == "header:MAGZERO"
    cat = Table.read(flat, hdu=1)
    for tile, zp in (("tile_a", 30.0), ("tile_b", 25.0)):
        rows = cat[(np.char.strip(np.asarray(cat["TILE"], str)) == tile) & (np.asarray(cat["FLUX"]) > 0)]
        assert len(rows) and np.allclose(rows["MAG"], zp - 2.5 * np.log10(rows["FLUX"]), atol=1e-4)
    prep = json.loads((run / "markers" / "prep" / "tile_b.done").read_text())
    assert prep["photometry"]["zero_point"] == 25.0
