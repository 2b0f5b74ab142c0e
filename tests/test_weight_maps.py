"""Weight and flag maps in dre-batch: SExtractor gets them, the cuts mask flagged and zero-weight
pixels, and the fit's noise follows the weight map across a change of depth.

One simulated tile (512x512) whose left half has noise 2 and right half noise 6 ADU (a deep and a
shallow exposure side by side), with an inverse-variance weight map and a flag map with a flagged
band. SExtractor's background RMS is smoothed over its mesh (64 px): without the weight map the
fit's noise would be wrong near the seam.
"""

from __future__ import annotations

import json
import shutil

import h5py
import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

from batch_helpers import dre_batch, write_config
from scratch import scratch_dir

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    shutil.which("psfex") is None, reason="SExtractor/PSFEx not installed (bin/install-system-packages)")]

SIZE, SEAM = 512, 256
FLAGGED = slice(300, 306)        # rows with flag 4


@pytest.fixture(scope="module")
def depth_tile(request, tmp_path_factory):
    from dre_hpc.sim.tile import TileSpec, render_tile
    root = scratch_dir(request, tmp_path_factory, "depth")
    spec = TileSpec(size=SIZE, n_galaxies=16, n_stars=20, seed=8, snr=(20, 60), min_separation=60)
    clean, _ = render_tile(spec)
    sigma = np.where(np.arange(SIZE)[None, :] < SEAM, 2.0, 6.0) * np.ones((SIZE, 1))
    rng = np.random.default_rng(4)
    image = (clean + sigma * rng.standard_normal(clean.shape)).astype(np.float32)
    weight = (1.0 / sigma ** 2).astype(np.float32)
    weight[:, 500:] = 0                                   # a dead column band: masked
    flags = np.zeros((SIZE, SIZE), np.int16)
    flags[FLAGGED] = 4
    fits.writeto(root / "depth.fits", image, fits.Header([("GAIN", 1e6)]))
    fits.writeto(root / "depth_wht.fits", weight)
    fits.writeto(root / "maps_flag.fits", flags)
    return root


def test_weight_and_flag_maps_in_a_run(tmp_path, depth_tile, default_cube_file):
    tiles = tmp_path / "tiles.txt"
    tiles.write_text(f"{depth_tile / 'depth.fits'} flags={depth_tile / 'maps_flag.fits'}\n")
    config = write_config(tmp_path / "run.yaml", chunks_per_tile=1,
                          prep={"weights": "_wht.fits", "margin": 40, "gain": 1e6})
    run = tmp_path / "run"
    setup = dre_batch("setup", config, tiles, "--run-dir", run)
    assert setup.returncode == 0, setup.stderr
    result = dre_batch("run", run)
    assert result.returncode == 0, result.stdout + result.stderr
    prep = json.loads((run / "markers" / "prep" / "depth.done").read_text())
    assert prep["maps"] == {"weight": str(depth_tile / "depth_wht.fits"),
                            "flags": str(depth_tile / "maps_flag.fits")}
    # flagged or zero-weight pixels never enter a fit: no mask pixel lies on them
    with h5py.File(run / "tiles" / "depth" / "Cuts" / "depth_cuts.h5", "r") as h5:
        masks, rms, objects = h5["mask"][:], h5["rms"][:], h5["objects"][:]
    rows, cols = np.indices(masks.shape[1:])
    for mask, noise, x0, y0 in zip(masks, rms, objects["X0"], objects["Y0"]):
        y, x = rows[mask] + y0, cols[mask] + x0
        assert not np.any((y >= FLAGGED.start) & (y < FLAGGED.stop)) and not np.any(x >= 500)
        expected = np.where(x < SEAM, 2.0, 6.0)          # the weight map's noise, pixel by pixel
        assert np.allclose(noise[mask], expected, rtol=0.1)
    # the fit's noise follows the depth: chi2/dof near 1 on both sides of the seam
    assert dre_batch("collate", run).returncode == 0
    cat = Table.read(run / "collated" / "depth_dre.fits")
    fitted = np.asarray(cat["MODEL_IDX"])[:, 0] >= 0
    chi = np.asarray(cat["CHI2"], float) / np.maximum(np.asarray(cat["DOF"], float), 1)
    x = np.asarray(cat["X_IMAGE"], float)
    deep, shallow = chi[fitted & (x < SEAM - 20)], chi[fitted & (x > SEAM + 20)]
    assert len(deep) >= 3 and len(shallow) >= 3, (len(deep), len(shallow))
    for side in (deep, shallow):
        assert 0.8 < np.median(side) < 1.25, (np.median(deep), np.median(shallow))


def test_noise_from_each_weight_type():
    from dre_hpc.preprocess.weights import noise_from_weight, weight_scale
    rms = np.full((8, 8), 3.0)
    weight = np.full((8, 8), 4.0)
    weight[0, 0] = 0
    assert np.allclose(noise_from_weight(weight, "MAP_RMS")[1:], 4.0)
    assert np.allclose(noise_from_weight(weight, "MAP_VAR")[1:], 2.0)
    scale = weight_scale(weight, rms, "MAP_WEIGHT")            # relative weights: scaled to the rms
    assert np.allclose(noise_from_weight(weight, "MAP_WEIGHT", scale)[1:], 3.0)
    assert np.isnan(noise_from_weight(weight, "MAP_WEIGHT", scale)[0, 0])


def test_tiles_file_options_and_missing_maps(tmp_path, depth_tile):
    from dre_hpc.batch.setup_run import read_tiles_file
    from dre_hpc.errors import InputError
    tiles = tmp_path / "tiles.txt"
    tiles.write_text(f"{depth_tile / 'depth.fits'} weight={depth_tile / 'depth_wht.fits'} "
                     f"psf={depth_tile / 'maps_flag.fits'}\n")
    [(image, extras)] = read_tiles_file(tiles)
    assert image == depth_tile / "depth.fits"
    assert extras == {"weight": str(depth_tile / "depth_wht.fits"), "psf": str(depth_tile / "maps_flag.fits")}
    tiles.write_text(f"{depth_tile / 'depth.fits'} flags={tmp_path / 'nope.fits'}\n")
    with pytest.raises(InputError, match="line 1: flags=.*nope.fits: file not found"):
        read_tiles_file(tiles)
    config = write_config(tmp_path / "run.yaml", chunks_per_tile=1, prep={"weights": str(tmp_path / "none")})
    tiles.write_text(f"{depth_tile / 'depth.fits'}\n")
    result = dre_batch("setup", config, tiles, "--run-dir", tmp_path / "run")
    assert result.returncode != 0 and "prep.weights" in result.stderr and "Traceback" not in result.stderr
