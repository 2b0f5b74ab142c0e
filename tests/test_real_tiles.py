"""dre-batch on real observatory images, local and SLURM: every tile reaches the flat catalogue.

The images ship inside public packages (nothing is downloaded at test time):

- ``m13.fits``: the globular cluster M13, 300x300 (astropy's test data, BSD-3-Clause); crowded
  stars and no tight stellar locus: the seeing comes from PSFEx's PSF;
- ``wcstest.mt``: a Digitized Sky Survey plate scan (Palomar 48-inch Schmidt, 353x353) and
  ``hbo.fits``: an NTT/EMMI frame filled by comet Hale-Bopp's coma, with no usable star (both in
  Debian's ``eso-midas-testdata``, GPL-2+; ``bin/install-system-packages`` installs it).

PSFEx accepts no star on ``hbo``: with ``prep.psf_fallback`` the tile uses it, and the PSF each
tile used is in its prep marker, its catalogue headers (``PSFSRC``) and the TILES extension.
"""

from __future__ import annotations

import glob
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from astropy.io import fits
from astropy.table import Table

from batch_helpers import dre_batch
from scratch import scratch_dir

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    shutil.which("psfex") is None, reason="SExtractor/PSFEx not installed (bin/install-system-packages)")]

M13 = Path(fits.__file__).parent / "hdu" / "compressed" / "tests" / "data" / "m13.fits"
MIDAS = sorted(glob.glob("/usr/lib/eso-midas/*/test/prim"))
need_midas = pytest.mark.skipif(not MIDAS, reason="Debian package eso-midas-testdata not installed "
                                                  "(bin/install-system-packages installs it)")


def gaussian_psf(path: Path, fwhm: float = 3.0) -> Path:
    y, x = np.mgrid[-12:13, -12:13]
    psf = np.exp(-(x * x + y * y) / (2 * (fwhm / 2.3548) ** 2))
    fits.writeto(path, (psf / psf.sum()).astype(np.float32))
    return path


@pytest.fixture(scope="module")
def real_tiles(request, tmp_path_factory):
    """``(folder, tiles file)``: links named ``m13.fits``, ``dss495.fits``, ``hbo.fits``."""
    root = scratch_dir(request, tmp_path_factory, "real")
    (root / "Tiles").mkdir()
    images = {"m13": M13}
    if MIDAS:
        images.update(dss495=Path(MIDAS[0]) / "wcstest.mt", hbo=Path(MIDAS[0]) / "hbo.fits")
    for name, source in images.items():
        (root / "Tiles" / f"{name}.fits").symlink_to(source)
    tiles = root / "tiles.txt"
    tiles.write_text("".join(f"{root / 'Tiles' / name}.fits\n" for name in images))
    gaussian_psf(root / "fallback_psf.fits")
    return root, tiles


def config(path: Path, scheduler="local", **prep) -> Path:
    resources = {"mem_gb": 1, "walltime": "00:10:00"}
    path.write_text(yaml.safe_dump({
        "run": {"name": "real", "seed": 3}, "fit": {"batch_size": 8},
        "prep": {"gain": 1.0, "margin": 20, **prep}, "chunking": {"objects_per_chunk": 1000},
        "scheduler": {"name": scheduler, **({"max_parallel": 2} if scheduler == "local" else {})},
        "resources": {"prep": resources, "fit": resources}}))
    return path


def check_run(run: Path, tiles: list) -> None:
    """Every tile in the flat catalogue's TILES extension with the PSF source it used."""
    flat = Table.read(run / "collated" / "real_dre.fits", hdu="TILES")
    assert list(flat["TILE"]) == tiles
    expected = {"m13": "psfex", "dss495": "psfex", "hbo": "fallback"}
    assert {t: s for t, s in zip(flat["TILE"], flat["PSFSRC"])} == {t: expected[t] for t in tiles}
    assert all(flat["ROWS"] > 0)
    catalogue = Table.read(run / "collated" / "real_dre.fits", hdu=1)
    assert set(catalogue["TILE"]) == set(tiles)
    for tile in tiles:
        prep = json.loads((run / "markers" / "prep" / f"{tile}.done").read_text())
        assert prep["psf"]["source"] == expected[tile]
        assert prep["seeing"]["fwhm_pixels"] > 1.5, prep["seeing"]        # measured, not the config's
        header = fits.getheader(run / "collated" / f"{tile}_dre.fits", 1)
        assert header["PSFSRC"] == expected[tile]
    if "hbo" in tiles:
        assert "fallback" in dre_batch("report", run, "--text").stdout


def test_real_images_local_with_a_fallback_psf(tmp_path, real_tiles, default_cube_file):
    root, tiles = real_tiles
    run = tmp_path / "run"
    cfg = config(tmp_path / "run.yaml", psf_fallback=str(root / "fallback_psf.fits"))
    assert dre_batch("setup", cfg, tiles, "--run-dir", run).returncode == 0
    result = dre_batch("run", run)
    assert result.returncode == 0, result.stdout + result.stderr
    assert dre_batch("collate", run).returncode == 0
    check_run(run, ["m13", "dss495", "hbo"] if MIDAS else ["m13"])


def test_real_m13_stars_are_classified_as_stars(tmp_path, real_tiles):
    """The crowded M13 field's bright stars get CLASS_STAR near 1 only with the measured seeing
    (the shipped SEEING_FWHM 2.5 px calls them galaxies)."""
    from dre_hpc.batch.config import load_config
    from dre_hpc.batch.prep_job import run_prep
    from batch_helpers import make_run

    medians = {}
    for seeing in ("auto", "config"):
        rundir = make_run(tmp_path, [real_tiles[0] / "Tiles" / "m13.fits"],
                          ["prep.gain=1", f"prep.seeing={seeing}"], name=seeing)
        run_prep(rundir, load_config(rundir.config), rundir.tiles()[0])
        cat = Table.read(rundir.root / "tiles" / "m13" / "Sextracted" / "m13_cat.fits", hdu=2)
        bright = np.asarray(cat["SNR_WIN"]) > 50
        medians[seeing] = float(np.median(np.asarray(cat["CLASS_STAR"])[bright]))
    assert medians["auto"] > 0.7 > 0.3 > medians["config"], medians


@need_midas
def test_a_tile_without_stars_fails_naming_the_fallback_option(tmp_path, real_tiles):
    from dre_hpc.batch.config import resolve
    from dre_hpc.batch.prep_job import run_prep
    from dre_hpc.errors import PSFError
    from batch_helpers import make_run

    rundir = make_run(tmp_path, [real_tiles[0] / "Tiles" / "hbo.fits"], ["prep.gain=1", "prep.margin=20"])
    with pytest.raises(PSFError, match="accepted no star.*prep.psf_fallback"):
        run_prep(rundir, resolve(None, ["prep.gain=1", "prep.margin=20"]), rundir.tiles()[0])
    assert not (rundir.root / "tiles" / "hbo").exists()


@need_midas
@pytest.mark.slurm
def test_real_images_on_slurm(tmp_path, real_tiles, slurm_cluster, default_cube_file):
    root, tiles = real_tiles
    run = tmp_path / "run"
    cfg = config(tmp_path / "run.yaml", "slurm", psf_fallback=str(root / "fallback_psf.fits"))

    def batch(*args, timeout=120):
        proc = subprocess.run([sys.executable, "-m", "dre_hpc.cli.dre_batch", *map(str, args)],
                              env=slurm_cluster.env, capture_output=True, text=True, timeout=timeout)
        assert proc.returncode == 0, proc.stdout + proc.stderr + slurm_cluster.log_tails()
        return proc

    batch("setup", cfg, tiles, "--run-dir", run)
    batch("run", run)
    batch("status", run, "--wait", "--interval", "1", timeout=240)
    batch("collate", run)
    check_run(run, ["m13", "dss495", "hbo"])
