"""The report's gallery (dre_hpc.report.gallery) on a real collated local run of two simulated tiles.

The model panel is checked against the fit itself: the chi-square of the drawn arrays is the
catalogue's CHI2 (relative tolerance `CHI2_RTOL`), for the run's ``wls`` fit and for in-process fits
with ``fit.gain`` and the ``dre`` statistic; moving the model by one pixel or leaving out the PSF
misses it by far more than the tolerance.
"""

from __future__ import annotations

import re
import shutil

import numpy as np
import pytest
from astropy.table import Table

import batch_helpers
from batch_helpers import dre_batch, flat_path
from dre_hpc.batch.config import load_config, resolve
from dre_hpc.batch.fit_job import fit_options
from dre_hpc.batch.prep_job import tile_products
from dre_hpc.batch.rundir import RunDir
from dre_hpc.fit.engine import fit_batch
from dre_hpc.io.cuts import read_cuts
from dre_hpc.models.generate import default_cube_path
from dre_hpc.models.psf import read_psf
from dre_hpc.report.gallery import CubeFile, mosaic_arrays, pick_gallery, write_gallery
from scratch import scratch_dir

#: chi-square of the drawn arrays vs the catalogue's CHI2 (seen: ~1e-8; a one-pixel shift: > 0.3)
CHI2_RTOL = 1e-5
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
local_reference, sim_tiles = batch_helpers.local_reference, batch_helpers.sim_tiles    # session fixtures


@pytest.fixture(scope="module")
def collated(request, local_reference, tmp_path_factory):
    """A collated copy of the local reference run: ``(run_dir, flat catalogue)``."""
    run_dir = scratch_dir(request, tmp_path_factory, "gallery") / "run"
    shutil.copytree(local_reference[0], run_dir, symlinks=True)
    result = dre_batch("collate", run_dir)
    assert result.returncode == 0, result.stderr
    return run_dir, Table.read(flat_path(run_dir))


def chi2_of(m) -> float:
    """The fit's statistic on a mosaic's arrays: sum over the usable pixels of (residual / rms)^2."""
    return float((((m.data - m.model) / m.rms)[m.mask] ** 2).sum())


@pytest.mark.slow
def test_model_panel_is_the_fits_model(collated):
    run_dir, cat = collated
    mosaics, notes = mosaic_arrays(run_dir, cat, range(len(cat)))
    assert notes == [] and sorted(mosaics) == list(range(len(cat)))
    with CubeFile(default_cube_path()) as cube:
        grid = cube.grid
        for row, m in mosaics.items():
            chi2 = float(cat["CHI2"][row])
            np.testing.assert_array_equal(m.residual, m.data - m.model)
            np.testing.assert_allclose(m.model, m.amplitude * m.stamp.astype(float), rtol=1e-12)
            assert chi2_of(m) == pytest.approx(chi2, rel=CHI2_RTOL), row
            # the tolerance has power: the model one pixel off, or without the PSF, misses by far
            shifted = m.data - np.roll(m.model, 1, axis=1)
            assert (((shifted / m.rms)[m.mask] ** 2).sum() - chi2) / chi2 > 100 * CHI2_RTOL
            raw = cube.stamps([np.ravel_multi_index(cat["MODEL_IDX"][row], grid.shape)])[0].astype(float)
            w = np.where(m.mask, 1 / m.rms ** 2, 0)
            a = (w * m.data * raw).sum() / (w * raw * raw).sum()
            assert ((w * (m.data - a * raw) ** 2).sum() - chi2) / chi2 > 100 * CHI2_RTOL
            assert m.flux == cat["FLUX"][row] and m.amplitude == pytest.approx(m.flux, rel=0.2)
            assert m.mask.sum() == cat["NPIX"][row]


@pytest.mark.slow
@pytest.mark.parametrize("statistic, gain", [("wls", 0.5), ("dre", None), ("dre", 0.5)])
def test_model_panel_with_gain_and_dre_statistic(collated, default_models, tmp_path, statistic, gain):
    """In-process fits of tile_a with another statistic or a gain, drawn from a run whose config says so.

    With a gain the fit takes the Poisson term from its first (gain-free) pass's best cell, the
    gallery from the final cell: the same numbers where the two cells are the same, only there."""
    run_dir, _ = collated
    run = tmp_path / "run"
    shutil.copytree(run_dir, run, symlinks=True, ignore=shutil.ignore_patterns("chunks", "collated", "logs"))
    raw = load_config(run / "config.yaml").as_dict()
    raw["fit"].update(statistic=statistic, gain=gain)
    (run / "config.yaml").write_text(resolve(raw).to_yaml())
    rundir = RunDir(run)
    tile = rundir.tiles()[0]
    products = tile_products(rundir, tile)
    cuts = read_cuts(products["cuts"])
    ext = int(cuts.objects["EXT_NUMBER"][0])
    assert (cuts.objects["EXT_NUMBER"] == ext).all()
    mm = default_models.for_psf(read_psf(products["psf"], ext_number=max(ext - 1, 0)))
    res = fit_batch(mm, cuts, fit_options(load_config(run / "config.yaml")))
    cat = Table({"TILE": [tile.name] * len(cuts), "ROW": np.arange(len(cuts)), "NUMBER": cuts.objects["NUMBER"],
                 "EXT_NUMBER": cuts.objects["EXT_NUMBER"], **{k: res[k] for k in ("MODEL_IDX", "FLUX", "CHI2",
                                                                                 "DOF", "FLAGS")}})
    mosaics, notes = mosaic_arrays(run, cat, range(len(cat)))
    assert notes == [] and len(mosaics) == len(cat) > 3
    drawn = np.array([chi2_of(mosaics[i]) for i in range(len(cat))])
    same = np.ones(len(cat), bool)
    if gain:
        first = fit_batch(mm, cuts, fit_options(load_config(run_dir / "config.yaml")))["MODEL_IDX"]
        same = (first == res["MODEL_IDX"]).all(axis=1)
        assert same.sum() >= len(cat) // 2
        np.testing.assert_allclose(drawn[~same], res["CHI2"][~same], rtol=0.2)
    np.testing.assert_allclose(drawn[same], res["CHI2"][same], rtol=CHI2_RTOL)
    if gain:           # the Poisson term is in the drawn rms: the sky rms alone misses CHI2 by far
        sky, _ = mosaic_arrays(run_dir, cat, range(len(cat)))
        for i, m in mosaics.items():
            assert (((m.data - m.model) / sky[i].rms)[m.mask] ** 2).sum() > (1 + 100 * CHI2_RTOL) * res["CHI2"][i]


def fake_catalogue(n=200, seed=5) -> Table:
    rng = np.random.default_rng(seed)
    chi2 = rng.uniform(50, 500, n)
    dof = rng.integers(20, 200, n)
    model_idx = rng.integers(0, 5, (n, 4)).astype(np.int16)
    chi2[:20] = np.nan                      # unfitted: NaN CHI2 and MODEL_IDX -1
    model_idx[:20] = -1
    dof[20:30] = 0                          # no degrees of freedom
    chi2[30:33] = 1e6                       # huge chi2 but no fit: never picked
    model_idx[30:33] = -1
    return Table({"TILE": ["t"] * n, "ROW": np.arange(n), "NUMBER": np.arange(n) + 1, "MODEL_IDX": model_idx,
                  "CHI2": chi2, "DOF": dof, "FLAGS": np.zeros(n, int)})


def test_pick_gallery():
    cat = fake_catalogue()
    picks = pick_gallery(cat, n_random=30, n_worst=10, seed=3)
    assert picks == pick_gallery(cat, n_random=30, n_worst=10, seed=3)        # deterministic
    assert picks != pick_gallery(cat, n_random=30, n_worst=10, seed=4)
    rows = [r for r, _ in picks]
    assert len(rows) == len(set(rows))                                        # no duplicates
    fitted = np.flatnonzero(np.isfinite(cat["CHI2"]) & (cat["DOF"] > 0) & (cat["MODEL_IDX"][:, 0] >= 0))
    assert set(rows) <= set(fitted)
    ratio = np.asarray(cat["CHI2"]) / np.maximum(cat["DOF"], 1)
    worst = [r for r, k in picks if k == "worst"]
    assert worst == list(fitted[np.argsort(-ratio[fitted])][:10])             # highest first
    random = [r for r, k in picks if k == "random"]
    assert 20 <= len(random) <= 30 and random == sorted(random)
    # an object drawn at random that is also among the worst is shown once, as worst
    overlap = pick_gallery(cat, n_random=len(fitted), n_worst=10, seed=3)
    assert len(overlap) == len(fitted) and sum(k == "worst" for _, k in overlap) == 10
    assert pick_gallery(cat[:20], 5, 5) == []                                 # nothing fitted


@pytest.mark.slow
def test_write_gallery_pngs(collated, tmp_path):
    run_dir, cat = collated
    items, notes = write_gallery(run_dir, cat, tmp_path / "out", n_random=4, n_worst=3, seed=1)
    assert notes == []
    picks = pick_gallery(cat, 4, 3, seed=1)
    assert [(i.row, i.kind) for i in items] == picks and len(picks) >= 5
    assert len({i.png for i in items}) == len(items)
    for item in items:
        assert re.fullmatch(r"mosaic_(worst|random)_\d{3}\.png", item.png)
        data = (tmp_path / "out" / item.png).read_bytes()
        assert data[:8] == PNG_SIGNATURE and len(data) > 1000
        assert item.tile == cat["TILE"][item.row] and item.number == cat["NUMBER"][item.row]
        assert item.chi2_dof == pytest.approx(cat["CHI2"][item.row] / cat["DOF"][item.row])
        assert item.flags == cat["FLAGS"][item.row]


@pytest.mark.slow
def test_object_without_fit_and_cleaned_tiles(collated, tmp_path):
    run_dir, cat = collated
    run = tmp_path / "run"
    shutil.copytree(run_dir, run, symlinks=True)
    cat = cat.copy()
    cat["MODEL_IDX"][0] = -1
    mosaics, notes = mosaic_arrays(run, cat, [0, 1])
    assert list(mosaics) == [1] and len(notes) == 1 and "no fit" in notes[0]
    shutil.rmtree(run / "tiles" / "tile_b")                    # one tile's prep products gone
    items, notes = write_gallery(run, cat, tmp_path / "some", n_random=20, n_worst=0)
    assert items and {i.tile for i in items} == {"tile_a"}
    assert any("tile_b" in n and "tiles/tile_b/Cuts/tile_b_cuts.h5" in n for n in notes)
    shutil.rmtree(run / "tiles")                               # what dre-batch clean does
    items, notes = write_gallery(run, cat, tmp_path / "none")
    assert items == [] and not list((tmp_path / "none").glob("*.png"))
    for tile in ("tile_a", "tile_b"):
        assert any(f"tiles/{tile}/Cuts/{tile}_cuts.h5 not found" in n for n in notes), notes
