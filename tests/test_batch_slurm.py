"""dre-batch end to end on the real single-host SLURM (fixture ``slurm_cluster``).

Every step goes through the real ``dre-batch`` command as a subprocess with the cluster's
environment, so ``sbatch``/``squeue`` talk to the private slurmctld and the jobs (``--export=ALL``)
get the test session's isolated cache with the default cube, generated once before any job runs.
Two tiny simulated tiles (512x512, 15 galaxies, 30 stars) are made once for the module.

- The reference: setup -> run (real job arrays, fits afterok on their tile's prep element) ->
  status --wait -> collate -> link; the same tiles on the local scheduler give an identical flat
  catalogue, and so does ``objects_per_chunk`` (the prep job submits its tile's fit array itself).
- Faults: a fit job whose processes are SIGKILLed mid-chunk (once its ``started`` marker is
  there; nothing of the job runs afterwards) is reported failed, one cancelled with ``scancel``
  checkpoints but does not resubmit itself, and ``run --failed-only`` reruns only them; a fit sent
  USR1 (``scancel --signal=USR1 --batch``, the walltime warning) checkpoints and resubmits itself; a tile
  whose image is garbage fails its prep, SLURM cancels its fits (``kill_invalid_depend``) and
  collate lists them; a second ``run`` while one holds the lock is refused. The lock is held by
  this test process with ``fcntl.flock`` on ``DIR/.run.lock`` (the lock ``run`` takes), which is
  deterministic where two racing ``run`` commands would not be.

Every subprocess has a timeout, ``status --wait`` included, so nothing here can hang.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from astropy.table import Table
from scratch import scratch_dir

pytestmark = [
    pytest.mark.slurm, pytest.mark.slow,
    pytest.mark.skipif(shutil.which("psfex") is None or (shutil.which("source-extractor") or
                                                         shutil.which("sex")) is None,
                       reason="SExtractor/PSFEx not installed (bin/install-system-packages)"),
]

RUN = "slurm_e2e"
TILES = ("tile_a", "tile_b")
WAIT = 180                      # seconds for `status --wait` (the whole run of tiny tiles takes ~15 s)
RESOURCES = {"mem_gb": 1, "cpus_per_task": 1, "walltime": "00:10:00", "partition": None}


# -- helpers ---------------------------------------------------------------------------------------
def write_config(path: Path, scheduler="slurm", chunking=None) -> Path:
    """A run config: tiny resources, the same seed and fit options for every run of the module."""
    config = {"run": {"name": RUN, "seed": 11},
              "fit": {"batch_size": 4},
              "prep": {"margin": 40},
              "chunking": chunking or {"chunks_per_tile": 2},
              "scheduler": {"name": scheduler},
              "resources": {"prep": dict(RESOURCES), "fit": dict(RESOURCES)}}
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


class Batch:
    """``dre-batch`` as a subprocess with the cluster's environment (timeouts everywhere)."""

    def __init__(self, cluster):
        self.cluster = cluster

    def __call__(self, *args, timeout=120) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "dre_hpc.cli.dre_batch", *map(str, args)],
                              env=self.cluster.env, capture_output=True, text=True, timeout=timeout)

    def ok(self, *args, timeout=120) -> subprocess.CompletedProcess:
        proc = self(*args, timeout=timeout)
        assert proc.returncode == 0, self.explain(proc)
        return proc

    def wait(self, run_dir, expect=0) -> subprocess.CompletedProcess:
        """``status --wait`` (bounded by the subprocess timeout); its exit code must be `expect`."""
        proc = self("status", run_dir, "--wait", "--interval", "0.5", timeout=WAIT)
        assert proc.returncode == expect, self.explain(proc, run_dir)
        return proc

    def json_status(self, run_dir) -> dict:
        proc = self("status", run_dir, "--json", timeout=60)
        return json.loads(proc.stdout)

    def explain(self, proc, run_dir=None) -> str:
        """Everything useful when a step fails: its output, the job logs, the daemons' logs."""
        text = f"{proc.args[3:]} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        if run_dir is not None:
            for log in sorted(Path(run_dir, "logs").rglob("*"))[:12]:
                if log.is_file():
                    text += f"\n--- {log}:\n{log.read_text(errors='replace')[-1500:]}"
        return text + "\n" + self.cluster.log_tails(10)


def records(run_dir) -> list:
    return [json.loads(p.read_text()) for p in sorted(Path(run_dir, "jobs").glob("*.json"))]


def flat(run_dir) -> Table:
    return Table.read(Path(run_dir) / "collated" / f"{RUN}_dre.fits")


def assert_same_catalogue(got: Table, want: Table) -> None:
    """Same columns, rows and values, exactly (NaN where NaN); header cards are not compared."""
    assert got.colnames == want.colnames
    assert len(got) == len(want) > 0
    for name in want.colnames:
        np.testing.assert_array_equal(np.asarray(got[name]), np.asarray(want[name]), err_msg=name)


def chunk_states(status: dict) -> dict:
    """``{(tile, chunk): (state, reason)}`` of the fit items in ``status --json``."""
    return {(t["name"], c["chunk"]): (c["state"], c["reason"]) for t in status["tiles"] for c in t["chunks"]}


# -- fixtures --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiles(request, tmp_path_factory):
    """Two tiny simulated tiles and a tiles file listing them: ``(tiles file, [images])``."""
    from dre_hpc.sim.tile import TileSpec, simulate_tile
    root = scratch_dir(request, tmp_path_factory, "slurm_tiles")
    images = [simulate_tile(TileSpec(size=512, n_galaxies=15, n_stars=30, seed=3 + i),
                            root / "Tiles" / f"{name}.fits", root / f"{name}_truth.fits")[0]
              for i, name in enumerate(TILES)]
    listing = root / "tiles.txt"
    listing.write_text("".join(f"{image}\n" for image in images))
    return listing, images


@pytest.fixture(scope="module")
def batch(slurm_cluster, default_cube_file):
    """The command runner; the default cube exists before any job runs (no job generates it)."""
    assert Path(default_cube_file).is_file()
    return Batch(slurm_cluster)


@pytest.fixture(scope="module")
def reference(request, tmp_path_factory, tiles, batch):
    """The uninterrupted SLURM run (2 tiles x 2 chunks): setup, dry run, run, status --wait,
    collate, link. Returns ``{"dir", "dry", "run", "status", "collate", "link"}``."""
    root = scratch_dir(request, tmp_path_factory, "slurm_reference")
    run_dir = root / "run"
    batch.ok("setup", write_config(root / "run.yaml"), tiles[0], "--run-dir", run_dir)
    steps = {"dir": run_dir, "dry": batch.ok("run", run_dir, "--dry-run")}
    assert not (run_dir / "jobs").exists(), "a dry run submitted something"
    steps["run"] = batch.ok("run", run_dir)
    steps["status"] = batch.wait(run_dir)
    steps["collate"] = batch.ok("collate", run_dir)
    steps["link"] = batch("link", run_dir)
    return steps


# -- the reference run -----------------------------------------------------------------------------
def test_dry_run_prints_array_submissions_with_afterok(reference):
    lines = [line for line in reference["dry"].stdout.splitlines() if line.startswith("sbatch ")]
    assert len(lines) == 3, reference["dry"].stdout                  # one prep array, one fit array a tile
    prep, fits = lines[0], lines[1:]
    assert "--array=0-1" in prep and prep.endswith("scripts/prep.sh") and "--dependency" not in prep
    for index, line in enumerate(fits):
        assert "--array=0-1" in line and line.endswith("scripts/fit.sh"), line
        assert f"DRE_TILE={index}" in line and f"--dependency=afterok:PREP_JOB_ID_{index}" in line, line
    assert "# PREP_JOB_ID below: the job id the prep submission prints" in reference["dry"].stdout


def test_run_records_real_job_ids_with_per_tile_afterok(reference, slurm_cluster):
    run_dir = reference["dir"]
    jobs = records(run_dir)
    assert [(r["stage"], r["tile"], r["indices"]) for r in jobs] == [
        ("prep", None, [0, 1]), ("fit", "tile_a", [0, 1]), ("fit", "tile_b", [0, 1])]
    prep_id = jobs[0]["job_id"]
    assert all(r["job_id"].isdigit() and r["scheduler"] == "slurm" for r in jobs)
    for index, record in enumerate(jobs[1:]):
        assert f"--dependency=afterok:{prep_id}_{index}" in record["command"]
    # the printed commands are the recorded ones
    assert [" ".join(r["command"]) for r in jobs] == [
        line for line in reference["run"].stdout.splitlines() if line.startswith("sbatch ")]
    # the done markers come before each job script's own end (its finish step), so the jobs may
    # still be RUNNING for a moment when `status --wait` returns: wait for them to leave the queue
    states = slurm_cluster.wait_for([r["job_id"] for r in jobs], timeout=60)
    assert states == {f"{r['job_id']}_{k}": "COMPLETED" for r in jobs for k in (0, 1)}


def test_status_reports_everything_done(reference, batch):
    assert "6/6 done" in reference["status"].stdout
    status = batch.json_status(reference["dir"])
    assert status["all_done"] and status["counts"]["done"] == status["items"] == 6
    for tile in status["tiles"]:
        assert tile["prep"]["state"] == "done" and tile["prep"]["job_id"].isdigit()
        assert [c["state"] for c in tile["chunks"]] == ["done", "done"]
    done = json.loads((reference["dir"] / "markers" / "fit" / "tile_b" / "00001.done").read_text())
    assert done["job_id"] == f"{records(reference['dir'])[2]['job_id']}_1"     # written by that element


def test_collate_writes_per_tile_files_and_a_flat_catalogue(reference):
    collated = reference["dir"] / "collated"
    table = flat(reference["dir"])
    assert table.colnames[0] == "TILE"
    rows = {name: len(Table.read(collated / f"{name}_dre.fits")) for name in TILES}
    assert all(rows.values()) and all((collated / f"{name}_chi.h5").is_file() for name in TILES)
    assert [(name, int((table["TILE"] == name).sum())) for name in TILES] == list(rows.items())
    assert len(table) == sum(rows.values())


def test_link_fills_the_output_folder(reference):
    link = reference["link"]
    assert link.returncode == 0, link.stdout + link.stderr
    output = reference["dir"] / "output"
    names = {p.name for p in output.iterdir()}
    assert {f"{RUN}_dre.fits", "tile_a_dre.fits", "tile_b_dre.fits", "tile_a_chi.h5"} <= names
    assert_same_catalogue(Table.read(output / f"{RUN}_dre.fits"), flat(reference["dir"]))


def test_local_scheduler_gives_the_identical_catalogue(reference, tiles, batch, tmp_path):
    run_dir = tmp_path / "local"
    batch.ok("setup", write_config(tmp_path / "run.yaml", scheduler="local"), tiles[0], "--run-dir", run_dir)
    batch.ok("run", run_dir, timeout=WAIT)
    batch.ok("status", run_dir, timeout=60)
    batch.ok("collate", run_dir)
    assert {r["job_id"].split("-")[0] for r in records(run_dir)} == {"local"}
    assert_same_catalogue(flat(run_dir), flat(reference["dir"]))


def test_objects_per_chunk_prep_submits_the_fits(reference, tiles, batch, tmp_path):
    run_dir = tmp_path / "opc"
    config = write_config(tmp_path / "run.yaml", chunking={"objects_per_chunk": 5})
    batch.ok("setup", config, tiles[0], "--run-dir", run_dir)
    run = batch.ok("run", run_dir)
    assert run.stdout.count("submitted by its prep job") == 2, run.stdout
    assert [r["stage"] for r in records(run_dir)] == ["prep"]      # run itself submitted only prep
    batch.wait(run_dir)
    jobs = records(run_dir)
    rows = {name: len(Table.read(reference["dir"] / "collated" / f"{name}_dre.fits")) for name in TILES}
    fits = sorted((r["tile"], r["indices"]) for r in jobs if r["stage"] == "fit")
    assert fits == [(name, list(range(-(-rows[name] // 5)))) for name in TILES]   # by the prep jobs
    prep_id = jobs[0]["job_id"]
    for record in jobs[1:]:                     # afterok on the prep element that submitted them
        index = TILES.index(record["tile"])
        assert f"--dependency=afterok:{prep_id}_{index}" in record["command"], record
    status = batch.json_status(run_dir)
    assert status["all_done"] and [t["n_chunks"] for t in status["tiles"]] == [-(-rows[n] // 5) for n in TILES]
    batch.ok("collate", run_dir)
    assert_same_catalogue(flat(run_dir), flat(reference["dir"]))


# -- faults ----------------------------------------------------------------------------------------
def _wait_for(path: Path, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{what}: {path} did not appear within {timeout} s"
        time.sleep(0.02)


def _sigkill_element(job_id: str, index: int) -> int:
    """SIGKILL every process of one running array element (its batch shell and the worker, found
    by their SLURM_ARRAY_* environment in /proc), as the OOM killer or a dying node would: nothing
    of the job runs afterwards. Returns how many processes were killed."""
    wanted = {f"SLURM_ARRAY_JOB_ID={job_id}".encode(), f"SLURM_ARRAY_TASK_ID={index}".encode()}
    found = []
    for entry in Path("/proc").iterdir():
        try:
            env = set((entry / "environ").read_bytes().split(b"\0")) if entry.name.isdigit() else set()
            program = (entry / "cmdline").read_bytes().split(b"\0")[0]
        except OSError:
            continue
        if wanted <= env:
            found.append((not program.endswith(b"bash"), int(entry.name)))
    for _, pid in sorted(found):                # the batch shell first: no finish step runs
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return len(found)


def test_fit_killed_or_cancelled_mid_chunk_is_rerun_alone(reference, tiles, batch, slurm_cluster, tmp_path):
    """tile_a chunk 1 is SIGKILLed (shell and worker at once): it vanishes without an outcome.
    tile_b chunk 1 is cancelled with scancel, which sends SIGTERM first: the worker checkpoints,
    but the job does not resubmit itself (a user stopped it). `run --failed-only` reruns both."""
    run_dir = tmp_path / "kill"
    batch.ok("setup", write_config(tmp_path / "run.yaml"), tiles[0], "--run-dir", run_dir)
    batch.ok("run", run_dir)
    fit_a, fit_b = (next(r for r in records(run_dir) if r["tile"] == t)["job_id"] for t in TILES)
    # act on each chunk as soon as it starts, in whichever order SLURM runs them (waiting for one
    # first let the other finish unseen on a loaded machine)
    actions = {"tile_a": lambda: _sigkill_element(fit_a, 1) >= 2,          # mid-payload
               "tile_b": lambda: slurm_cluster.run(["scancel", f"{fit_b}_1"]) is not None}
    deadline = time.monotonic() + 120
    while actions:
        for tile in list(actions):
            markers = run_dir / "markers" / "fit" / tile
            assert not (markers / "00001.done").exists(), f"{tile} chunk 1 ended before it was seen running"
            if (markers / "00001.started").exists():
                assert actions.pop(tile)(), f"{tile} chunk 1: no process to kill"
        assert time.monotonic() < deadline, f"chunk 1 of {sorted(actions)} did not start within 120 s"
        time.sleep(0.02)
    first = batch.wait(run_dir, expect=1)
    states = chunk_states(batch.json_status(run_dir))
    state, reason = states.pop(("tile_a", 1))
    assert state == "failed" and "ended without writing an outcome" in reason, (state, reason)
    log = reason.rpartition("log: ")[2]          # SLURM's output of that element (--output=...%A_%a)
    assert log == f"logs/slurm/{RUN}-fit-tile_a-{fit_a}_1.out" and (run_dir / log).is_file(), reason
    assert "fit tile_a chunk 1 [failed]: the job ended without writing an outcome" in first.stdout
    state, reason = states.pop(("tile_b", 1))
    # the worker's checkpoint exit, or (SIGTERM before its handler was set) the script's finish
    assert state == "failed" and reason.startswith(("interrupted by SIG", "killed by signal 15")), reason
    cancelled = (run_dir / "logs" / "slurm" / f"{RUN}-fit-tile_b-{fit_b}_1.out").read_text()
    assert f"fit tile_b chunk 1: not resubmitted: job {fit_b}_1 is being cancelled (scancel)" in cancelled
    assert "retryable, but its job ended without resubmitting it" in first.stdout
    assert {s for s, _ in states.values()} == {"done"}
    assert not (run_dir / "chunks" / "tile_a" / "00001_dre.fits").exists()
    assert not any("attempt" in r for r in records(run_dir))             # nothing resubmitted itself
    before = len(records(run_dir))

    rerun = batch.ok("run", run_dir, "--failed-only")
    new = records(run_dir)[before:]
    assert [(r["stage"], r["tile"], r["indices"]) for r in new] == [
        ("fit", "tile_a", [1]), ("fit", "tile_b", [1])], rerun.stdout
    assert "--array=0" in new[0]["command"] and "DRE_ARRAY_OFFSET=1" in new[0]["command"][4]
    batch.wait(run_dir)
    batch.ok("collate", run_dir)
    assert_same_catalogue(flat(run_dir), flat(reference["dir"]))


def test_fit_interrupted_by_usr1_resubmits_itself(reference, tiles, batch, slurm_cluster, tmp_path):
    """``scancel --signal=USR1 --batch`` on a running fit, what ``--signal=B:USR1@N`` does before
    the walltime: the job script forwards USR1 to the worker, which checkpoints and exits 75; the
    job's finish step resubmits the chunk (attempt 2, recorded); ``status --wait`` follows the new
    job to the end; the catalogue is the reference's."""
    run_dir = tmp_path / "usr1"
    batch.ok("setup", write_config(tmp_path / "run.yaml"), tiles[0], "--run-dir", run_dir)
    batch.ok("run", run_dir)
    fit_a = next(r for r in records(run_dir) if r["tile"] == "tile_a")["job_id"]
    _wait_for(run_dir / "markers" / "fit" / "tile_a" / "00001.started", 120, "fit tile_a chunk 1")
    slurm_cluster.run(["scancel", "--signal=USR1", "--batch", f"{fit_a}_1"])
    shown = batch.wait(run_dir).stdout
    assert "6/6 done" in shown
    retried = [r for r in records(run_dir) if "attempt" in r]
    assert [(r["stage"], r["tile"], r["indices"], r["offset"], r["attempt"], r["retry_of"]) for r in retried] == [
        ("fit", "tile_a", [1], 1, 2, f"{fit_a}_1")], records(run_dir)
    new = retried[0]["job_id"]
    log = (run_dir / "logs" / "slurm" / f"{RUN}-fit-tile_a-{fit_a}_1.out").read_text()
    assert "fit tile_a chunk 1: interrupted (" in log, log
    assert f"; resubmitted as job {new}, retry 1 of 2 (attempt 2 of 3)" in log, log
    states = slurm_cluster.wait_for([fit_a, new], timeout=60)       # done marker first, then the job ends
    assert (states[f"{fit_a}_1"], states[f"{fit_a}_0"], states[f"{new}_0"]) == ("FAILED", "COMPLETED", "COMPLETED")
    done = json.loads((run_dir / "markers" / "fit" / "tile_a" / "00001.done").read_text())
    assert (done["job_id"], done["attempt"]) == (f"{new}_0", 2)
    batch.ok("collate", run_dir)
    assert_same_catalogue(flat(run_dir), flat(reference["dir"]))


def test_failed_prep_cancels_its_fits_and_collate_lists_them(reference, tiles, batch, slurm_cluster,
                                                             tmp_path):
    bad = tmp_path / "Tiles" / "tile_bad.fits"
    bad.parent.mkdir()
    bad.write_bytes(b"SIMPLE  = garbage, not a FITS file" + bytes(range(256)) * 20)
    listing = tmp_path / "tiles.txt"
    listing.write_text(f"{tiles[1][0]}\n{bad}\n")
    run_dir = tmp_path / "badprep"
    batch.ok("setup", write_config(tmp_path / "run.yaml"), listing, "--run-dir", run_dir)
    batch.ok("run", run_dir)
    fit_bad = next(r for r in records(run_dir) if r["tile"] == "tile_bad")["job_id"]
    shown = batch.wait(run_dir, expect=1).stdout
    status = batch.json_status(run_dir)
    bad_tile = next(t for t in status["tiles"] if t["name"] == "tile_bad")
    prep_reason = bad_tile["prep"]["reason"]
    assert bad_tile["prep"]["state"] == "failed" and prep_reason
    for chunk in bad_tile["chunks"]:
        assert chunk["state"] == "blocked" and chunk["reason"] == f"prep of tile tile_bad failed: {prep_reason}"
    assert "fit tile_bad chunk 0 [blocked]: prep of tile tile_bad failed" in shown
    assert not (run_dir / "markers" / "fit" / "tile_bad").exists()          # the fits never started
    assert set(slurm_cluster.wait_for(fit_bad, timeout=60).values()) == {"CANCELLED"}
    good = next(t for t in status["tiles"] if t["name"] == "tile_a")
    assert good["prep"]["state"] == "done" and {c["state"] for c in good["chunks"]} == {"done"}

    refused = batch("collate", run_dir)
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert "tile tile_bad chunk 0: blocked" in refused.stderr and "tile tile_bad chunk 1: blocked" in refused.stderr
    assert not (run_dir / "collated" / f"{RUN}_dre.fits").exists()
    batch.ok("collate", run_dir, "--allow-missing")
    table, want = flat(run_dir), flat(reference["dir"])
    assert_same_catalogue(table, want[want["TILE"] == "tile_a"])


def test_second_run_on_a_locked_run_dir_is_refused(reference, batch):
    run_dir = reference["dir"]
    before = len(records(run_dir))
    with open(run_dir / ".run.lock", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)       # what a running `dre-batch run` holds
        refused = batch("run", run_dir, "--failed-only")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "another dre-batch run is working on this run directory" in refused.stderr
    assert len(records(run_dir)) == before
    free = batch.ok("run", run_dir)                          # the lock released: nothing left to do
    assert "nothing to submit" in free.stdout and len(records(run_dir)) == before
