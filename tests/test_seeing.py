"""SExtractor's SEEING_FWHM from the tile, so that stars of any seeing get CLASS_STAR near 1.

Two small simulated tiles, seeing 2 and 6 pixels: with ``prep.seeing: auto`` (a first SExtractor
pass measures the stellar locus) the bright stars of both are classified as stars; with the
shipped value (2.5 px) the 6-pixel stars are not. A header key and a PSF file give the seeing too.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

from batch_helpers import make_run
from dre_hpc.batch.config import load_config
from dre_hpc.batch.prep_job import run_prep
from dre_hpc.errors import InputError
from dre_hpc.preprocess.seeing import psf_fwhm, tile_seeing
from scratch import scratch_dir

pytestmark = pytest.mark.skipif(shutil.which("psfex") is None, reason="SExtractor/PSFEx not installed")


@pytest.fixture(scope="module")
def seeing_tiles(request, tmp_path_factory):
    from dre_hpc.sim.tile import TileSpec, simulate_tile
    root = scratch_dir(request, tmp_path_factory, "seeing")
    for fwhm in (2.0, 6.0):
        spec = TileSpec(size=384, n_galaxies=4, n_stars=25, seed=int(fwhm), psf_fwhm=fwhm,
                        min_separation=30, star_snr=(100, 400))
        simulate_tile(spec, root / f"seeing{fwhm:.0f}.fits", root / f"seeing{fwhm:.0f}_truth.fits")
    return root


def star_class(tmp_path, image, seeing) -> tuple:
    """``(median CLASS_STAR of the bright point sources, prep's seeing record)``."""
    rundir = make_run(tmp_path, [image], [f"prep.seeing={seeing}", "prep.margin=40"],
                      name=f"run_{seeing}_{image.stem}")
    done = run_prep(rundir, load_config(rundir.config), rundir.tiles()[0])
    name = rundir.tiles()[0].name
    cat = Table.read(rundir.root / "tiles" / name / "Sextracted" / f"{name}_cat.fits", hdu=2)
    truth = Table.read(str(image).replace(".fits", "_truth.fits"))
    stars = truth[truth["KIND"] == "star"]
    x, y = np.asarray(cat["X_IMAGE"]), np.asarray(cat["Y_IMAGE"])
    near = [np.argmin(np.hypot(x - sx, y - sy)) for sx, sy in zip(stars["X"], stars["Y"])]
    near = [i for i, sx, sy in zip(near, stars["X"], stars["Y"]) if np.hypot(x[i] - sx, y[i] - sy) < 2]
    return float(np.median(np.asarray(cat["CLASS_STAR"])[near])), done["seeing"]


def test_stars_of_any_seeing_are_stars_with_the_measured_seeing(tmp_path, seeing_tiles):
    for fwhm in (2.0, 6.0):
        image = seeing_tiles / f"seeing{fwhm:.0f}.fits"
        auto, record = star_class(tmp_path, image, "auto")
        assert auto > 0.8, (fwhm, auto, record)
        assert record["source"].startswith("stellar locus") and 1 < record["fwhm_pixels"] / fwhm < 1.45
    shipped, record = star_class(tmp_path, seeing_tiles / "seeing6.fits", "config")
    assert shipped < 0.5 and record == {"fwhm_pixels": None, "source": "config"}


def test_seeing_from_a_header_key_a_number_or_a_psf(tmp_path, seeing_tiles):
    header = fits.getheader(seeing_tiles / "seeing6.fits")
    assert tile_seeing("header:PSF_FWHM", header, "t.fits")["fwhm_pixels"] == 6.0
    assert tile_seeing(3.5, header, "t.fits") == {"fwhm_pixels": 3.5, "source": "prep.seeing"}
    with pytest.raises(InputError, match="t.fits: header key SEEING is missing"):
        tile_seeing("header:SEEING", header, "t.fits")
    y, x = np.mgrid[-15:16, -15:16]
    psf = np.exp(-(x * x + y * y) / (2 * (4.0 / 2.3548) ** 2))
    fits.writeto(tmp_path / "psf.fits", psf / psf.sum())
    assert abs(psf_fwhm(tmp_path / "psf.fits") - 4.0) < 0.3
    record = tile_seeing("auto", header, "t.fits", psf=tmp_path / "psf.fits")   # no first pass
    assert record["source"] == "PSF psf.fits"
