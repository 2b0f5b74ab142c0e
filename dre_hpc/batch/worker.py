"""The in-job entry point of dre-batch: what the job scripts run, and the markers they leave.

::

    python -m dre_hpc.batch.worker prep RUN_DIR [--tile I]
    python -m dre_hpc.batch.worker fit RUN_DIR [--tile I] [--chunk K]
    python -m dre_hpc.batch.worker finish {prep,fit} RUN_DIR --exit-code N [--tile I] [--chunk K]

Without ``--tile``/``--chunk`` the indices come from the scheduler through
`dre_hpc.batch.environment`: for prep the array index is the tile index; for fit the tile is
``DRE_TILE`` and the array index is the chunk. The work itself is in `prep_job` and `fit_job`;
this module is the shell around it: ``started`` marker, then ``done`` (exit 0) or ``failed`` with
the reason and traceback (exit 1). ``finish`` runs after the payload and records a failure the
payload could not record itself (killed by a signal, crashed before writing a marker); it always
exits 0. A problem that leaves no tile to mark (no run directory, a tile index outside the
manifest) is a one-line error with exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import traceback
import warnings
from pathlib import Path

from ..cli.common import run_main
from ..errors import DreError
from ..fit.compiled import cache_in
from . import environment, retry
from .config import load_config
from .chunk_fit import RETRYABLE_EXIT, ChunkInterrupted, StopSignals
from .comm import SerialComm, open_comm
from .fit_job import convolve_for_fits, remove_chunk_outputs, run_fit
from .prep_job import run_prep
from .prep_neighbours import second_pass
from .rundir import NUMBA_CACHE, RunDir, Tile, mask_world_writable, utc_now
from .submit import submit_tile_fits

FAILED_EXIT = 1


class WorkerError(DreError):
    """The worker cannot tell which item to run (no array index, no tile)."""


def job_fields() -> dict:
    """``{"job_id", "host", "time"}``: who wrote a marker, and when."""
    return {"job_id": environment.job_id(), "host": environment.hostname(), "time": utc_now()}


def one_line(exc: BaseException) -> str:
    """An exception as one line: a DreError's message, else ``Type: message``."""
    text = str(exc) if isinstance(exc, DreError) else f"{type(exc).__name__}: {exc}".rstrip(": ")
    return " | ".join(line.strip() for line in text.splitlines() if line.strip()) or type(exc).__name__


def failed_content(reason: str, tb: str | None = None, exit_code: int | None = FAILED_EXIT,
                   retryable: bool = False) -> dict:
    """The content of a failed marker."""
    return {"reason": reason, "traceback": tb, "exit_code": exit_code, "retryable": retryable,
            **job_fields()}


# -- which item --------------------------------------------------------------------------------
def _index(given, read, what):
    """`given`, else the value the scheduler environment gives (`read()`), else a WorkerError."""
    if given is not None:
        return given
    value = read()
    if value is None:
        raise WorkerError(f"no {what}: give it on the command line or run inside a dre-batch job")
    return int(value)


def resolve_item(stage: str, rundir: RunDir, tile=None, chunk=None) -> tuple:
    """``(Tile, chunk or None)`` of this job: explicit values first, then the environment."""
    if stage == "prep":
        index = _index(tile, environment.array_index, "tile index (--tile; the array index)")
        return rundir.require().tile(index), None
    index = _index(tile, environment.tile_index, "tile index (--tile; DRE_TILE)")
    k = _index(chunk, environment.array_index, "chunk index (--chunk; the array index)")
    return rundir.require().tile(index), k


# -- the stages ----------------------------------------------------------------------------------
def _manifest_chunks(rundir: RunDir, tile: Tile):
    """The manifest's n_chunks of `tile` (not the one filled in from an earlier prep marker)."""
    return rundir.read_manifest()["tiles"][tile.index]["n_chunks"]


def prep_work(rundir: RunDir, tile: Tile, k, comm, stop) -> dict:
    """The prep of `tile` (done-marker content without the job fields); one process."""
    config = load_config(rundir.config)
    done = run_prep(rundir, config, tile, _manifest_chunks(rundir, tile))
    # the fits' models, convolved once for the tile here rather than by each fit job
    done["models"] = convolve_for_fits(rundir, config, tile) if done["n_objects"] else {"skipped": "no object"}
    if config["prep"]["neighbours"] and done["n_objects"]:
        done["neighbours"] = second_pass(rundir, config, tile, done)
    return done


class PrepNotDone(DreError):
    """A fit job whose tile's prep has no done marker."""

    def __init__(self, tile: str, kind, content):
        reason = {None: "no marker", "started": "it has started and not finished"}.get(
            kind, (content or {}).get("reason") or "no reason recorded")
        super().__init__(f"prep of tile {tile} is not done: {reason}")
        self.retryable = kind != "failed"           # it may still finish; a failed one needs a rerun


def fit_work(rundir: RunDir, tile: Tile, k: int, comm, stop) -> dict | None:
    """Chunk `k` of `tile` with every rank of `comm` (done-marker content without the job
    fields on rank 0, None on the others); PrepNotDone first."""
    kind, prep = rundir.read_marker("prep", tile.name)
    if kind != "done":
        raise PrepNotDone(tile.name, kind, prep)
    config = load_config(rundir.config)
    return run_fit(rundir, config, tile, k, prep, comm, stop)


WORK = {"prep": prep_work, "fit": fit_work}


def next_attempt(rundir: RunDir, stage: str, tile: str, k) -> int:
    """1, or one more than the attempt of an earlier run of the item that did not succeed."""
    kind, content = rundir.read_marker(stage, tile, k)
    return retry.attempt_of(content) + 1 if kind in ("failed", "started") else 1


def run_stage(stage: str, rundir, tile=None, chunk=None, ranks=None) -> int:
    """Run one prep or fit item between its markers: 0 when done, 1 when failed, RETRYABLE_EXIT
    when a signal interrupted a fit after its checkpoint (each recorded in a marker).

    A fit runs on every rank of the job (`ranks`: how many the job script asked for; checked
    against the MPI world). World rank 0 writes the started and done markers; a rank that raises
    writes the failed marker with its traceback and aborts the whole job, so no rank waits for it.
    """
    rundir = RunDir(rundir)
    item, k = resolve_item(stage, rundir, tile, chunk)
    label = f"{stage} {item.name}{'' if k is None else f' chunk {k}'}"
    comm, attempt = SerialComm(), next_attempt(rundir, stage, item.name, k)
    # a fit records SIGTERM/SIGUSR1 from here on (before its started marker), a prep dies of them
    with StopSignals() if stage == "fit" else contextlib.nullcontext() as stop:
        try:
            if stage == "fit":
                comm = open_comm(ranks)
            attempt = comm.bcast(attempt)
            if comm.rank == 0:
                rundir.write_marker(stage, item.name, k, "started", {**job_fields(), "attempt": attempt})
            content = WORK[stage](rundir, item, k, comm, stop)
        except Exception as exc:      # everything is recorded; BaseException is left to `finish`
            return _record_failure(rundir, stage, item, k, label, exc, attempt, comm)
    if comm.rank != 0:
        return 0
    if stage == "prep":         # before `done`: a done prep never shows its fits unsubmitted
        chain_fits(rundir, item, content["n_chunks"])
    rundir.write_marker(stage, item.name, k, "done", {**content, **job_fields(), "attempt": attempt})
    print(f"{label}: done in {content['seconds']:.1f} s", file=sys.stderr)
    return 0


def _record_failure(rundir, stage, item, k, label, exc, attempt, comm) -> int:
    """Write the failed marker of `exc` (an interrupted fit: rank 0 only, retryable, no
    traceback; a fit whose prep products changed: ``redo_prep``); end the job's other ranks after
    a real error. Returns the exit code."""
    if isinstance(exc, ChunkInterrupted):
        if comm.rank == 0:
            rundir.write_marker(stage, item.name, k, "failed", {
                **failed_content(one_line(exc), None, RETRYABLE_EXIT, retryable=True), "attempt": attempt})
            print(f"{label}: {one_line(exc)}", file=sys.stderr)
        return RETRYABLE_EXIT
    where = f" (MPI rank {comm.rank} of {comm.size})" if comm.size > 1 else ""
    redo = {"redo_prep": True} if getattr(exc, "redo_prep", False) else {}   # run --failed-only redoes it
    rundir.write_marker(stage, item.name, k, "failed", {
        **failed_content(one_line(exc) + where, traceback.format_exc(),
                         retryable=getattr(exc, "retryable", False)), "attempt": attempt, **redo})
    print(f"{label}: failed{where}: {one_line(exc)}", file=sys.stderr)
    if comm.size > 1:
        sys.stderr.flush()
        comm.abort(FAILED_EXIT)
    return FAILED_EXIT


def chain_fits(rundir: RunDir, tile: Tile, n_chunks: int) -> None:
    """With ``objects_per_chunk`` on a cluster, submit the tile's `n_chunks` fits now that the
    count is known (`run` could not), afterok on this prep job, so they start only once it has
    written its done marker and ended well. A failed submission is printed; the fits then show as
    unsubmitted and ``dre-batch run`` submits them."""
    if _manifest_chunks(rundir, tile) is not None:
        return
    config = load_config(rundir.config)
    if config.scheduler["name"] == "local":           # the local runner starts the fits itself
        return
    own = environment.job_id()                         # this array element: 123_4, 123[4].server
    try:
        submit_tile_fits(rundir, tile.index, n_chunks, [own] if own else None)
    except DreError as exc:
        print(f"prep {tile.name}: cannot submit its fits: {one_line(exc)}; "
              f"`dre-batch run` will submit them", file=sys.stderr)


# -- after the payload ----------------------------------------------------------------------------
def exit_reason(exit_code: int) -> tuple:
    """``(reason, retryable)`` for a payload that ended with `exit_code` without an outcome."""
    if exit_code > 128:
        try:
            name = signal.Signals(exit_code - 128).name
        except ValueError:
            name = None
        if name:
            return f"killed by signal {exit_code - 128} ({name}; exit code {exit_code})", True
    return f"exited with code {exit_code} without writing an outcome", False


def finish(stage: str, rundir, exit_code: int, tile=None, chunk=None) -> int:
    """Record the failure of a payload that exited non-zero without a done or failed marker of
    this job (a marker of an earlier job of the item does not count), then, on SLURM and PBS,
    resubmit the item when its failure is retryable and ``scheduler.retries`` allows
    (`retry.resubmit`). Never fails itself: returns 0 (problems are printed)."""
    try:
        rundir = RunDir(rundir)
        item, k = resolve_item(stage, rundir, tile, chunk)
        kind, content = rundir.read_marker(stage, item.name, k)
        own = environment.job_id()
        mine = own is None or retry.same_job((content or {}).get("job_id"), own)
        if exit_code == 0 or kind == "done":
            return 0
        if kind != "failed" or not mine:
            if stage == "fit":
                remove_chunk_outputs(rundir, item.name, k)
            attempt = (content or {}).get("attempt") if kind == "started" else \
                retry.attempt_of(content) + 1 if kind == "failed" else None
            attempt = attempt or retry.own_record_attempt(rundir, stage, item, k, own)
            reason, retryable = exit_reason(exit_code)
            content = {**failed_content(reason, None, exit_code, retryable), "attempt": attempt or 1}
            rundir.write_marker(stage, item.name, k, "failed", content)
        retry.resubmit(rundir, stage, item, k, content, own, out=lambda text: print(text, flush=True))
    except Exception as exc:
        print(f"worker finish: cannot record the outcome or resubmit: {one_line(exc)}", file=sys.stderr)
    return 0


# -- command line ---------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dre_hpc.batch.worker",
                                description="Run one dre-batch job item (what the job scripts call).")
    sub = p.add_subparsers(dest="command", required=True)
    for name, text in (("prep", "SExtractor, PSFEx and cuts of one tile"), ("fit", "fit one chunk")):
        s = sub.add_parser(name, help=text)
        s.add_argument("run_dir")
        _item_options(s, chunk=name == "fit")
    s.add_argument("--ranks", type=int, help="MPI ranks the job asked for: the worker fails when "
                   "the MPI world differs (default: no check)")
    s = sub.add_parser("finish", help="record a payload that ended without an outcome")
    s.add_argument("stage", choices=("prep", "fit"))
    s.add_argument("run_dir")
    s.add_argument("--exit-code", type=int, required=True, help="the payload's exit status")
    _item_options(s, chunk=True)
    return p


def _item_options(parser, chunk: bool) -> None:
    parser.add_argument("--tile", type=int, help="tile index in the manifest (default: from the job)")
    if chunk:
        parser.add_argument("--chunk", type=int, help="chunk index (default: the array index)")


def drive(argv=None) -> int:
    args = build_parser().parse_args(argv)
    warnings.filterwarnings("ignore", category=RuntimeWarning)      # numerical noise, as in `dre`
    if args.command == "finish":
        return finish(args.stage, args.run_dir, args.exit_code, args.tile, args.chunk)
    if args.command == "fit":
        cache_in(Path(args.run_dir) / NUMBA_CACHE)
    return run_stage(args.command, args.run_dir, args.tile, getattr(args, "chunk", None),
                     getattr(args, "ranks", None))


def main(argv=None) -> int:
    mask_world_writable()             # the job's files (and its tools'): never world-writable
    return run_main("dre-batch worker", drive, argv)


if __name__ == "__main__":
    raise SystemExit(main())
