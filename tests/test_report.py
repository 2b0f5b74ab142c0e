"""``dre-batch report`` on a real local run of two simulated tiles (fixture ``local_reference``).

The run is copied and collated; the report is built through the real command. Its numbers are
checked against direct computations on the flat catalogue and the truth tables (an independent
brute-force position match, NumPy medians); a run with a failed chunk, collated with
``--allow-missing``, shows the chunk instead of crashing; an archived run still has its chunk
times (read from the archive); ``--text`` writes nothing. The page itself is opened in headless
Chromium in ``test_report_browser.py``.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from astropy.table import Table

from batch_helpers import dre_batch, flat_path, local_reference, sim_tiles  # noqa: F401
from dre_hpc.batch.rundir import RunDir
from dre_hpc.flags import FitFlag
from dre_hpc.sim.tile import read_truth
from scratch import scratch_dir

pytestmark = pytest.mark.slow
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def collated_copy(reference, tmp_path, name="run", fail_chunk=None) -> Path:
    """A copy of the reference run, collated (``fail_chunk=(tile, k)``: that chunk failed first,
    and collate runs with --allow-missing)."""
    run_dir = tmp_path / name
    shutil.copytree(reference[0], run_dir, symlinks=True)
    args = ["collate", run_dir]
    if fail_chunk:
        tile, k = fail_chunk
        RunDir(run_dir).write_marker("fit", tile, k, "failed", {"reason": "planted failure", "attempt": 1})
        args.append("--allow-missing")
    result = dre_batch(*args)
    assert result.returncode == 0, result.stdout + result.stderr
    return run_dir


def report(run_dir, *args):
    result = dre_batch("report", run_dir, *args)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    return result


@pytest.fixture(scope="module")
def reported(request, local_reference, tmp_path_factory):  # noqa: F811
    """The collated copy with its report: ``(run_dir, report folder, CompletedProcess)``."""
    run_dir = collated_copy(local_reference, scratch_dir(request, tmp_path_factory, "report"))
    result = report(run_dir, "--gallery", "3")
    return run_dir, run_dir / "output" / "report", result


def image_sources(page: Path) -> list:
    return re.findall(r'<img src="([^"]+)"', page.read_text(encoding="utf-8"))


def test_page_references_only_files_that_exist_and_are_pngs(reported):
    _, folder, result = reported
    page = folder / "index.html"
    assert f"report: {page}" in result.stdout
    sources = image_sources(page)
    expected = {"counts_per_tile.png", "flags.png", "parameters.png", "grid_edges.png", "chi2_vs_mag.png",
                "chunk_times.png", "validation_snr.png", "validation_size.png"}
    assert expected <= set(sources)
    assert sum(1 for s in sources if s not in expected) >= 3          # the gallery: 3 random + 3 worst at most
    for src in sources:
        assert "/" not in src and not src.startswith(".")             # next to the page, nothing outside
        assert (folder / src).read_bytes()[:8] == PNG_SIGNATURE, src
    assert not re.search(r"(src|href)=\"(https?:|//)", page.read_text())   # nothing from the network
    assert "<script" not in page.read_text()


def test_summary_numbers_match_the_flat_catalogue(reported):
    run_dir, folder, _ = reported
    summary = json.loads((folder / "report.json").read_text())["summary"]
    flat = Table.read(flat_path(run_dir))
    flags = np.asarray(flat["FLAGS"])
    assert summary["objects"] == len(flat) > 0
    assert summary["clean"] == int(np.sum(flags == 0)) and summary["flagged"] == int(np.sum(flags != 0))
    assert summary["flags"] == {f.name: int(np.sum((flags & int(f)) != 0)) for f in FitFlag}
    idx = np.asarray(flat["MODEL_IDX"])
    fitted = idx[:, 0] >= 0
    assert summary["grid_edges"]["log r min"] == pytest.approx(np.mean(idx[fitted, 3] == 0))
    assert summary["grid_edges"]["log r max"] == pytest.approx(np.mean(idx[fitted, 3] == 20))   # default grid
    assert summary["grid_edges"]["b/a min"] == pytest.approx(np.mean(idx[fitted, 1] == 0))
    assert "n min" not in summary["grid_edges"]                       # the default grid has one n
    chi2_dof = np.asarray(flat["CHI2"])[fitted] / np.asarray(flat["DOF"])[fitted]
    assert summary["median chi2/dof"] == pytest.approx(np.median(chi2_dof))
    per_tile = {row["tile"]: row for row in summary["tiles_table"]}
    for tile in ("tile_a", "tile_b"):
        mine = np.asarray(flat["TILE"]).astype(str) == tile
        assert per_tile[tile]["rows"] == int(mine.sum()) == per_tile[tile]["objects"]
        assert per_tile[tile]["missing_chunks"] == 0
        assert per_tile[tile]["flags"] == {f.name: int(np.sum((flags[mine] & int(f)) != 0)) for f in FitFlag
                                           if np.any(flags[mine] & int(f))}
    times = json.loads((folder / "report.json").read_text())["chunk_times"]
    assert len(times) == 4 and all(t["seconds"] > 0 for t in times)   # 2 tiles x 2 chunks
    assert sum(t["objects"] for t in times) == len(flat)


def brute_force_pairs(flat, truth_dir: Path) -> tuple:
    """Clean fitted objects and their truth galaxies, nearest within 2 pixels (no KD-tree)."""
    fitted, truth = [], []
    for tile in ("tile_a", "tile_b"):
        galaxies = read_truth(truth_dir / f"{tile}_truth.fits")
        galaxies = galaxies[np.char.strip(np.asarray(galaxies["KIND"]).astype(str)) == "galaxy"]
        mine = flat[np.asarray(flat["TILE"]).astype(str) == tile]
        for row in mine:
            d = np.hypot(galaxies["X"] - row["X_IMAGE"], galaxies["Y"] - row["Y_IMAGE"])
            if d.min() <= 2.0 and row["FLAGS"] == 0:
                fitted.append(row)
                truth.append(galaxies[int(np.argmin(d))])
    return fitted, truth


def test_validation_agrees_with_a_direct_computation(reported, sim_tiles):  # noqa: F811
    run_dir, folder, result = reported
    validation = json.loads((folder / "validation.json").read_text())
    fitted, truth = brute_force_pairs(Table.read(flat_path(run_dir)), Path(sim_tiles).parent / "Truth")
    assert validation["matched_unflagged"] == len(fitted) > 10
    assert validation["truth_galaxies"] == 30 and validation["tiles"] == 2
    for name, diff in (("AX_RATIO", [f["AX_RATIO"] - t["AX_RATIO"] for f, t in zip(fitted, truth)]),
                       ("LOGR", [f["LOGR"] - t["LOGR"] for f, t in zip(fitted, truth)]),
                       ("FLUX", [f["FLUX"] / t["FLUX"] - 1 for f, t in zip(fitted, truth)])):
        diff = np.asarray(diff)
        stats = validation["parameters"][name]["all"]
        assert stats["n"] == len(diff)
        assert stats["bias"] == pytest.approx(np.median(diff), abs=1e-12)
        assert stats["scatter"] == pytest.approx(1.4826 * np.median(np.abs(diff - np.median(diff))), abs=1e-12)
    b_a = np.mean([abs(f["AX_RATIO"] - t["AX_RATIO"]) <= 0.1 + 1e-9 for f, t in zip(fitted, truth)])
    assert validation["headline"]["b/a within 0.1"] == pytest.approx(b_a)
    assert "truth: b/a within 0.1  " in result.stdout                # the text table shows it too
    assert "Validation against simulated truth" in (folder / "index.html").read_text()


def test_report_json_names_the_units_of_its_numbers(reported):
    from astropy import units as u
    _, folder, _ = reported
    report_units = json.loads((folder / "report.json").read_text())["units"]
    assert report_units["seconds"] == "s" and u.Unit(report_units["summary.objects_per_chunk_second"]) == 1 / u.s
    units = json.loads((folder / "validation.json").read_text())["units"]
    assert set(units) == set(json.loads((folder / "validation.json").read_text())["parameters"])
    assert u.Unit(units["ANGLE"]) == u.deg and u.Unit(units["LOGR"]) == u.dex and units["FLUX"] == ""


def test_text_summary_writes_nothing(local_reference, tmp_path):  # noqa: F811
    run_dir = collated_copy(local_reference, tmp_path)
    result = report(run_dir, "--text")
    assert not (run_dir / "output" / "report").exists()
    assert re.search(r"objects in the catalogue +\d+", result.stdout)
    assert "report:" not in result.stdout


def test_failed_chunk_is_shown_not_fatal(local_reference, tmp_path):  # noqa: F811
    run_dir = collated_copy(local_reference, tmp_path, fail_chunk=("tile_b", 1))
    result = report(run_dir, "--gallery", "0")
    folder = run_dir / "output" / "report"
    summary = json.loads((folder / "report.json").read_text())["summary"]
    assert summary["missing_chunks"] == 1
    row = next(r for r in summary["tiles_table"] if r["tile"] == "tile_b")
    assert row["missing_chunks"] == 1 and row["rows"] < row["objects"]
    page = (folder / "index.html").read_text()
    assert "Missing chunks" in page and "planted failure" in page
    assert "missing chunks: tile_b (1)" in result.stdout
    for src in image_sources(folder / "index.html"):
        assert (folder / src).is_file()


def test_archived_run_keeps_its_chunk_times_and_old_figures_go(local_reference, tmp_path):  # noqa: F811
    run_dir = collated_copy(local_reference, tmp_path)
    stale = run_dir / "output" / "report" / "stale.png"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"old")
    assert dre_batch("archive", run_dir).returncode == 0
    assert not (run_dir / "markers").exists()
    report(run_dir, "--gallery", "0")
    content = json.loads((run_dir / "output" / "report" / "report.json").read_text())
    assert len(content["chunk_times"]) == 4                        # read from the archive
    assert not stale.exists()                                     # the folder is replaced whole


def test_uncollated_run_and_bad_option_are_one_line_errors(local_reference, tmp_path):  # noqa: F811
    run_dir = tmp_path / "run"
    shutil.copytree(local_reference[0], run_dir, symlinks=True)
    result = dre_batch("report", run_dir)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "not been collated" in result.stderr and "dre-batch collate" in result.stderr
    result = dre_batch("report", run_dir, "--gallery", "-1")
    assert result.returncode != 0 and "--gallery" in result.stderr and "Traceback" not in result.stderr
    assert not (run_dir / "output" / "report").exists()


def test_page_escapes_strings_from_the_run():
    from dre_hpc.report import html
    table = html.table(["tile"], [("<script>alert(1)</script>",)])
    assert "<script>" not in table and "&lt;script&gt;" in table
