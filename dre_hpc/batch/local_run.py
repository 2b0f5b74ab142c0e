"""``dre-batch run`` on the local scheduler: the same job scripts, run here as subprocesses.

Prep tasks start first; the fits of a tile start as soon as its prep succeeded (a failed prep
leaves them blocked, with the prep's reason in its marker). At most ``scheduler.max_parallel`` run
at once. The submissions are recorded like a cluster's (job id ``local-<pid>``), so `status` can
tell a chunk that is still running from one whose process died. A task whose failure is retryable
(interrupted by a signal) runs again at once while ``scheduler.retries`` allows (`retry.decide`),
recorded as a new submission with its ``attempt``.
"""

from __future__ import annotations

import dataclasses

from .retry import decide, item_label
from .rundir import RunDir
from .schedulers.local import LocalTask
from .submit import fit_env, record_submission, submit_array


def run_local(rundir: RunDir, config, scheduler, plan, dry_run, out) -> int:
    """Run the plan's prep and fit scripts; 0 when every task succeeded, 1 otherwise."""
    tiles = {t.name: t for t in rundir.tiles()}
    if dry_run:
        if plan.prep:
            submit_array(rundir, scheduler, "prep", None, [t.index for t in plan.prep], "prep", {}, None, True,
                         out)
        for name, chunks in plan.fits.items():
            if chunks is None:
                out(f"# fits of tile {name}: run when its prep has counted the objects")
                continue
            submit_array(rundir, scheduler, "fit", name, chunks, "fit", fit_env(tiles[name]), None, True, out)
        return 0
    prep_names = {t.name for t in plan.prep}
    tasks = [_prep_task(rundir, t) for t in plan.prep]
    if plan.prep:
        _record(rundir, scheduler, "prep", None, [t.index for t in plan.prep])
    for name, chunks in plan.fits.items():
        if name not in prep_names and chunks is not None:
            tasks += _fit_tasks(rundir, scheduler, tiles[name], chunks)

    retries = config.scheduler["retries"]

    def follow(task, returncode):
        _report(rundir, task, returncode, out)
        again = _retry(rundir, scheduler, task, returncode, retries, out)
        if again is not None:
            return [again]
        if task.stage != "prep":
            return []
        tile = rundir.tile(task.tile_index)
        if returncode != 0 or tile.name not in plan.fits:
            return []
        chunks = plan.fits[tile.name]
        return _fit_tasks(rundir, scheduler, tile, range(tile.n_chunks) if chunks is None else chunks)

    codes = scheduler.run(tasks, follow=follow)
    failed = sum(1 for code in codes.values() if code != 0)
    out(f"{len(codes)} jobs run, {failed} failed" + (" (see `dre-batch status`)" if failed else ""))
    return 1 if failed else 0


def _prep_task(rundir, tile) -> LocalTask:
    return LocalTask(key=("prep", tile.index, None), stage="prep", tile_index=tile.index,
                     env={"DRE_ARRAY_INDEX": str(tile.index)}, log=rundir.log("prep", tile.name))


def _fit_tasks(rundir, scheduler, tile, chunks) -> list:
    """The tasks of `chunks` of `tile` (the scheduler adds DRE_JOB_ID), recorded as submitted."""
    chunks = list(chunks)
    if chunks:
        _record(rundir, scheduler, "fit", tile.name, chunks)
    return [LocalTask(key=("fit", tile.index, k), stage="fit", tile_index=tile.index,
                      env={"DRE_ARRAY_INDEX": str(k), **fit_env(tile)},
                      log=rundir.log("fit", tile.name, k)) for k in chunks]


def _record(rundir, scheduler, stage, tile, indices, extra=None) -> None:
    record_submission(rundir, scheduler, stage, tile, indices, 0, scheduler.job_id,
                      ["bash", scheduler.script(stage)], extra)


def _retry(rundir, scheduler, task, returncode, retries, out):
    """The task again (its next attempt, recorded as a submission) when it failed retryably and
    `retries` allows; else None. Prints one line for a retryable failure either way."""
    if returncode == 0:
        return None
    tile = rundir.tile(task.tile_index)
    k = task.key[2]
    kind, content = rundir.read_marker(task.stage, tile.name, k)
    if kind != "failed" or not (content or {}).get("retryable"):
        return None
    decision = decide(content, retries, task.attempt)
    what = item_label(task.stage, tile.name, k)
    if not decision.allowed:
        out(f"{what}: not run again: {decision.why_not()}")
        return None
    index = tile.index if task.stage == "prep" else k
    _record(rundir, scheduler, task.stage, None if task.stage == "prep" else tile.name, [index],
            {"attempt": decision.next_attempt, "retry_of": scheduler.job_id})
    out(f"{what}: running it again, {decision.describe()}")
    return dataclasses.replace(task, attempt=decision.next_attempt, started=None)


def _report(rundir, task, returncode, out) -> None:
    """One line per finished task: what ran and its outcome (the reason when it failed)."""
    tile = rundir.tile(task.tile_index)
    what = f"{task.stage} {tile.name}" + (f" chunk {task.key[2]}" if task.stage == "fit" else "")
    outcome, content = rundir.read_marker(task.stage, tile.name, task.key[2])
    if returncode == 0 and outcome == "done":
        extra = f" ({content.get('n_objects')} objects, {content.get('n_chunks')} chunks)" \
            if task.stage == "prep" else f" ({content.get('rows')} rows)"
        out(f"{what}: done{extra}")
    else:
        reason = (content or {}).get("reason") or f"exit code {returncode}"
        out(f"{what}: failed: {reason}")
