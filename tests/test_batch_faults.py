"""Faults dre-batch must survive, on the local scheduler with real processes and real signals.

A fit process killed with SIGKILL mid-chunk (automatic retries off), a tile whose prep fails, a corrupted chunk output,
prep products purged before a fit, and two ``run`` commands on one run directory. (The same faults through real SLURM are in
test_batch_slurm.py.)
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from batch_helpers import (assert_collates_as_reference, dre_batch, flat_path, local_reference,  # noqa: F401
                           run_with_broken_tile, signal_when_started, sim_tiles, write_config)

pytestmark = pytest.mark.slow


def _kill_mid_chunk(run_dir: Path, tile: str, tile_index: int, chunk: int, timeout=120.0):
    """Wait until the chunk's fit has written its started marker, then SIGKILL its worker."""
    signal_when_started(run_dir, tile, tile_index, chunk, signal.SIGKILL,
                        lambda argv: b"dre_hpc.batch.worker" in argv and b"fit" in argv, timeout)


def test_sigkill_mid_chunk_then_failed_only_gives_the_same_catalogue(tmp_path, sim_tiles, local_reference):
    """With automatic retries off (a kill by a signal is retryable: test_batch_retry.py has the
    automatic rerun), the chunk stays failed until ``run --failed-only``."""
    run_dir = tmp_path / "run"
    config = write_config(tmp_path / "run.yaml", chunks_per_tile=2)
    assert dre_batch("setup", config, sim_tiles, "--run-dir", run_dir, "--set", "scheduler.retries=0").returncode == 0
    runner = subprocess.Popen([sys.executable, "-m", "dre_hpc.cli.dre_batch", "run", str(run_dir)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _kill_mid_chunk(run_dir, "tile_b", 1, 1)
        output, _ = runner.communicate(timeout=300)
    finally:
        runner.kill()
    assert runner.returncode == 1, output
    assert "fit tile_b chunk 1: failed: killed by signal 9" in output
    assert "fit tile_b chunk 1: not run again: automatic retries are off (scheduler.retries: 0)" in output
    status = dre_batch("status", run_dir, "--json")
    assert status.returncode == 1
    chunks = {(t["name"], c["chunk"]): c for t in json.loads(status.stdout)["tiles"] for c in t["chunks"]}
    assert chunks[("tile_b", 1)]["state"] == "failed" and "SIGKILL" in chunks[("tile_b", 1)]["reason"]
    assert [c["state"] for key, c in chunks.items() if key != ("tile_b", 1)] == ["done"] * 3
    assert not (run_dir / "chunks" / "tile_b" / "00001_dre.fits").exists()     # no half output
    done_before = {p: p.stat().st_mtime_ns for p in (run_dir / "markers").rglob("*.done")}
    records_before = len(list((run_dir / "jobs").glob("*.json")))

    rerun = dre_batch("run", run_dir, "--failed-only")
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    new = [json.loads(p.read_text()) for p in sorted((run_dir / "jobs").glob("*.json"))][records_before:]
    assert [(r["stage"], r["tile"], r["indices"]) for r in new] == [("fit", "tile_b", [1])]
    assert {p: p.stat().st_mtime_ns for p in done_before} == done_before   # nothing else ran again
    assert_collates_as_reference(run_dir, local_reference[0])


def test_failed_prep_blocks_its_fits_and_collate_lists_them(tmp_path, sim_tiles):
    images = Path(sim_tiles).read_text().split()
    run_dir, result = run_with_broken_tile(tmp_path, images[:1])
    assert "fit broken" not in result.stdout                  # its fits never started
    assert not (run_dir / "markers" / "fit" / "broken").exists()
    status = dre_batch("status", run_dir, "--json")
    assert status.returncode == 1
    tiles_status = {t["name"]: t for t in json.loads(status.stdout)["tiles"]}
    assert tiles_status["broken"]["prep"]["state"] == "failed"
    assert "broken.fits" in tiles_status["broken"]["prep"]["reason"]
    assert {c["state"] for c in tiles_status["broken"]["chunks"]} == {"blocked"}
    assert all("prep" in c["reason"] for c in tiles_status["broken"]["chunks"])
    assert {c["state"] for c in tiles_status["tile_a"]["chunks"]} == {"done"}
    table = dre_batch("status", run_dir)
    assert "broken" in table.stdout and "failed" in table.stdout

    refused = dre_batch("collate", run_dir)
    assert refused.returncode == 2 and "broken" in refused.stderr
    assert not flat_path(run_dir).exists()
    allowed = dre_batch("collate", run_dir, "--allow-missing")
    assert allowed.returncode == 0, allowed.stderr
    missing = json.loads((run_dir / "collated" / "missing.json").read_text())
    assert "broken" in json.dumps(missing)


def test_collate_refuses_a_corrupted_chunk_and_names_it(tmp_path, local_reference):
    run_dir = tmp_path / "run"
    shutil.copytree(local_reference[0], run_dir, symlinks=True)
    shutil.rmtree(run_dir / "collated", ignore_errors=True)
    chunk = run_dir / "chunks" / "tile_a" / "00001_dre.fits"
    data = bytearray(chunk.read_bytes())
    data[-100] ^= 0xFF                                        # one flipped byte in the table data
    chunk.write_bytes(bytes(data))
    result = dre_batch("collate", run_dir)
    assert result.returncode == 2 and "chunks/tile_a/00001_dre.fits" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and not flat_path(run_dir).exists()


def test_prep_products_purged_before_a_fit_are_redone_by_failed_only(tmp_path, local_reference):
    """A scratch purge took tile_a's PSF before its chunk 1 ran (represented by the PSF removed
    and chunk 1's done marker removed): that fit fails naming the file, and ``run --failed-only``
    then redoes tile_a's prep and every fit of it, done ones too, nothing of tile_b; the
    catalogue equals the uninterrupted run's."""
    run_dir = tmp_path / "run"
    shutil.copytree(local_reference[0], run_dir, symlinks=True)
    shutil.rmtree(run_dir / "collated", ignore_errors=True)
    (run_dir / "tiles" / "tile_a" / "PSF" / "tile_a.psf").unlink()
    (run_dir / "markers" / "fit" / "tile_a" / "00001.done").unlink()
    failed = dre_batch("run", run_dir, "--failed-only")
    assert failed.returncode == 1 and "fit tile_a chunk 1: failed" in failed.stdout, failed.stdout
    status = json.loads(dre_batch("status", run_dir, "--json").stdout)
    chunk = [t for t in status["tiles"] if t["name"] == "tile_a"][0]["chunks"][1]
    assert chunk["state"] == "failed" and chunk["redo_prep"] is True and chunk["retryable"] is False
    assert "tile_a.psf" in chunk["reason"] and "run --failed-only` redoes the tile's prep" in chunk["reason"]

    before = {p: p.stat().st_mtime_ns for p in (run_dir / "markers").rglob("*.done")}
    records_before = len(list((run_dir / "jobs").glob("*.json")))
    rerun = dre_batch("run", run_dir, "--failed-only")
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    new = [json.loads(p.read_text()) for p in sorted((run_dir / "jobs").glob("*.json"))][records_before:]
    assert sorted((r["stage"], r["tile"], r["indices"]) for r in new) == [
        ("fit", "tile_a", [0, 1]), ("prep", None, [0])]
    after = {p: p.stat().st_mtime_ns for p in (run_dir / "markers").rglob("*.done")}
    redone = {p for p in after if p not in before or after[p] != before[p]}
    assert {p.relative_to(run_dir).as_posix() for p in redone} == {
        "markers/prep/tile_a.done", "markers/fit/tile_a/00000.done", "markers/fit/tile_a/00001.done"}
    assert_collates_as_reference(run_dir, local_reference[0])


def test_a_second_run_refuses_while_one_holds_the_lock(tmp_path, sim_tiles):
    """The first `run` is represented by this test process holding DIR/.run.lock exactly as
    `run` holds it (flock), which makes the overlap deterministic."""
    run_dir = tmp_path / "run"
    assert dre_batch("setup", write_config(tmp_path / "run.yaml"), sim_tiles, "--run-dir", run_dir).returncode == 0
    with open(run_dir / ".run.lock", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        handle.write(f"pid {os.getpid()} since now\n")
        handle.flush()
        second = dre_batch("run", run_dir, timeout=60)
    assert second.returncode == 2 and "another dre-batch run" in second.stderr, second.stderr
    assert f"pid {os.getpid()}" in second.stderr
    assert not (run_dir / "jobs").exists() and not (run_dir / "markers").exists()
