"""The state of every item of a run: the prep of each tile and each fit chunk.

States: ``unsubmitted``, ``pending``, ``running``, ``done``, ``failed`` (with the reason) and
``blocked`` (a fit chunk whose tile's prep failed). They come from three sources, cheapest first:

1. the markers the jobs write themselves (`RunDir` layout): one ``os.scandir`` per marker folder;
   only the ``failed`` markers are opened (for their reason), never the ``done`` ones;
2. the submission records (``jobs/*.json``): the latest record covering an item gives its job id;
3. the scheduler, asked once (`Scheduler.active`) and only about items that have a submission but no
   ``done``/``failed`` marker. A submitted item the scheduler no longer has, without an outcome
   marker, died without saying why (SIGKILL, out of memory, walltime): it is reported as failed.

A tile whose chunk count is not known yet (``objects_per_chunk`` and prep not done) has one fit item
with ``chunk=None``. Without a scheduler (``scheduler=None``) nothing is asked: submitted items
without an outcome are reported as running (``started`` marker) or pending.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from dataclasses import asdict, dataclass

from dre_hpc.batch.rundir import MARKER_KINDS, OUTCOMES, RunDir, RunDirError, chunk_label, read_json

STATES = ("unsubmitted", "pending", "running", "done", "failed", "blocked")
ACTIVE = ("pending", "running")
VANISHED = "the job ended without writing an outcome (killed? out of memory? walltime?); log: {log}"
NEVER_STARTED = "the job left the queue without starting (cancelled? dependency never satisfied?); log: {log}"
ARCHIVE_RECORD = "archive.json"          # collated/archive.json, written by archive.archive()


@dataclass
class ItemStatus:
    """One prep (``chunk`` None, stage ``prep``) or fit chunk (``chunk`` None while unknown)."""

    stage: str
    tile: str
    tile_index: int
    chunk: int | None
    state: str
    reason: str | None = None
    job_id: str | None = None
    log: str | None = None           # relative to the run directory


@dataclass
class TileSummary:
    """Counts of one tile: the prep state and its fit chunks per state."""

    name: str
    index: int
    prep: str
    n_chunks: int | None
    counts: dict


class RunStatus:
    """All items of a run, with counts per state and per tile."""

    def __init__(self, run: str, items: list, time_taken: float = 0.0):
        self.run, self.items, self.seconds = run, items, time_taken
        self.counts = {s: 0 for s in STATES}
        self.counts.update(Counter(item.state for item in items))
        self.tiles = self._summaries()

    def _summaries(self) -> list:
        tiles = {}
        for item in self.items:
            if item.tile not in tiles:
                tiles[item.tile] = TileSummary(item.tile, item.tile_index, "unsubmitted", None,
                                               {s: 0 for s in STATES})
            summary = tiles[item.tile]
            if item.stage == "prep":
                summary.prep = item.state
            else:
                summary.counts[item.state] += 1
                if item.chunk is not None:
                    summary.n_chunks = (summary.n_chunks or 0) + 1
        return list(tiles.values())

    @property
    def all_done(self) -> bool:
        return self.counts["done"] == len(self.items)

    @property
    def active(self) -> int:
        """Items still pending or running."""
        return self.counts["pending"] + self.counts["running"]

    def failed_items(self, blocked: bool = True) -> list:
        """Items to resubmit (``run --failed-only``): failed ones, including those that vanished
        from the scheduler without an outcome, and (with `blocked`) fits blocked by a failed prep."""
        wanted = ("failed", "blocked") if blocked else ("failed",)
        return [item for item in self.items if item.state in wanted]

    def to_json(self) -> dict:
        """A machine-readable dict (``status --json``): totals, then per tile its prep and chunks."""
        per_tile = {t.name: {"index": t.index, "prep": None, "n_chunks": t.n_chunks, "counts": t.counts,
                             "chunks": []} for t in self.tiles}
        for item in self.items:
            entry = {k: v for k, v in asdict(item).items() if k not in ("stage", "tile", "tile_index")}
            if item.stage == "prep":
                per_tile[item.tile]["prep"] = entry
            else:
                per_tile[item.tile]["chunks"].append(entry)
        return {"run": self.run, "all_done": self.all_done, "counts": dict(self.counts),
                "items": len(self.items), "tiles": [dict(name=n, **v) for n, v in per_tile.items()]}


def _scan(folder) -> dict:
    """``{stem: kind}`` of the markers in `folder` (temporary files skipped; an outcome beats
    ``started`` should both be there)."""
    found = {}
    try:
        entries = os.scandir(folder)
    except (FileNotFoundError, NotADirectoryError):
        return found
    with entries:
        for entry in entries:
            stem, dot, kind = entry.name.rpartition(".")
            if dot and not entry.name.startswith(".") and kind in MARKER_KINDS:
                if found.get(stem) not in OUTCOMES:
                    found[stem] = kind
    return found


def _latest_submissions(rundir: RunDir) -> dict:
    """``{(stage, tile or tile index, index): (job_id, scheduler index)}`` from the latest record
    covering each item. The scheduler index is the position in the submitted array: the item
    index minus the block's offset (``offset`` in the record, else its first index)."""
    latest = {}
    for record in rundir.submissions():
        indices = record.get("indices") or []
        offset = record.get("offset", min(indices) if indices else 0)
        tile = record.get("tile") if record.get("stage") == "fit" else None
        for index in indices:
            latest[(record.get("stage"), tile, int(index))] = (str(record.get("job_id")), int(index) - offset)
    return latest


def ask_scheduler(scheduler, wanted: dict) -> dict:
    """The adapter to `Scheduler.active`: `wanted` maps items to ``(job_id, array index)``; returns
    ``{item: "pending"|"running"}`` for those the scheduler still has. The scheduler answers per
    ``(job_id, index)``, or per ``(job_id, None)`` / ``job_id`` for a whole job (local runs)."""
    if scheduler is None or not wanted:
        return {}
    answer = scheduler.active(sorted({job for job, _ in wanted.values()}))
    states = {}
    for item, (job, index) in wanted.items():
        state = answer.get((job, index)) or answer.get((job, None)) or answer.get(job)
        if state:
            states[item] = state
    return states


def _failed_reason(rundir: RunDir, stage: str, tile: str, k) -> str:
    path = rundir.marker(stage, tile, k, "failed")
    try:
        reason = read_json(path, f"{stage} failed marker").get("reason")
    except RunDirError as exc:
        return str(exc)
    return str(reason) if reason else f"failed (no reason in {path.name})"


def _scheduler_log(scheduler, job) -> str | None:
    """Where the scheduler put the output of `job` ``(job_id, array index)`` (SLURM:
    ``logs/slurm/...``), or None: then the item's dre-batch log is named."""
    find = getattr(scheduler, "log_file", None)          # a bare `active` object has none
    return find(*job) if find else None


class _Collector:
    """Builds the items of one run (one instance per `collect` call)."""

    def __init__(self, rundir: RunDir, scheduler):
        self.rundir, self.scheduler = rundir, scheduler
        self.submitted = _latest_submissions(rundir)
        self.items, self.kinds, self.unresolved = [], {}, {}

    def rel(self, path) -> str:
        return os.path.relpath(path, self.rundir.root)

    def add(self, stage, tile, k, kind, key):
        """One item from its marker `kind` (or None) and its submission key."""
        job = self.submitted.get(key)
        log = self.rel(self.rundir.log(stage, tile.name, k))
        item = ItemStatus(stage, tile.name, tile.index, k, "unsubmitted", None, job and job[0], log)
        if kind == "done":
            item.state = "done"
        elif kind == "failed":
            item.state, item.reason = "failed", _failed_reason(self.rundir, stage, tile.name, k)
        elif job is not None:
            item.state = "running" if kind == "started" else "pending"
            self.unresolved[len(self.items)] = job
        elif kind == "started":       # run by hand, no record: nothing to ask
            item.state, item.reason = "running", "started without a submission record"
        self.items.append(item)
        self.kinds[len(self.items) - 1] = kind
        return item

    def tile(self, tile, prep_kinds):
        prep = self.add("prep", tile, None, prep_kinds.get(tile.name), ("prep", None, tile.index))
        if tile.n_chunks is None:
            self.unknown_chunks(tile, prep)
            return
        fit_kinds = _scan(self.rundir.marker_dir("fit", tile.name))
        for k in range(tile.n_chunks):
            self.add("fit", tile, k, fit_kinds.get(chunk_label(k)), ("fit", tile.name, k))

    def unknown_chunks(self, tile, prep):
        """The single fit item of a tile whose chunk count prep has not recorded yet."""
        item = ItemStatus("fit", tile.name, tile.index, None, "unsubmitted")
        if prep.state == "done":
            item.state, item.reason = "failed", f"prep done marker of tile {tile.name} has no n_chunks"
        elif prep.state != "unsubmitted":
            item.state, item.reason = "pending", "waiting for prep to count the objects"
        self.items.append(item)
        self.kinds[len(self.items) - 1] = None

    def resolve(self):
        """Ask the scheduler about submitted items without an outcome; those it no longer has and
        that still have no outcome marker (checked again: a job may end meanwhile) have failed."""
        if self.scheduler is None:
            return
        answer = ask_scheduler(self.scheduler, self.unresolved)
        for position in self.unresolved:
            item = self.items[position]
            if position in answer:
                item.state = "running" if self.kinds[position] == "started" else answer[position]
                continue
            kind, content = self.rundir.read_marker(item.stage, item.tile, item.chunk)
            if kind in OUTCOMES:
                item.state = kind
                item.reason = (content or {}).get("reason") if kind == "failed" else None
            else:
                template = VANISHED if kind == "started" else NEVER_STARTED
                item.log = _scheduler_log(self.scheduler, self.unresolved[position]) or item.log
                item.state, item.reason = "failed", template.format(log=item.log)

    def block(self):
        """Fit items of tiles whose prep failed, without a done marker, are blocked."""
        prep_failed = {i.tile: i.reason for i in self.items if i.stage == "prep" and i.state == "failed"}
        for item in self.items:
            if item.stage == "fit" and item.tile in prep_failed and item.state != "done":
                item.state = "blocked"
                item.reason = f"prep of tile {item.tile} failed: {prep_failed[item.tile]}"


def collect(rundir, scheduler=None) -> RunStatus:
    """The `RunStatus` of the run in `rundir` (a `RunDir` or a path), asking `scheduler` (or
    nobody, when None) about submitted items without an outcome marker."""
    start = time.perf_counter()
    rundir = rundir if isinstance(rundir, RunDir) else RunDir(rundir)
    _refuse_archived(rundir)
    manifest = rundir.read_manifest()
    collector = _Collector(rundir, scheduler)
    prep_kinds = _scan(rundir.marker_dir("prep"))
    for tile in rundir.tiles():
        collector.tile(tile, prep_kinds)
    collector.resolve()
    collector.block()
    return RunStatus(manifest.get("run", rundir.root.name), collector.items, time.perf_counter() - start)


def _refuse_archived(rundir: RunDir) -> None:
    """An archived run has no markers left: its status would be meaningless (and resubmitting
    'failed' items would redo the whole run)."""
    record = rundir.collated(ARCHIVE_RECORD)
    if record.is_file() and not rundir.marker_dir("prep").is_dir():
        content = read_json(record, "archive record")
        raise RunDirError(f"{rundir.root}: the run was archived into {content.get('archive')} on "
                          f"{content.get('time')}; its markers are in the archive "
                          f"(dre_hpc.batch.archive.extract_archive restores them)")


def wait(rundir, scheduler, interval: float = 30.0, on_update=None, timeout: float | None = None):
    """Poll `collect` every `interval` seconds until nothing is pending or running; calls
    ``on_update(status)`` after every poll and returns the last `RunStatus`. With `timeout`
    (seconds) it returns the status at that time even if items are still active."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        status = collect(rundir, scheduler)
        if on_update is not None:
            on_update(status)
        if status.active == 0 or (deadline is not None and time.monotonic() >= deadline):
            return status
        time.sleep(interval)


def _bar(done: int, total: int, width: int) -> str:
    filled = width if total == 0 else width * done // total
    return "#" * filled + "-" * (width - filled)


def format_progress(status: RunStatus, width: int = 30) -> str:
    """One line for people: ``[####------] 12/40 done  3 failed  1 running  6 pending ...``."""
    c, total = status.counts, len(status.items)
    parts = [f"[{_bar(c['done'], total, width)}] {c['done']}/{total} done"]
    parts += [f"{c[s]} {s}" for s in ("failed", "blocked", "running", "pending", "unsubmitted") if c[s]]
    return "  ".join(parts)


def format_table(status: RunStatus) -> str:
    """Per tile one line (prep state, chunks done/total, failed, running, pending), a total line,
    then every failed or blocked item with its reason."""
    width = max([4] + [len(t.name) for t in status.tiles])
    head = f"{'tile':<{width}}  {'prep':<11}  {'chunks':>11}  {'failed':>6}  {'running':>7}  {'pending':>7}"
    lines = [head, "-" * len(head)]
    for t in status.tiles:
        total = "?" if t.n_chunks is None else str(t.n_chunks)
        failed = t.counts["failed"] + t.counts["blocked"]
        lines.append(f"{t.name:<{width}}  {t.prep:<11}  {str(t.counts['done']) + '/' + total:>11}  "
                     f"{failed:>6}  {t.counts['running']:>7}  {t.counts['pending']:>7}")
    lines.append(format_progress(status))
    bad = status.failed_items()
    if bad:
        lines.append(f"{len(bad)} failed or blocked:")
        for item in bad:
            where = item.tile if item.stage == "prep" else f"{item.tile} chunk {_label(item.chunk)}"
            lines.append(f"  {item.stage} {where} [{item.state}]: {item.reason}")
    return "\n".join(lines)


def _label(chunk) -> str:
    return "?" if chunk is None else str(chunk)
