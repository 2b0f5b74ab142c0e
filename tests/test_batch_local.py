"""dre-batch end to end on the local scheduler, through the real command and real job scripts.

Two tiny simulated tiles run setup -> run -> status -> collate -> link with the real SExtractor
and PSFEx; the job scripts run as subprocesses exactly as a cluster would run them. Setup's
refusals (existing runs, bad tile lists, bad configs) are checked without running anything.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

from batch_helpers import (assert_same_catalogue, dre_batch, flat_path, local_reference,  # noqa: F401
                           sim_tiles, write_config)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reference(local_reference):
    return local_reference


def flat(run_dir) -> Table:
    return Table.read(flat_path(run_dir))


def test_setup_writes_a_complete_run_and_submits_nothing(tmp_path, sim_tiles):
    config = write_config(tmp_path / "run.yaml", chunks_per_tile=3)
    result = dre_batch("setup", config, sim_tiles, "--run-dir", tmp_path / "run", "--set", "run.seed=7")
    assert result.returncode == 0, result.stderr
    root = tmp_path / "run"
    manifest = json.loads((root / "manifest.json").read_text())
    assert [t["name"] for t in manifest["tiles"]] == ["tile_a", "tile_b"]
    assert [t["index"] for t in manifest["tiles"]] == [0, 1]
    assert all(t["n_chunks"] == 3 and Path(t["image"]).is_absolute() for t in manifest["tiles"])
    prov = json.loads((root / "provenance.json").read_text())
    assert prov["seed"] == 7 and prov["config_hash"] == manifest["config_hash"]
    assert prov["command_line"][:2] == ["dre-batch", "setup"] and "run.seed=7" in prov["command_line"]
    assert {"dre_hpc", "python", "numpy", "astropy"} <= set(prov["versions"])
    assert "environ" not in json.dumps(prov).lower()
    for stage in ("prep", "fit"):
        script = root / "scripts" / f"{stage}.sh"
        assert script.stat().st_mode & stat.S_IXUSR
        assert str(root) not in script.read_text()       # relative paths only: the run can move
        assert subprocess.run(["bash", "-n", script]).returncode == 0
    assert not (root / "jobs").exists() and not (root / "markers").exists()


def test_setup_never_overwrites_without_clobber(tmp_path, sim_tiles):
    config = write_config(tmp_path / "run.yaml")
    assert dre_batch("setup", config, sim_tiles, "--run-dir", tmp_path / "run").returncode == 0
    (tmp_path / "run" / "keep.txt").write_text("user data")
    again = dre_batch("setup", config, sim_tiles, "--run-dir", tmp_path / "run")
    assert again.returncode == 2 and "--clobber" in again.stderr and "Traceback" not in again.stderr
    assert (tmp_path / "run" / "keep.txt").exists()
    clobber = dre_batch("setup", config, sim_tiles, "--run-dir", tmp_path / "run", "--clobber")
    assert clobber.returncode == 0 and not (tmp_path / "run" / "keep.txt").exists()
    other = tmp_path / "not_a_run"
    other.mkdir()
    (other / "thesis.tex").write_text("precious")
    refused = dre_batch("setup", config, sim_tiles, "--run-dir", other, "--clobber")
    assert refused.returncode == 2 and "not a dre-batch run" in refused.stderr
    assert (other / "thesis.tex").read_text() == "precious"


@pytest.mark.parametrize("lines, message", [
    (["missing.fits"], "line 1: image 'missing.fits' not found"),
    (["# only a comment", ""], "no image paths"),
    (["{a}", "{a}"], "listed twice"),
    (["{a}", "{other_a}"], "both give the tile name 'tile_a'"),
])
def test_setup_refuses_bad_tile_lists(tmp_path, sim_tiles, lines, message):
    images = Path(sim_tiles).read_text().split()
    (tmp_path / "elsewhere").mkdir()
    other_a = shutil.copy(images[0], tmp_path / "elsewhere" / "tile_a.fits")
    tiles = tmp_path / "tiles.txt"
    tiles.write_text("\n".join(line.format(a=images[0], other_a=other_a) for line in lines) + "\n")
    result = dre_batch("setup", write_config(tmp_path / "run.yaml"), tiles, "--run-dir", tmp_path / "run")
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert str(tiles) in result.stderr and not (tmp_path / "run").exists()


def test_setup_refuses_bad_config_and_creates_nothing(tmp_path, sim_tiles):
    config = write_config(tmp_path / "run.yaml")
    result = dre_batch("setup", config, sim_tiles, "--run-dir", tmp_path / "run", "--set", "fit.colour=red")
    assert result.returncode == 2 and "unknown key 'fit.colour'" in result.stderr
    assert not (tmp_path / "run").exists()


def test_local_run_end_to_end(reference):
    run_dir, result = reference
    assert "4 fits" not in result.stdout and "6 jobs run, 0 failed" in result.stdout
    status = dre_batch("status", run_dir, "--json")
    assert status.returncode == 0, status.stdout
    report = json.loads(status.stdout)
    assert report["all_done"] and report["counts"]["done"] == 6
    collate = dre_batch("collate", run_dir)
    assert collate.returncode == 0, collate.stderr
    catalogue = flat(run_dir)
    prep = [json.loads(p.read_text()) for p in sorted((run_dir / "markers" / "prep").glob("*.done"))]
    assert len(catalogue) == sum(p["n_objects"] for p in prep) > 10
    assert list(catalogue["TILE"]) == sorted(catalogue["TILE"])
    for name in ("tile_a", "tile_b"):
        rows = catalogue[catalogue["TILE"] == name]
        tile = Table.read(run_dir / "collated" / f"{name}_dre.fits")
        assert len(rows) == len(tile) and np.array_equal(rows["FLUX"], tile["FLUX"])
        assert np.array_equal(tile["ROW"], np.arange(len(tile)))
    header = fits.getheader(run_dir / "collated" / "batch_test_dre.fits", 1)
    assert header["CFGHASH"] == json.loads((run_dir / "manifest.json").read_text())["config_hash"]
    link = dre_batch("link", run_dir)
    assert link.returncode == 0, link.stderr
    linked = {p.name for p in (run_dir / "output").iterdir()}
    assert {"batch_test_dre.fits", "tile_a_dre.fits", "tile_b_chi.h5"} <= linked


def test_second_run_submits_nothing_and_dry_run_prints_commands(reference, tmp_path, sim_tiles):
    run_dir, _ = reference
    again = dre_batch("run", run_dir)
    assert again.returncode == 0 and "nothing to submit" in again.stdout
    fresh = tmp_path / "fresh"
    dre_batch("setup", write_config(tmp_path / "run.yaml", chunks_per_tile=2), sim_tiles, "--run-dir", fresh)
    dry = dre_batch("run", fresh, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    lines = [line for line in dry.stdout.splitlines() if "bash scripts/" in line]
    assert len(lines) == 2 + 4 and "DRE_TILE=1" in dry.stdout
    assert not (fresh / "jobs").exists() and not (fresh / "markers").exists()


def test_results_do_not_depend_on_chunking(reference, tmp_path, sim_tiles):
    """objects_per_chunk (chunk count known only after prep; one chunk for tile_a's 9 objects)
    against 2 chunks per tile (its two fitting units of fit.batch_size 8)."""
    run_dir = tmp_path / "run"
    config = write_config(tmp_path / "run.yaml", objects_per_chunk=16)
    assert dre_batch("setup", config, sim_tiles, "--run-dir", run_dir).returncode == 0
    result = dre_batch("run", run_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    assert dre_batch("collate", run_dir).returncode == 0
    assert len(list((run_dir / "markers" / "fit" / "tile_a").glob("*.done"))) == 1
    assert len(list((reference[0] / "markers" / "fit" / "tile_a").glob("*.done"))) == 2
    assert_same_catalogue(flat_path(run_dir), flat_path(reference[0]))


def test_status_and_collate_of_a_run_that_has_not_run(tmp_path, sim_tiles):
    run_dir = tmp_path / "run"
    dre_batch("setup", write_config(tmp_path / "run.yaml", chunks_per_tile=2), sim_tiles, "--run-dir", run_dir)
    status = dre_batch("status", run_dir)
    assert status.returncode == 1 and "unsubmitted" in status.stdout
    collate = dre_batch("collate", run_dir)
    assert collate.returncode == 2 and "tile_a" in collate.stderr and "Traceback" not in collate.stderr
    missing = dre_batch("status", tmp_path / "nowhere")
    assert missing.returncode == 2 and "run directory not found" in missing.stderr


def test_job_scripts_run_under_the_same_python(reference):
    run_dir, _ = reference
    assert sys.executable in (run_dir / "scripts" / "fit.sh").read_text()
    assert os.access(run_dir / "scripts" / "prep.sh", os.X_OK)
