"""One fit path: the ``dre`` command and a dre-batch run fit the same inputs to the same numbers.

A real run (SExtractor, PSFEx, cuts, 3 fit chunks a tile on the local scheduler) of a
two-extension tile (two PSFs) and a plain tile; then ``dre`` on each tile's prep products with the
run's options. Every column the two catalogues share, and every chi-square surface, must be equal
bit for bit. A second fit job of a tile loads the convolved models from the run's cache instead
of reading the cube and convolving it again.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml
from astropy.io import fits
from astropy.table import Table

from dre_hpc.batch.rundir import RunDir
from dre_hpc.cli.dre import main as dre_main

from batch_helpers import dre_batch, sim_tiles, write_config  # noqa: F401  (sim_tiles: fixture)

HAVE_TOOLS = shutil.which("psfex") is not None and (shutil.which("source-extractor") or shutil.which("sex"))
pytestmark = pytest.mark.skipif(not HAVE_TOOLS, reason="SExtractor/PSFEx not installed")
#: Columns only a dre-batch catalogue may have (the tile's name).
BATCH_ONLY = {"TILE"}


def two_extension_tile(source: Path, target: Path) -> Path:
    """A tile of two image extensions: `source`'s image and its upside-down copy."""
    data, header = fits.getdata(source, header=True)
    keys = fits.Header([card for card in header.cards if card.keyword not in ("SIMPLE", "EXTEND")])
    fits.HDUList([fits.PrimaryHDU(header=header.copy()), fits.ImageHDU(data, header=keys),
                  fits.ImageHDU(np.ascontiguousarray(data[::-1]), header=keys)]).writeto(target)
    return target


@pytest.fixture(scope="module")
def batch_run(tmp_path_factory, sim_tiles, default_cube_file):   # noqa: F811
    root = tmp_path_factory.mktemp("one_path")
    plain = Path(sim_tiles.read_text().split()[1])
    mef = two_extension_tile(Path(sim_tiles.read_text().split()[0]), root / "mef.fits")
    tiles = root / "tiles.txt"
    tiles.write_text(f"{mef}\n{plain}\n")
    # one job at a time: the later chunks of a tile start after its first has cached the models
    config = write_config(root / "run.yaml", chunks_per_tile=3)
    settings = yaml.safe_load(config.read_text())
    settings["scheduler"]["max_parallel"] = 1
    config.write_text(yaml.safe_dump(settings))
    for command in (("setup", config, tiles, "--run-dir", root / "run"), ("run", root / "run"),
                    ("collate", root / "run")):
        result = dre_batch(*command)
        assert result.returncode == 0, result.stdout + result.stderr
    return RunDir(root / "run")


def dre_on_products(run: RunDir, tile: str, out: Path) -> tuple:
    """``dre`` on a tile's prep products with the run's options; (Summary table, chi file)."""
    base = run.tile_dir(tile)
    code = dre_main(["-i", str(base / "Cuts" / f"{tile}_cuts.h5"), "--psf", str(base / "PSF"),
                     "--catalogs", str(base / "Sextracted"), "-o", str(out / "S"), "--chi", str(out / "C"),
                     "--chunk", "8", "--compression", "none"])
    assert code == 0
    return Table.read(out / "S" / f"{tile}_dre.fits"), out / "C" / f"{tile}_chi.h5"


@pytest.mark.parametrize("tile", ["mef", "tile_b"])
def test_dre_and_dre_batch_give_the_same_numbers(batch_run, tile, tmp_path):
    batch = Table.read(batch_run.collated(f"{tile}_dre.fits"))
    single, chi_file = dre_on_products(batch_run, tile, tmp_path)
    assert len(batch) == len(single) >= 4
    if tile == "mef":
        assert set(np.asarray(single["EXT_NUMBER"])) == {1, 2}          # two PSFs, two phases
    assert set(single.colnames) == set(batch.colnames) - BATCH_ONLY
    for name in single.colnames:
        a, b = np.asarray(single[name]), np.asarray(batch[name])
        assert np.array_equal(a, b, equal_nan=a.dtype.kind in "fc"), f"column {name} differs"
    assert np.isfinite(np.asarray(single["CHI2"], float)).sum() >= 4      # real fits, not fill values
    with h5py.File(chi_file) as one, h5py.File(batch_run.collated(f"{tile}_chi.h5")) as merged:
        assert sorted(one) == sorted(merged)
        for name in one:
            assert np.array_equal(one[name][()], merged[name][()], equal_nan=True), name


def test_later_chunks_of_a_tile_load_the_convolved_models(batch_run):
    """Each tile's convolved models were cached by its first fit job and read by the others: only
    one convolution per PSF in the run (the fit logs say which), and one cache file per PSF."""
    cached = {tile: sorted(p.name for p in batch_run.model_cache(tile).glob("*.npy"))
              for tile in ("mef", "tile_b")}
    assert len(cached["mef"]) == 2 and len(cached["tile_b"]) == 1
    convolutions = {}
    for tile in ("mef", "tile_b"):
        for k in range(3):
            _, done = batch_run.read_marker("fit", tile, k)
            convolutions[tile, k] = sum(s["convolutions"] for s in done["per_rank"])
    assert sum(convolutions[("tile_b", k)] for k in range(3)) == 1
    assert sum(convolutions[("mef", k)] for k in range(3)) == 2
