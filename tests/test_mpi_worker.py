"""The fit worker under real Open MPI (Debian's mpirun, mpi4py): ranks, shared cube, checkpoints.

One tiny simulated tile (14 objects after cuts), prepared once with the real SExtractor and PSFEx;
one chunk holding the whole tile, ``fit.batch_size=2`` so it has 7 fitting units to share out
and to checkpoint one by one. Every test works on a fresh copy of the prepared run. Faults are
injected by tests/worker_harness.py, which wraps the real worker (a slower unit, a rank that
raises); the MPI launcher, the signals and SIGKILL are real.
"""

from __future__ import annotations

import hashlib
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
from astropy.io import fits
from batch_helpers import make_run

from dre_hpc.batch.rundir import RunDir
from dre_hpc.batch.worker import run_stage
from scratch import scratch_dir

HARNESS = str(Path(__file__).with_name("worker_harness.py"))
MPIRUN = shutil.which("mpirun")
N_OBJECTS, N_UNITS = 14, 7
OMPI_ENV = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
            "OMPI_MCA_rmaps_base_oversubscribe": "1"}

pytestmark = [pytest.mark.mpi,
              pytest.mark.skipif(MPIRUN is None, reason="Open MPI not installed (bin/install-system-packages)"),
              pytest.mark.skipif(shutil.which("psfex") is None, reason="PSFEx not installed")]


@pytest.fixture(scope="module")
def prepared(request, tmp_path_factory, default_cube_file):
    """A run over one tiny tile, its prep done: the template every test copies."""
    from dre_hpc.sim.tile import TileSpec, simulate_tile
    root = scratch_dir(request, tmp_path_factory, "mpi_worker")
    image = simulate_tile(TileSpec(size=512, n_galaxies=15, n_stars=30, seed=3),
                          root / "Tiles" / "tiny.fits", root / "truth.fits")[0]
    run = make_run(root, [image], ["prep.margin=40", "fit.batch_size=2", "chunking.chunks_per_tile=1"])
    assert run_stage("prep", run.root, tile=0) == 0
    assert run.read_marker("prep", "tiny")[1]["n_objects"] == N_OBJECTS
    return run


@pytest.fixture(scope="module")
def reference(request, prepared, tmp_path_factory):
    """The chunk fitted by one process without MPI: ``{kind: sha256}`` of its outputs."""
    run = _copy(prepared, scratch_dir(request, tmp_path_factory, "reference"))
    assert _worker(run).returncode == 0
    return _hashes(run)


def _copy(run: RunDir, where: Path, **fit) -> RunDir:
    target = RunDir(shutil.copytree(run.root, where / "run"))
    if fit:
        text = target.config.read_text()
        for key, value in fit.items():
            assert f"  {key}: " in text, key
            text = "\n".join(f"  {key}: {value}" if line.startswith(f"  {key}: ") else line
                             for line in text.splitlines()) + "\n"
        target.config.write_text(text)
    return target


@pytest.fixture
def run(prepared, tmp_path):
    return _copy(prepared, tmp_path)


def _command(run, ranks=None, harness=()):
    base = [sys.executable, HARNESS, *harness, "--"] if harness else [sys.executable, "-m", "dre_hpc.batch.worker"]
    args = base + ["fit", str(run.root), "--tile", "0", "--chunk", "0"]
    if ranks is None:
        return args
    return [MPIRUN, "-n", str(ranks), *args, "--ranks", str(ranks)]


def _worker(run, ranks=None, harness=(), timeout=120):
    return subprocess.run(_command(run, ranks, harness), env={**os.environ, **OMPI_ENV}, text=True,
                          capture_output=True, timeout=timeout)


def _start(run, ranks=None, harness=()):
    return subprocess.Popen(_command(run, ranks, harness), env={**os.environ, **OMPI_ENV}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


def _hashes(run) -> dict:
    """The chunk's chi-square file (SHA-256 from the done marker) and the bytes of its table's
    data (its header holds the config hash, which differs where a test changed the config)."""
    kind, done = run.read_marker("fit", "tiny", 0)
    assert kind == "done", done
    with fits.open(run.chunk_outputs("tiny", 0)["dre"]) as hdus:
        table = hashlib.sha256(hdus[1].data.tobytes()).hexdigest()
    return {"chi": done["outputs"]["chi"]["sha256"], "table": table}


def _parts(run) -> list:
    return sorted(run.checkpoint_dir("tiny", 0).glob("part-*.npz"))


def _checkpointed_objects(run) -> int:
    total = 0
    for path in _parts(run):
        with np.load(path) as part:
            total += sum(len(part[f"u{uid}.FLAGS"]) for uid in part["units"])
    return total


def _kill_session(sid: int) -> None:
    """SIGKILL every process of session `sid` (mpirun and its ranks, which Open MPI puts in
    process groups of their own), as a scheduler kills a job's whole cgroup."""
    for _ in range(50):
        rows = subprocess.run(["ps", "-s", str(sid), "-o", "pid=,stat="], text=True,
                              capture_output=True).stdout.splitlines()
        pids = [int(row.split()[0]) for row in rows if not row.split()[1].startswith("Z")]
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)
    raise AssertionError(f"processes of session {sid} survive SIGKILL")


def _wait_for(condition, process, timeout=60.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return
        assert process.poll() is None, f"the worker ended early: {process.communicate()[0][-2000:]}"
        time.sleep(0.02)
    raise AssertionError("timed out waiting for the worker")


def test_one_and_two_ranks_give_identical_outputs(run, reference):
    for ranks, schedule in ((1, "dynamic"), (2, "dynamic"), (2, "static")):
        shutil.rmtree(run.chunk_dir("tiny"), ignore_errors=True)
        text = run.config.read_text().replace("schedule: dynamic", f"schedule: {schedule}")
        run.config.write_text(text.replace("schedule: static", f"schedule: {schedule}"))
        result = _worker(run, ranks)
        assert result.returncode == 0, result.stderr[-2000:]
        assert _hashes(run) == reference, (ranks, schedule)
        done = run.read_marker("fit", "tiny", 0)[1]
        assert done["ranks"] == ranks and done["schedule"] == schedule
        assert sum(r["units"] for r in done["per_rank"]) == N_UNITS
        assert done["fitted_objects"] == N_OBJECTS and done["resumed_objects"] == 0
        if schedule == "static":         # unit i on rank i mod 2
            assert sorted(r["units"] for r in done["per_rank"]) == [3, 4]
    assert not run.checkpoint_dir("tiny", 0).exists()        # removed once the outputs exist


def test_shared_cube_is_once_per_node(prepared, tmp_path):
    """Private memory of rank 1 drops by the convolved models (the matrix, its squares and the
    model-major copy, 150 MB each for the default cube) when they are in node-shared memory. The
    tile's model cache is removed, so that the job convolves (with it, every rank maps the
    cached files and shares the page cache instead)."""
    private = {}
    for shared in ("true", "false"):
        run = _copy(prepared, tmp_path / shared, shared_models=shared)
        shutil.rmtree(run.model_cache("tiny"))
        result = _worker(run, 2)
        assert result.returncode == 0, result.stderr[-2000:]
        per_rank = {r["rank"]: r for r in run.read_marker("fit", "tiny", 0)[1]["per_rank"]}
        assert all(r["convolutions"] == 1 for r in per_rank.values())        # it convolved
        private[shared] = per_rank[1]["private_mb"]
    assert private["false"] - private["true"] > 200, private


def test_sigkill_after_a_checkpoint_resumes_without_refitting(prepared, tmp_path, reference):
    run = _copy(prepared, tmp_path, checkpoint_objects=1)
    process = _start(run, 2, ["--slow", "0.3"])
    try:
        _wait_for(lambda: len(_parts(run)) >= 1, process)
    finally:
        _kill_session(process.pid)
        process.communicate(timeout=30)
    assert run.read_marker("fit", "tiny", 0)[0] == "started"
    assert not any(p.exists() for p in run.chunk_outputs("tiny", 0).values())
    saved = _checkpointed_objects(run)
    assert 0 < saved < N_OBJECTS

    result = _worker(run, 2)
    assert result.returncode == 0, result.stderr[-2000:]
    assert _hashes(run) == reference
    done = run.read_marker("fit", "tiny", 0)[1]
    assert done["resumed_objects"] == saved
    assert done["fitted_objects"] == N_OBJECTS - saved           # nothing fitted twice
    assert done["attempt"] == 2


@pytest.mark.parametrize("ranks, sig", [(None, signal.SIGTERM), (2, signal.SIGUSR1)],
                         ids=["one-process-SIGTERM", "mpirun-2-SIGUSR1"])
def test_signal_checkpoints_and_exits_retryable(prepared, tmp_path, reference, ranks, sig):
    """Only the signal writes the checkpoint here (checkpoint_seconds 0). mpirun gets SIGUSR1, the
    signal a job script forwards: Open MPI's mpirun passes it to the ranks and waits for them."""
    run = _copy(prepared, tmp_path, checkpoint_seconds=0)
    log = tmp_path / "units.log"
    process = _start(run, ranks, ["--slow", "0.3", "--unit-log", str(log)])
    _wait_for(lambda: log.is_file() and log.read_text().count("\n") >= 2, process)
    os.kill(process.pid, sig)
    output = process.communicate(timeout=60)[0]
    assert process.returncode == 75, output[-2000:]
    kind, failed = run.read_marker("fit", "tiny", 0)
    assert kind == "failed" and failed["retryable"] is True and failed["exit_code"] == 75
    assert signal.Signals(sig).name in failed["reason"]
    saved = _checkpointed_objects(run)
    assert saved >= 2 and f"holds {saved} of {N_OBJECTS} objects" in failed["reason"]

    result = _worker(run, ranks)
    assert result.returncode == 0, result.stderr[-2000:]
    assert _hashes(run) == reference
    done = run.read_marker("fit", "tiny", 0)[1]
    assert (done["resumed_objects"], done["fitted_objects"]) == (saved, N_OBJECTS - saved)


def test_a_raising_rank_ends_the_job_within_seconds(run):
    begin = time.monotonic()
    result = _worker(run, 2, ["--raise-on-rank", "1"], timeout=120)
    elapsed = time.monotonic() - begin
    assert result.returncode != 0
    assert elapsed < 30, f"the job took {elapsed:.0f} s to end after a rank failed"
    kind, failed = run.read_marker("fit", "tiny", 0)
    assert kind == "failed" and failed["retryable"] is False
    assert "MPI rank 1 of 2" in failed["reason"] and "injected fault in rank 1" in failed["reason"]
    assert "Traceback" in failed["traceback"] and "worker_harness.py" in failed["traceback"]
    assert not any(p.exists() for p in run.chunk_outputs("tiny", 0).values())


def test_world_size_mismatch_fails_loudly(run):
    """A job that asked for 2 ranks but runs as a lone process (what a container/host MPI
    mismatch looks like from inside: every rank is rank 0 of 1)."""
    result = subprocess.run(_command(run) + ["--ranks", "2"], text=True, capture_output=True, timeout=120)
    assert result.returncode == 1
    assert "asked for 2 MPI ranks" in result.stderr and "world of 1" in result.stderr
    kind, failed = run.read_marker("fit", "tiny", 0)
    assert kind == "failed" and "container/host MPI mismatch" in failed["reason"]
    assert not run.chunk_dir("tiny").exists() or not any(run.chunk_dir("tiny").iterdir())


def test_done_marker_reports_memory_per_rank(run):
    result = _worker(run, 2)
    assert result.returncode == 0, result.stderr[-2000:]
    per_rank = run.read_marker("fit", "tiny", 0)[1]["per_rank"]
    assert [r["rank"] for r in per_rank] == [0, 1]
    for stats in per_rank:
        assert stats["max_rss_mb"] > 50 and 0 < stats["pss_mb"] <= stats["rss_mb"]
    json.dumps(per_rank)
