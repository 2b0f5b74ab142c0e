"""Submission: the run lock, submitting job arrays and recording each submission.

Every path that submits goes through here: ``dre-batch run`` (`run`), the local runner
(`local_run`, which records its subprocesses as submissions), a job's automatic retry (`retry`)
and a prep job that submits its tile's fits once it has counted the objects (`worker`). The flow
is one-way: this module imports neither of them, nor `status`.

- `run_lock`: ``DIR/.run.lock`` (flock), held by ``run`` (never waiting) and by a retrying job
  (waiting a bounded time), so two submitters never plan from the same markers at once.
- `submit_array`: one array job per block of indices (`Scheduler.submit_commands` splits them at
  ``scheduler.max_array_size``), each recorded by `record_submission` in ``DIR/jobs/``, which is
  what `status` follows.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shlex
import time

from dre_hpc.errors import DreError

from .config import load_config
from .environment import TILE_VAR
from .rundir import RunDir, utc_now
from .schedulers import get_scheduler

DRY_RUN_JOB_ID = "{stage}_JOB_ID"    # --dry-run: stands for the id the submission would print
LOCK_POLL = 0.2                      # seconds between tries of a waiting run_lock


class RunLockedError(DreError):
    """Another ``dre-batch run`` is working on the same run directory."""


@contextlib.contextmanager
def run_lock(rundir: RunDir, wait: float = 0.0):
    """Hold ``DIR/.run.lock`` exclusively for the body, or raise RunLockedError: at once
    (`wait` 0, what ``dre-batch run`` does), else after trying for `wait` seconds (a job's
    automatic retry: a ``run`` holding the lock never waits for a job, so this cannot deadlock)."""
    handle = open(rundir.lock, "a+", encoding="utf-8")
    deadline = time.monotonic() + wait
    try:
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() < deadline:
                    time.sleep(LOCK_POLL)
                    continue
                handle.seek(0)
                holder = handle.read().strip() or "another process"
                raise RunLockedError(f"{rundir.root}: another dre-batch run is working on this run "
                                     f"directory ({holder}); wait for it or check `dre-batch status`") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} since {utc_now()}\n")
        handle.flush()
        yield
    finally:
        handle.close()


def job_name(config, stage: str, tile: str | None = None) -> str:
    """The scheduler's name of a job: ``<run>-prep`` or ``<run>-fit-<tile>``."""
    return f"{config.run['name']}-{stage}" + (f"-{tile}" if stage == "fit" else "")


def fit_env(tile) -> dict:
    """The environment of a tile's fit jobs (the tile's index; the chunk is the array index)."""
    return {TILE_VAR: str(tile.index)}


def submit_array(rundir: RunDir, scheduler, stage: str, tile, indices, name: str, env: dict,
                 after, dry_run: bool, out, extra: dict | None = None) -> list:
    """Submit one array per block of `indices` (tile indices for ``prep``, chunks of the tile
    named `tile` for ``fit``) as jobs called `name` with the environment `env`, depending
    (afterok) on the job ids in `after`; print each command
    with `out` and record each submission (with the `extra` fields, e.g. the ``attempt`` of an
    automatic retry). With `dry_run` only print, with a stand-in job id. Returns
    ``[{index: (job_id, offset)}]``, one dict per block."""
    results = []
    for argv, block, offset in scheduler.submit_commands(stage, indices, name, env, after):
        out(shlex.join(argv))
        if dry_run:          # a stand-in id, so the dependent commands show their dependency
            results.append({i: (DRY_RUN_JOB_ID.format(stage=stage.upper()), offset) for i in block})
            continue
        job_id = scheduler.submit(argv)
        record_submission(rundir, scheduler, stage, tile, block, offset, job_id, argv, extra)
        results.append({i: (job_id, offset) for i in block})
    return results


def record_submission(rundir: RunDir, scheduler, stage: str, tile, indices, offset: int, job_id: str,
                      argv, extra: dict | None = None) -> None:
    """Save one submission (the ``jobs/<n>.json`` record that `status` reads); an automatic retry
    adds ``attempt`` (the attempt it starts) and ``retry_of`` (the job that was interrupted)."""
    rundir.record_submission({"stage": stage, "tile": tile, "indices": list(indices), "offset": offset,
                              "job_id": job_id, "scheduler": scheduler.name, "command": list(argv),
                              "time": utc_now(), **(extra or {})})


def submit_tile_fits(rundir: RunDir, tile_index: int, n_chunks: int, after=None) -> list:
    """Submit the `n_chunks` fit chunks of one tile, depending (afterok) on the ids in `after`
    (called by its prep job when it has counted the objects)."""
    config = load_config(rundir.config)
    scheduler = get_scheduler(config, rundir)
    tile = rundir.tile(tile_index)
    return submit_array(rundir, scheduler, "fit", tile.name, list(range(n_chunks)),
                        job_name(config, "fit", tile.name), fit_env(tile), after, False, lambda text: None)
