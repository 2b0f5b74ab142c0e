"""``dre-batch run``: submit (or, with the local scheduler, execute) the jobs of a run.

What is submitted follows from the markers (`status.collect`): a plain run submits every item that
was never submitted, ``failed_only`` only the items that failed or vanished; items that are
pending, running or done are never submitted twice, except the fits of a tile whose prep is
submitted again: every one of them (blocked or even done) runs again, since the new prep removes
their outputs and markers (`prep_job.void_fits`). ``failed_only`` also submits again the (done)
prep of a tile whose fit failed because the prep products changed (``redo_prep``: removed by a
scratch purge, say). Prep runs as one array over tiles, each tile's fits as one array over its chunks
depending (afterok) on that tile's prep element. With ``objects_per_chunk`` the number of chunks
is known only after prep: then the prep job submits its tile's fit array itself, afterok on its
own element, before it writes its done marker (`submit.submit_tile_fits`). The run lock
(`submit.run_lock`) keeps two ``run`` commands apart; an interrupted job that resubmits itself
(`retry`) takes it too, waiting a bounded time; every submission goes through `submit`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

from .config import load_config
from .local_run import run_local
from .rundir import RunDir
from .schedulers import get_scheduler
from .status import collect
from .submit import DRY_RUN_JOB_ID, fit_env, job_name, run_lock, submit_array

SUBMITTABLE = {False: ("unsubmitted",), True: ("failed",)}


@dataclass
class Plan:
    """What one ``run`` submits: tiles whose prep runs, chunks whose fit runs (per tile name;
    None: all chunks, known after prep), and notes for the user."""

    prep: list = field(default_factory=list)
    fits: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)

    def empty(self) -> bool:
        return not self.prep and not self.fits


def plan_run(rundir: RunDir, status, failed_only=False, stage=None) -> Plan:
    """The items to submit, from the current status (see the module docstring)."""
    wanted = SUBMITTABLE[bool(failed_only)]
    plan = Plan()
    tiles = {t.name: t for t in rundir.tiles()}
    redo = {item.tile for item in status.items if failed_only and item.stage == "fit"
            and item.state == "failed" and item.redo_prep}       # their prep products changed
    prep_state = {}
    for item in status.items:
        if item.stage == "prep":
            prep_state[item.tile] = item.state
            again = item.tile in redo and item.state == "done"
            if stage in (None, "prep") and (item.state in wanted or again):
                plan.prep.append(tiles[item.tile])
    rerun = {t.name for t in plan.prep}
    for item in status.items:
        if item.stage != "fit" or stage not in (None, "fit"):
            continue
        prep_ok = prep_state[item.tile] in ("done", "pending", "running") or item.tile in rerun
        if item.chunk is None:                 # chunk count known after prep
            if item.tile in rerun or (prep_state[item.tile] == "done" and item.state in wanted):
                plan.fits.setdefault(item.tile, None)
            continue
        if item.state in wanted or item.tile in rerun:      # a new prep voids every fit of its tile
            if prep_ok:
                chunks = plan.fits.setdefault(item.tile, [])
                if chunks is not None:
                    chunks.append(item.chunk)
            else:
                plan.notes.append(f"fits of tile {item.tile} wait for its prep ({prep_state[item.tile]})")
    plan.notes = sorted(set(plan.notes))
    return plan


def run(run_dir, dry_run=False, failed_only=False, stage=None, out=print) -> int:
    """Submit (or run locally) what `plan_run` selects; print the submit commands. Exit code 0 when
    everything was submitted (local: when every job succeeded), 1 otherwise."""
    rundir = RunDir(run_dir).require()
    config = load_config(rundir.config)
    scheduler = get_scheduler(config, rundir)
    with contextlib.nullcontext() if dry_run else run_lock(rundir):
        status = collect(rundir, scheduler)
        plan = plan_run(rundir, status, failed_only, stage)
        for note in plan.notes:
            out(f"note: {note}")
        if plan.empty():
            hint = " (some items failed: use --failed-only)" if status.counts.get("failed") else ""
            out(f"nothing to submit{hint}")
            return 0
        if scheduler.name == "local":
            return run_local(rundir, config, scheduler, plan, dry_run, out)
        return submit_plan(rundir, config, scheduler, plan, dry_run, out)


def submit_plan(rundir, config, scheduler, plan: Plan, dry_run, out) -> int:
    """Submit the prep array, then each tile's fit array with afterok on its prep element."""
    prep_jobs = {}
    if plan.prep:
        indices = [t.index for t in plan.prep]
        for block_jobs in submit_array(rundir, scheduler, "prep", None, indices, job_name(config, "prep"),
                                       {}, None, dry_run, out):
            prep_jobs.update(block_jobs)
        if dry_run:
            out(f"# {DRY_RUN_JOB_ID.format(stage='PREP')} below: the job id the prep submission prints")
    tiles = {t.name: t for t in rundir.tiles()}
    earlier = _pending_prep_jobs(rundir)
    for tile_name, chunks in plan.fits.items():
        tile = tiles[tile_name]
        if chunks is None:
            out(f"# fits of tile {tile_name}: submitted by its prep job once it has counted the "
                f"objects (chunking.objects_per_chunk)")
            continue
        after = None
        if tile.index in prep_jobs or tile.index in earlier:
            job_id, offset = prep_jobs.get(tile.index) or earlier[tile.index]
            after = [scheduler.dependency_id(job_id, tile.index - offset)]
        submit_array(rundir, scheduler, "fit", tile_name, sorted(chunks), job_name(config, "fit", tile_name),
                     fit_env(tile), after, dry_run, out)
    return 0


def _pending_prep_jobs(rundir) -> dict:
    """Tile index -> (job id, offset) of the latest prep submission of each tile."""
    jobs = {}
    for record in rundir.submissions():
        if record.get("stage") == "prep":
            for index in record["indices"]:
                jobs[index] = (record["job_id"], record.get("offset", 0))
    return jobs
