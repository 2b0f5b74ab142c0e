"""Automatic retries of interrupted job items (``scheduler.retries``).

A failed item is *retryable* when its failed marker says ``"retryable": true``: the worker exited
75 after SIGTERM or SIGUSR1 (checkpoint written, a rerun resumes from it), or the job script's
finish step recorded a payload killed by a signal. A Python error (``retryable: false``) is never
retried, nor is a payload that exited with an ordinary error code.

**Attempts.** The first run of an item is attempt 1. The attempt of a failed run is the larger of
its failed marker's ``attempt`` (missing: 1) and the ``attempt`` of the submission record that
started it (an automatic retry records the attempt it starts). A retryable item is resubmitted
while that attempt is at most ``scheduler.retries``: with the default 2 an item runs at most 3
times, then stays failed (``dre-batch run --failed-only`` reruns it by hand).

**Who resubmits.**

- SLURM and PBS: the interrupted job itself, in its finish step (`resubmit`, called by
  ``worker finish`` after it has recorded the outcome). It takes the run lock, waiting at most
  `LOCK_WAIT` seconds (a ``dre-batch run`` holding the lock never waits for a job, so this cannot
  deadlock), checks that the job is not being cancelled by a user (``scancel`` also sends
  SIGTERM first: `Scheduler.being_cancelled`, SLURM only; a PBS ``qdel`` cannot be told from the
  walltime, so there a deleted job resubmits itself while retries are left), checks that the latest submission of the item is still its own job (otherwise, e.g.
  after ``run --failed-only``, the item was resubmitted already), and submits the item through
  `submit.submit_array`, recording ``attempt`` and ``retry_of``, so `status` follows the new job. A prep
  is submitted again with its tile's unfinished fits, afterok on the new prep element, as
  ``run --failed-only`` does (with ``objects_per_chunk`` the new prep submits them itself).
- local: the follow callback of `local_run` runs the task again under the same rule (`decide`)
  and records it as a new submission.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .config import load_config
from .rundir import RunDir
from .schedulers import get_scheduler
from .submit import fit_env, job_name, run_lock, submit_array

RETRY_SCHEDULERS = ("slurm", "pbs")       # the local runner retries in local_run instead
LOCK_WAIT = 120.0                         # seconds a job waits for the run lock before giving up
_JOB = re.compile(r"^\d+(?:\[\d*\]|_\d+)?")


def attempt_of(content) -> int:
    """The ``attempt`` of a marker or record (at least 1; missing or not a number: 1)."""
    try:
        return max(1, int((content or {}).get("attempt") or 1))
    except (TypeError, ValueError):
        return 1


def _core(job_id: str) -> str:
    match = _JOB.match(job_id)
    if match and job_id[match.end():match.end() + 1] in ("", "."):
        return match.group(0)
    return job_id


def same_job(a, b) -> bool:
    """Whether job ids `a` and `b` name the same job or array element: equal, or equal up to the
    server suffix of a PBS id (``123[4].pbs01`` and ``123[4].pbs01.example.org``)."""
    return a is not None and b is not None and _core(str(a)) == _core(str(b))


@dataclass(frozen=True)
class Decision:
    """Whether a failed item is retried: `attempt` (the run that failed) against `retries`."""

    retryable: bool
    attempt: int
    retries: int

    @property
    def allowed(self) -> bool:
        return self.retryable and self.attempt <= self.retries

    @property
    def next_attempt(self) -> int:
        return self.attempt + 1

    def describe(self) -> str:
        """``retry 1 of 2 (attempt 2 of 3)`` for the retry that `allowed` starts."""
        return f"retry {self.attempt} of {self.retries} (attempt {self.next_attempt} of {self.retries + 1})"

    def why_not(self) -> str:
        """Why no retry is made (only meaningful when not `allowed`)."""
        if not self.retryable:
            return "not retryable"
        if self.retries == 0:
            return "automatic retries are off (scheduler.retries: 0)"
        return f"no retry left (attempt {self.attempt} of {self.retries + 1}, scheduler.retries: {self.retries})"


def decide(content, retries, record_attempt=None) -> Decision:
    """The `Decision` for a failed marker's `content` (its ``retryable`` and ``attempt``), the
    ``attempt`` of the submission that ran it, and ``scheduler.retries``."""
    attempt = max(attempt_of(content), attempt_of({"attempt": record_attempt}))
    return Decision(bool((content or {}).get("retryable")), attempt, int(retries))


def item_label(stage: str, tile: str, k=None) -> str:
    """``prep TILE`` or ``fit TILE chunk K``: how messages name an item."""
    return f"{stage} {tile}" + ("" if stage == "prep" or k is None else f" chunk {k}")


def latest_record(rundir: RunDir, stage: str, tile, k=None) -> tuple:
    """``(record, array index)`` of the latest submission covering the prep of `tile` (a `Tile`)
    or its fit chunk `k`, or ``(None, None)``. The array index is the item's index minus the
    record's offset (what `Scheduler.dependency_id` takes)."""
    index = tile.index if stage == "prep" else int(k)
    found = (None, None)
    for record in rundir.submissions():
        if record.get("stage") != stage or (stage == "fit" and record.get("tile") != tile.name):
            continue
        indices = [int(i) for i in record.get("indices") or []]
        if index in indices:
            found = (record, index - int(record.get("offset", min(indices))))
    return found


def own_record_attempt(rundir: RunDir, stage: str, tile, k, own_job):
    """The ``attempt`` recorded for the submission of this job (`own_job`), or None: what the
    finish step uses when the payload died before writing a started marker that would say."""
    record, index = latest_record(rundir, stage, tile, k)
    if record is None or "attempt" not in record or own_job is None:
        return None
    scheduler = get_scheduler(load_config(rundir.config), rundir, record.get("scheduler"))
    if not same_job(scheduler.dependency_id(str(record["job_id"]), index), own_job):
        return None
    return attempt_of(record)


def resubmit(rundir: RunDir, stage: str, tile, k, content: dict, own_job, out=print):
    """After the finish step of job `own_job` recorded a failed item (`content`: its failed
    marker), submit the item again when `decide` allows it; SLURM and PBS only. Prints one line
    either way (when the item was retryable) and returns the new job id, or None."""
    config = load_config(rundir.config)
    if config.scheduler["name"] not in RETRY_SCHEDULERS or not (content or {}).get("retryable"):
        return None
    what = item_label(stage, tile.name, k)
    if own_job is None:
        out(f"{what}: not resubmitted: not inside a {config.scheduler['name']} job (no job id)")
        return None
    scheduler = get_scheduler(config, rundir)
    if scheduler.being_cancelled(own_job):
        out(f"{what}: not resubmitted: job {own_job} is being cancelled (scancel); "
            f"`dre-batch run --failed-only` reruns it")
        return None
    with run_lock(rundir, wait=LOCK_WAIT):
        record, index = latest_record(rundir, stage, tile, k)
        if record is not None:
            element = scheduler.dependency_id(str(record["job_id"]), index)
            if not same_job(element, own_job):
                out(f"{what}: not resubmitted: job {element} was submitted for it after this one")
                return None
        decision = decide(content, config.scheduler["retries"], (record or {}).get("attempt"))
        if not decision.allowed:
            out(f"{what}: not resubmitted: {decision.why_not()}")
            return None
        extra = {"attempt": decision.next_attempt, "retry_of": own_job}
        submit = _resubmit_prep if stage == "prep" else _resubmit_fit
        job_id = submit(rundir, config, scheduler, tile, k, extra)
    out(f"{what}: interrupted ({content.get('reason')}); resubmitted as job {job_id}, {decision.describe()}")
    return job_id


def _quiet(text) -> None:
    """`submit_array` prints each command; the finish step prints one line instead."""


def _resubmit_fit(rundir, config, scheduler, tile, k, extra) -> str:
    """Chunk `k` alone (its prep is done: the fit had started)."""
    blocks = submit_array(rundir, scheduler, "fit", tile.name, [k], job_name(config, "fit", tile.name),
                          fit_env(tile), None, False, _quiet, extra)
    return blocks[0][k][0]


def _resubmit_prep(rundir, config, scheduler, tile, k, extra) -> str:
    """The prep of `tile`, then its fit chunks without a done marker, afterok on the new prep
    element (their earlier submission depended on the interrupted prep: SLURM cancels such jobs
    or leaves them pending forever). Chunk count unknown (objects_per_chunk): the prep submits."""
    blocks = submit_array(rundir, scheduler, "prep", None, [tile.index], job_name(config, "prep"), {}, None,
                          False, _quiet, extra)
    job_id, offset = blocks[0][tile.index]
    if tile.n_chunks:
        chunks = [c for c in range(tile.n_chunks) if not rundir.marker("fit", tile.name, c, "done").exists()]
        if chunks:
            submit_array(rundir, scheduler, "fit", tile.name, chunks, job_name(config, "fit", tile.name),
                         fit_env(tile), [scheduler.dependency_id(job_id, tile.index - offset)], False, _quiet)
    return job_id
