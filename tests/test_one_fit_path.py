"""One fit path: the ``dre`` command and a dre-batch run fit the same inputs to the same numbers.

A real run (SExtractor, PSFEx, cuts, 3 fit chunks a tile on the local scheduler) of a
two-extension tile (two PSFs) and a plain tile; then ``dre`` on each tile's prep products with the
run's options. Every column the two catalogues share, and every chi-square surface, must be equal
bit for bit. The fit jobs load the models that the tile's prep convolved, instead of reading the
cube and convolving it again; without them a fit job convolves and gets the same numbers. The
run takes the second pass (``prep.neighbours``): its prep fits each tile once and cuts it again
without the neighbours, as ``make_cuts --neighbours`` does from that fit.
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
from scratch import scratch_dir

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
def batch_run(request, tmp_path_factory, sim_tiles, default_cube_file):   # noqa: F811
    root = scratch_dir(request, tmp_path_factory, "one_path")
    plain = Path(sim_tiles.read_text().split()[1])
    mef = two_extension_tile(Path(sim_tiles.read_text().split()[0]), root / "mef.fits")
    tiles = root / "tiles.txt"
    tiles.write_text(f"{mef}\n{plain}\n")
    # one job at a time: the later chunks of a tile start after its first has cached the models
    config = write_config(root / "run.yaml", chunks_per_tile=3)
    settings = yaml.safe_load(config.read_text())
    settings["scheduler"]["max_parallel"] = 1
    settings["resources"]["prep"]["mem_gb"] = 4          # room for the prep to convolve the models
    settings["prep"] = {"neighbours": True}
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


@pytest.mark.parametrize("tile", ["mef", "tile_b"])
def test_the_prep_second_pass_is_make_cuts_neighbours(batch_run, tile, tmp_path):
    """The prep's second pass: its first fit of every object, and cuts that ``make_cuts
    --neighbours`` makes from that fit, bit for bit; the done marker records both."""
    from dre_hpc.cli import make_cuts
    from dre_hpc.io.cuts import read_cuts
    from dre_hpc.preprocess.neighbours import BACKGROUND_ERROR
    base = batch_run.tile_dir(tile)
    _, prep = batch_run.read_marker("prep", tile)
    assert prep["neighbours"]["fitted"] == prep["n_objects"] >= 4
    assert prep["neighbours"]["subtracted"] >= prep["n_objects"] - 1
    first = Table.read(base / "FirstPass" / f"{tile}_dre.fits")
    assert len(first) == prep["n_objects"] and np.isfinite(np.asarray(first["FLUX_FIT"], float)).all()
    image = Path(batch_run.read_manifest()["tiles"][["mef", "tile_b"].index(tile)]["image"])
    (tmp_path / "Tiles").mkdir()
    (tmp_path / "Tiles" / f"{tile}.fits").symlink_to(image)
    assert make_cuts.main(["-i", str(tmp_path / "Tiles"), "-s", str(base / "Sextracted"), "-o", str(tmp_path / "Cuts"),
                           "--neighbours", str(base / "FirstPass"), "--psf", str(base / "PSF")]) == 0
    ours, theirs = (read_cuts(p / f"{tile}_cuts.h5") for p in (tmp_path / "Cuts", base / "Cuts"))
    assert np.array_equal(ours.data, theirs.data) and np.array_equal(ours.mask, theirs.mask)
    assert np.all(theirs.objects["BACK_ERR"] == BACKGROUND_ERROR)
    assert f"tiles/{tile}/Cuts/{tile}_cuts.h5" in prep["outputs"]
    # and the first pass is dre's fit of the first cuts (the fit jobs' BLAS threads: --cpu 1)
    assert make_cuts.main(["-i", str(tmp_path / "Tiles"), "-s", str(base / "Sextracted"),
                           "-o", str(tmp_path / "Cuts1")]) == 0
    assert dre_main(["-i", str(tmp_path / "Cuts1" / f"{tile}_cuts.h5"), "--psf", str(base / "PSF"),
                     "--catalogs", str(base / "Sextracted"), "-o", str(tmp_path / "S1"), "--chi", str(tmp_path / "C1"),
                     "--chunk", "8", "--cpu", "1"]) == 0
    single = Table.read(tmp_path / "S1" / f"{tile}_dre.fits")
    assert single.colnames == first.colnames
    for name in first.colnames:
        a, b = np.asarray(single[name]), np.asarray(first[name])
        assert np.array_equal(a, b, equal_nan=a.dtype.kind in "fc"), f"column {name} differs"


def test_fit_jobs_load_the_models_convolved_by_the_prep(batch_run):
    """Each tile's prep convolved the cube once per PSF extension into the tile's model cache; no
    fit job read the cube or convolved it again (their done markers count the convolutions)."""
    cached = {tile: sorted(p.name for p in batch_run.model_cache(tile).glob("models-*"))
              for tile in ("mef", "tile_b")}
    assert len(cached["mef"]) == 2 and len(cached["tile_b"]) == 1
    for tile, extensions in (("mef", 2), ("tile_b", 1)):
        _, prep = batch_run.read_marker("prep", tile)
        assert prep["models"]["convolved"] == extensions
        for k in range(3):
            _, done = batch_run.read_marker("fit", tile, k)
            assert sum(s["convolutions"] for s in done["per_rank"]) == 0, (tile, k)


def test_a_fit_job_convolves_when_the_cache_is_gone(batch_run, tmp_path):
    """Without the prep's cache (a scratch purge, or models too large for the prep's memory) the
    fit job convolves itself and writes the same numbers."""
    import shutil as sh
    from dre_hpc.batch.worker import run_stage
    copy = tmp_path / "run"
    sh.copytree(batch_run.root, copy, symlinks=True)
    run = RunDir(copy)
    sh.rmtree(run.model_cache("tile_b"))
    # tile_b's objects make one fitting unit: the last of its three chunks holds them all
    reference = Table.read(batch_run.chunk_outputs("tile_b", 2)["dre"])
    assert len(reference) == batch_run.read_marker("prep", "tile_b")[1]["n_objects"] > 0
    assert run_stage("fit", run.root, tile=1, chunk=2) == 0
    _, done = run.read_marker("fit", "tile_b", 2)
    assert sum(s["convolutions"] for s in done["per_rank"]) == 1
    again = Table.read(run.chunk_outputs("tile_b", 2)["dre"])
    for name in reference.colnames:
        a, b = np.asarray(again[name]), np.asarray(reference[name])
        assert np.array_equal(a, b, equal_nan=a.dtype.kind in "fc"), name
