"""PSFs from the user: ``prep.psf`` (one file for every tile, or a directory per tile), a
tiles-file ``psf=PATH``, and ``prep.psf_fallback``; PSFEx is skipped where the user gives one, and
the PSF each tile used is recorded."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from astropy.io import fits

from batch_helpers import dre_batch, make_run, sim_tiles, write_config  # noqa: F401
from dre_hpc.batch.config import load_config
from dre_hpc.batch.prep_job import run_prep
from dre_hpc.errors import InputError

pytestmark = pytest.mark.skipif(shutil.which("psfex") is None, reason="SExtractor/PSFEx not installed")


def gaussian(path, fwhm=2.5):
    y, x = np.mgrid[-12:13, -12:13]
    psf = np.exp(-(x * x + y * y) / (2 * (fwhm / 2.3548) ** 2))
    fits.writeto(path, (psf / psf.sum()).astype(np.float32))
    return path


def prep_with(tmp_path, image, overrides, name="run", entry=None):
    rundir = make_run(tmp_path, [image], overrides, name=name)
    if entry:
        import json
        manifest = json.loads(rundir.manifest.read_text())
        manifest["tiles"][0].update(entry)
        rundir.manifest.write_text(json.dumps(manifest))
    return rundir, run_prep(rundir, load_config(rundir.config), rundir.tiles()[0])


def test_one_psf_file_for_every_tile_skips_psfex(tmp_path, sim_tiles):
    image = sim_tiles.parent / "Tiles" / "tile_a.fits"
    psf = gaussian(tmp_path / "survey_psf.fits")
    rundir, done = prep_with(tmp_path, image, [f"prep.psf={psf}", "prep.margin=40"])
    assert done["psf"] == {"source": "user", "file": str(psf), "origin": "prep.psf"}
    product = rundir.root / "tiles" / "tile_a" / "PSF" / "tile_a.psf"
    assert product.read_bytes() == psf.read_bytes()
    assert not list(product.parent.glob(".psfex_*")) and done["seeing"]["source"].startswith("stellar locus")


def test_a_directory_of_psfs_and_a_tiles_file_psf(tmp_path, sim_tiles):
    image = sim_tiles.parent / "Tiles" / "tile_a.fits"
    (tmp_path / "psfs").mkdir()
    own = gaussian(tmp_path / "psfs" / "tile_a.fits")
    _, done = prep_with(tmp_path, image, [f"prep.psf={tmp_path / 'psfs'}", "prep.margin=40"])
    assert done["psf"]["file"] == str(own)
    line = gaussian(tmp_path / "line_psf.fits", 3.0)
    _, done = prep_with(tmp_path, image, [f"prep.psf={tmp_path / 'psfs'}", "prep.margin=40"], name="line",
                        entry={"psf": str(line)})
    assert done["psf"] == {"source": "user", "file": str(line), "origin": "tiles file"}


def test_a_missing_or_bad_user_psf_is_a_clear_error(tmp_path, sim_tiles):
    image = sim_tiles.parent / "Tiles" / "tile_a.fits"
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="prep.psf: no PSF for image .*tile_a.psf"):
        prep_with(tmp_path, image, [f"prep.psf={tmp_path / 'empty'}"])
    (tmp_path / "bad.psf").write_text("not a PSF")
    with pytest.raises(InputError, match="prep.psf: PSF file .*bad.psf"):
        prep_with(tmp_path, image, [f"prep.psf={tmp_path / 'bad.psf'}"], name="bad")
    config = write_config(tmp_path / "run.yaml", prep={"psf_fallback": "nowhere.fits"})
    tiles = tmp_path / "tiles.txt"
    tiles.write_text(f"{image}\n")
    result = dre_batch("setup", config, tiles, "--run-dir", tmp_path / "setup")
    assert result.returncode != 0 and "prep.psf_fallback: 'nowhere.fits' not found" in result.stderr
