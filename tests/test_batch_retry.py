"""Automatic retries of interrupted job items (dre_hpc.batch.retry, worker finish, local_run, status).

Fast tests first: the retry rule, the finish step of a SLURM job resubmitting its own item through
a stand-in ``sbatch`` (a bash script that records its arguments and prints a job id: no cluster
runs here; the real SLURM test is in test_batch_slurm.py), and `status` on hand-built run
directories with a queue object that answers like a scheduler. Then, marked slow, real local runs:
the real job scripts and the real worker, interrupted by a real SIGUSR1 sent to the job script.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from batch_fixtures import done_chunk, done_prep, make_run, submit
from batch_helpers import (assert_collates_as_reference, dre_batch, local_reference,  # noqa: F401
                           run_with_broken_tile, signal_when_started, sim_tiles, write_config)
from dre_hpc.batch import retry
from dre_hpc.batch import status as st
from dre_hpc.batch.worker import finish

from standins import write_standin

# -- the rule ----------------------------------------------------------------------------------


def test_decide_counts_attempts_from_marker_and_record():
    assert retry.decide({"retryable": True}, 2).describe() == "retry 1 of 2 (attempt 2 of 3)"
    assert retry.decide({"retryable": True, "attempt": 2}, 2).allowed
    last = retry.decide({"retryable": True, "attempt": 1}, 2, record_attempt=3)
    assert not last.allowed and last.why_not() == "no retry left (attempt 3 of 3, scheduler.retries: 2)"
    assert retry.decide({"retryable": True}, 0).why_not() == "automatic retries are off (scheduler.retries: 0)"
    assert not retry.decide({"retryable": False}, 5).allowed
    assert retry.attempt_of({"attempt": "x"}) == 1 and retry.attempt_of(None) == 1


def test_same_job():
    assert retry.same_job("123_4", "123_4") and not retry.same_job("123_4", "123_5")
    assert not retry.same_job("123", "123_4") and not retry.same_job(None, None)
    assert retry.same_job("123[4].pbs01", "123[4].pbs01.example.org")
    assert retry.same_job("local-77", "local-77") and not retry.same_job("local-77", "local-78")


# -- the finish step of a SLURM job (stand-in sbatch) ------------------------------------------------
SBATCH = r'''n=$(cat "$SBATCH_DIR/next" 2>/dev/null || echo 700)
echo $((n + 1)) > "$SBATCH_DIR/next"
printf '%s\n' "$@" > "$SBATCH_DIR/call-$n"
echo "$n"
'''
# squeue -h -j ID -o "%T %r" about the job itself: RUNNING (signalled), or what $SBATCH_DIR/state says
SQUEUE = r'''cat "$SBATCH_DIR/state" 2>/dev/null || echo "RUNNING None"
'''


def slurm_standins(tmp_path, monkeypatch, job="101", task="1"):
    """sbatch and squeue stand-ins on PATH; this process is array element JOB_TASK."""
    write_standin(tmp_path / "bin", "sbatch", SBATCH)
    write_standin(tmp_path / "bin", "squeue", SQUEUE)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SBATCH_DIR", str(tmp_path))
    monkeypatch.delenv("DRE_JOB_ID", raising=False)
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", job)
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", task)


@pytest.fixture
def slurm_run(tmp_path, monkeypatch):
    """A SLURM run dir (tile a: 10 objects, 2 chunks), prep done, fits submitted as job 101; this
    process is array element 101_1 (chunk 1); sbatch is a stand-in printing 700, 701, ...; squeue
    says the job is running (signalled, not cancelled)."""
    rundir = make_run(tmp_path / "run", {"a": 10}, chunks_per_tile=2, scheduler="slurm")
    done_prep(rundir, "a", 10, 2)
    submit(rundir, "prep", None, [0], "100")
    rundir.record_submission({"stage": "fit", "tile": "a", "indices": [0, 1], "offset": 0,
                              "job_id": "101", "scheduler": "slurm", "command": [], "time": "t"})
    slurm_standins(tmp_path, monkeypatch)
    return rundir


def interrupted(rundir, k=1, job="101_1", attempt=1, retryable=True, stage="fit", tile="a"):
    """The failed marker the worker writes when a signal stops it (exit 75)."""
    rundir.write_marker(stage, tile, k, "failed", {
        "reason": "interrupted by SIGUSR1: the checkpoint holds 4 of 5 objects", "traceback": None,
        "exit_code": 75, "retryable": retryable, "job_id": job, "host": "h", "time": "t",
        "attempt": attempt})


def sbatch_calls(tmp_path) -> list:
    return [p.read_text().split("\n")[:-1] for p in sorted(tmp_path.glob("call-*"))]


def records(rundir) -> list:
    return rundir.submissions()


def test_finish_resubmits_an_interrupted_fit(slurm_run, tmp_path, capsys):
    interrupted(slurm_run)
    assert finish("fit", slurm_run.root, 75, tile=0, chunk=1) == 0
    out = capsys.readouterr().out
    assert out == ("fit a chunk 1: interrupted (interrupted by SIGUSR1: the checkpoint holds 4 of 5 "
                   "objects); resubmitted as job 700, retry 1 of 2 (attempt 2 of 3)\n")
    [call] = sbatch_calls(tmp_path)
    assert call[:4] == ["--parsable", "--array=0", "--job-name=testrun-fit-a",
                        "--export=ALL,DRE_TILE=0,DRE_ARRAY_OFFSET=1"]
    assert call[-1] == "scripts/fit.sh" and not any("dependency" in a for a in call)
    last = records(slurm_run)[-1]
    assert (last["stage"], last["tile"], last["indices"], last["offset"], last["job_id"]) == ("fit", "a", [1], 1, "700")
    assert (last["attempt"], last["retry_of"]) == (2, "101_1")
    assert slurm_run.read_marker("fit", "a", 1)[0] == "failed"      # until the new job starts


def test_finish_of_the_retry_counts_on_and_stops_at_retries(slurm_run, tmp_path, monkeypatch, capsys):
    """Job 700 (attempt 2) is interrupted too: retry 2; then job 701 (attempt 3): no retry left."""
    interrupted(slurm_run)
    finish("fit", slurm_run.root, 75, tile=0, chunk=1)
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "700")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "0")
    interrupted(slurm_run, job="700_0", attempt=2)
    finish("fit", slurm_run.root, 75, tile=0, chunk=1)
    assert "resubmitted as job 701, retry 2 of 2 (attempt 3 of 3)" in capsys.readouterr().out
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "701")
    interrupted(slurm_run, job="701_0", attempt=3)
    finish("fit", slurm_run.root, 75, tile=0, chunk=1)
    assert capsys.readouterr().out == ("fit a chunk 1: not resubmitted: no retry left "
                                       "(attempt 3 of 3, scheduler.retries: 2)\n")
    assert len(sbatch_calls(tmp_path)) == 2 and [r.get("attempt") for r in records(slurm_run)][-2:] == [2, 3]


def test_finish_records_a_signal_kill_with_its_attempt_and_resubmits(slurm_run, tmp_path, capsys):
    """The payload died of the forwarded USR1 (no handler yet): finish writes the failed marker,
    attempt from the started marker, and resubmits."""
    slurm_run.write_marker("fit", "a", 1, "started", {"job_id": "101_1", "host": "h", "time": "t", "attempt": 1})
    finish("fit", slurm_run.root, 138, tile=0, chunk=1)
    kind, content = slurm_run.read_marker("fit", "a", 1)
    assert kind == "failed" and content["retryable"] and content["attempt"] == 1
    assert content["reason"] == "killed by signal 10 (SIGUSR1; exit code 138)"
    assert "resubmitted as job 700" in capsys.readouterr().out


def test_no_resubmission_for_errors_or_when_someone_else_resubmitted(slurm_run, tmp_path, capsys):
    interrupted(slurm_run, retryable=False)                        # a Python error
    finish("fit", slurm_run.root, 1, tile=0, chunk=1)
    assert capsys.readouterr().out == "" and not sbatch_calls(tmp_path)
    interrupted(slurm_run)
    submit(slurm_run, "fit", "a", [1], "555")                     # e.g. run --failed-only, meanwhile
    finish("fit", slurm_run.root, 75, tile=0, chunk=1)
    assert "not resubmitted: job 555_0 was submitted for it after this one" in capsys.readouterr().out
    assert not sbatch_calls(tmp_path)


def test_a_cancelled_job_does_not_resubmit_itself(slurm_run, tmp_path, capsys):
    """scancel sends SIGTERM before SIGKILL, so the worker checkpoints as at the walltime; squeue
    tells them apart (COMPLETING: reason None after scancel, TimeLimit at the walltime)."""
    interrupted(slurm_run)
    (tmp_path / "state").write_text("COMPLETING None\n")
    finish("fit", slurm_run.root, 75, tile=0, chunk=1)
    assert capsys.readouterr().out == ("fit a chunk 1: not resubmitted: job 101_1 is being cancelled "
                                       "(scancel); `dre-batch run --failed-only` reruns it\n")
    assert not sbatch_calls(tmp_path)
    (tmp_path / "state").write_text("COMPLETING TimeLimit\n")
    finish("fit", slurm_run.root, 75, tile=0, chunk=1)
    assert "resubmitted as job 700" in capsys.readouterr().out


def test_a_stale_marker_of_an_earlier_job_is_not_this_jobs_outcome(slurm_run, tmp_path, capsys):
    """Job 101_1 exits 2 before writing any marker; the failed marker there is job 99_1's
    (attempt 1): finish records this job's failure (attempt 2, not retryable) and resubmits nothing."""
    interrupted(slurm_run, job="99_1")
    finish("fit", slurm_run.root, 2, tile=0, chunk=1)
    kind, content = slurm_run.read_marker("fit", "a", 1)
    assert content["reason"] == "exited with code 2 without writing an outcome"
    assert (content["job_id"], content["attempt"], content["retryable"]) == ("101_1", 2, False)
    assert not sbatch_calls(tmp_path)


def test_finish_resubmits_a_prep_with_its_fits_afterok(tmp_path, monkeypatch, capsys):
    rundir = make_run(tmp_path / "run", {"a": 10, "b": 10}, chunks_per_tile=3, scheduler="slurm")
    submit(rundir, "prep", None, [0, 1], "100")
    slurm_standins(tmp_path, monkeypatch, job="100", task="1")
    done_chunk(rundir, "b", 1, 10, 2, 3, write_outputs=False)      # (a chunk done by an earlier run)
    interrupted(rundir, stage="prep", tile="b", k=None, job="100_1")
    finish("prep", rundir.root, 138, tile=1)
    assert "prep b: interrupted" in capsys.readouterr().out
    prep, fits = sbatch_calls(tmp_path)
    assert prep[1:4] == ["--array=0", "--job-name=testrun-prep", "--export=ALL,DRE_ARRAY_OFFSET=1"]
    assert fits[1:5] == ["--array=0-1", "--job-name=testrun-fit-b", "--export=ALL,DRE_TILE=1,DRE_ARRAY_OFFSET=0",
                         "--dependency=afterok:700_0"]
    new = records(rundir)[-2:]
    assert [(r["stage"], r["indices"], r.get("attempt")) for r in new] == [("prep", [1], 2), ("fit", [0, 1], None)]


def test_finish_waits_for_the_run_lock_and_gives_up_in_time(slurm_run, tmp_path, monkeypatch, capsys):
    """A `dre-batch run` holding the lock (this process, flock like `run`) delays the resubmission
    until it lets go; one that holds it longer than LOCK_WAIT makes the job give up with a message
    (then `run --failed-only` reruns it, because status shows the item failed)."""
    interrupted(slurm_run)
    handle = open(slurm_run.lock, "a+")
    fcntl.flock(handle, fcntl.LOCK_EX)
    threading.Timer(0.5, handle.close).start()
    begin = time.monotonic()
    finish("fit", slurm_run.root, 75, tile=0, chunk=1)
    assert time.monotonic() - begin >= 0.4 and "resubmitted as job 700" in capsys.readouterr().out
    monkeypatch.setattr(retry, "LOCK_WAIT", 0.3)
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "700")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "0")
    interrupted(slurm_run, job="700_0", attempt=2)
    with open(slurm_run.lock, "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        finish("fit", slurm_run.root, 75, tile=0, chunk=1)
    assert "another dre-batch run is working on this run directory" in capsys.readouterr().err
    assert len(sbatch_calls(tmp_path)) == 1


# -- status ----------------------------------------------------------------------------------------
class Queue:
    """What `status` asks a scheduler: `active` (from a dict) and `dependency_id` (SLURM's)."""

    def __init__(self, answer=None, on_ask=None):
        self.answer, self.on_ask = dict(answer or {}), on_ask

    def active(self, job_ids):
        if self.on_ask:
            self.on_ask()
        return dict(self.answer)

    def dependency_id(self, job_id, index):
        return f"{job_id}_{index}"


def chunk1(rundir, queue):
    return next(i for i in st.collect(rundir, queue).items if i.stage == "fit" and i.chunk == 1)


def test_status_while_the_job_resubmits_and_after(slurm_run):
    interrupted(slurm_run)
    item = chunk1(slurm_run, Queue({("101", 1): "running"}))       # the job is in its finish step
    assert (item.state, item.attempt, item.retryable) == ("running", 1, True)
    assert item.retry == "retry 1 of 2 (attempt 2 of 3) being submitted by its job"
    item = chunk1(slurm_run, Queue())                               # it ended without resubmitting
    assert item.state == "failed" and "retryable, but its job ended without resubmitting it" in item.retry
    slurm_run.record_submission({"stage": "fit", "tile": "a", "indices": [1], "offset": 1, "job_id": "700",
                                 "scheduler": "slurm", "command": [], "time": "t", "attempt": 2,
                                 "retry_of": "101_1"})
    status = st.collect(slurm_run, Queue({("700", 0): "pending"}))
    item = next(i for i in status.items if i.chunk == 1)
    assert (item.state, item.job_id, item.retry) == ("pending", "700", "retry 1 of 2 submitted")
    assert item.reason.startswith("interrupted by SIGUSR1")
    assert "1 retried or resubmitted:\n  fit a chunk 1 [pending]: interrupted by SIGUSR1" in st.format_table(status)
    entry = status.to_json()["tiles"][0]["chunks"][1]
    assert (entry["attempt"], entry["retryable"], entry["retry"]) == (1, True, "retry 1 of 2 submitted")
    item = chunk1(slurm_run, Queue())                              # the retry left the queue unstarted
    assert item.state == "failed" and "but job 700_0 left the queue without starting" in item.reason


def test_status_sees_a_retry_submitted_between_reading_records_and_asking(slurm_run):
    """The job resubmits and ends between status reading jobs/ and asking the queue."""
    interrupted(slurm_run)
    resubmit = lambda: slurm_run.record_submission({  # noqa: E731
        "stage": "fit", "tile": "a", "indices": [1], "offset": 1, "job_id": "700", "scheduler": "slurm",
        "command": [], "time": "t", "attempt": 2})
    item = chunk1(slurm_run, Queue(on_ask=resubmit))
    assert (item.state, item.job_id, item.retry) == ("pending", "700", "retry 1 of 2 submitted")


def test_status_of_exhausted_and_unretryable_failures(slurm_run):
    interrupted(slurm_run, attempt=3)
    item = chunk1(slurm_run, Queue({("101", 1): "running"}))
    assert item.state == "failed" and item.retry == "no retry left (attempt 3 of 3, scheduler.retries: 2)"
    assert "(no retry left (attempt 3 of 3" in st.format_table(st.collect(slurm_run, Queue()))
    interrupted(slurm_run, retryable=False)
    item = chunk1(slurm_run, Queue({("101", 1): "running"}))
    assert (item.state, item.retryable, item.retry) == ("failed", False, None)


def test_status_follows_a_manual_resubmission(slurm_run):
    """`run --failed-only` resubmitted a failed chunk: pending until its job writes a marker
    (before, status said failed and `status --wait` returned at once)."""
    interrupted(slurm_run, retryable=False)
    submit(slurm_run, "fit", "a", [1], "555")
    item = chunk1(slurm_run, Queue({("555", 0): "pending"}))
    assert (item.state, item.job_id, item.retry) == ("pending", "555", "resubmitted")


# -- real local runs ---------------------------------------------------------------------------------
def _interrupt(run_dir: Path, tile: str, tile_index: int, chunk: int, timeout=120.0) -> None:
    """Once the chunk's fit has written its started marker, SIGUSR1 to its job script (which
    forwards it to the worker: what SLURM's --signal=B:USR1 does at the walltime warning)."""
    signal_when_started(run_dir, tile, tile_index, chunk, signal.SIGUSR1,
                        lambda argv: argv[:2] == [b"bash", b"scripts/fit.sh"], timeout)


def _run_interrupted(tmp_path, tiles, *setup_args):
    """setup + run on the local scheduler, tile_b chunk 1 interrupted once; (run_dir, output, code)."""
    run_dir = tmp_path / "run"
    config = write_config(tmp_path / "run.yaml", chunks_per_tile=2)
    assert dre_batch("setup", config, tiles, "--run-dir", run_dir, *setup_args).returncode == 0
    runner = subprocess.Popen([sys.executable, "-m", "dre_hpc.cli.dre_batch", "run", str(run_dir)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _interrupt(run_dir, "tile_b", tiles.read_text().split().index(str(_tile_b(tiles))), 1)
        output, _ = runner.communicate(timeout=300)
    finally:
        runner.kill()
    return run_dir, output, runner.returncode


def _tile_b(tiles: Path) -> Path:
    return next(Path(p) for p in tiles.read_text().split() if Path(p).stem == "tile_b")


# A retryable failure of the first attempt: the worker's checkpoint exit, or (signal before its
# handler was installed) the script's finish recording the kill by USR1.
FIRST_FAILURE = ("fit tile_b chunk 1: failed: interrupted by SIGUSR1", "fit tile_b chunk 1: failed: killed by signal 10")


@pytest.mark.slow
def test_local_interrupted_chunk_is_rerun_automatically(tmp_path, sim_tiles, local_reference):
    run_dir, output, code = _run_interrupted(tmp_path, sim_tiles)
    assert code == 0, output
    assert any(line in output for line in FIRST_FAILURE), output
    assert "fit tile_b chunk 1: running it again, retry 1 of 2 (attempt 2 of 3)" in output
    assert "fit tile_b chunk 1: done" in output and "6 jobs run, 0 failed" in output
    chunk_records = [r for r in records_of(run_dir) if r["stage"] == "fit" and r["tile"] == "tile_b"]
    assert [(r["indices"], r.get("attempt")) for r in chunk_records] == [([0, 1], None), ([1], 2)]
    assert chunk_records[1]["retry_of"] == chunk_records[0]["job_id"]      # local-<pid of run>
    done = json.loads((run_dir / "markers" / "fit" / "tile_b" / "00001.done").read_text())
    assert done["attempt"] == 2
    log = (run_dir / "logs" / "fit" / "tile_b" / "00001.log").read_text()
    assert log.count("fit tile_b chunk 1: done") == 1 and "SIGUSR1" in log
    assert_collates_as_reference(run_dir, local_reference[0])


@pytest.mark.slow
def test_local_with_retries_off_the_chunk_stays_failed(tmp_path, sim_tiles, default_cube_file):
    tiles = tmp_path / "tiles.txt"
    tiles.write_text(f"{_tile_b(sim_tiles)}\n")                  # one tile: only what is needed
    run_dir, output, code = _run_interrupted(tmp_path, tiles, "--set", "scheduler.retries=0")
    assert code == 1, output
    assert "fit tile_b chunk 1: not run again: automatic retries are off (scheduler.retries: 0)" in output
    assert "running it again" not in output
    status = dre_batch("status", run_dir, "--json")
    assert status.returncode == 1
    chunk = json.loads(status.stdout)["tiles"][0]["chunks"][1]
    assert (chunk["state"], chunk["retryable"], chunk["attempt"]) == ("failed", True, 1)
    assert chunk["retry"] == "automatic retries are off (scheduler.retries: 0)"
    table = dre_batch("status", run_dir).stdout
    assert "fit tile_b chunk 1 [failed]: " in table and "(automatic retries are off" in table


@pytest.mark.slow
def test_local_python_error_is_not_retried(tmp_path, default_cube_file):
    """A tile whose image is garbage: its prep raises (retryable false) and runs once."""
    run_dir, result = run_with_broken_tile(tmp_path)
    assert "again" not in result.stdout and "retry" not in result.stdout
    assert [r["stage"] for r in records_of(run_dir)] == ["prep"]
    prep = json.loads(dre_batch("status", run_dir, "--json").stdout)["tiles"][0]["prep"]
    assert (prep["state"], prep["retryable"], prep["retry"]) == ("failed", False, None)


def records_of(run_dir) -> list:
    return [json.loads(p.read_text()) for p in sorted(Path(run_dir, "jobs").glob("*.json"))]
