"""The state of every item of a run: the prep of each tile and each fit chunk.

States: ``unsubmitted``, ``pending``, ``running``, ``done``, ``failed`` (with the reason) and
``blocked`` (a fit chunk whose tile's prep failed). They come from three sources, cheapest first:

1. the markers the jobs write themselves (`RunDir` layout): one ``os.scandir`` per marker folder;
   only the ``failed`` markers are opened (for their reason), and of the ``done`` ones only the
   preps' (one a tile: its object count and warnings), never a chunk's;
2. the submission records (``jobs/*.json``): the latest record covering an item gives its job id;
3. the scheduler, asked once (`Scheduler.active`) and only about items that have a submission but no
   ``done``/``failed`` marker. A submitted item the scheduler no longer has, without an outcome
   marker, died without saying why (SIGKILL, out of memory, walltime): it is reported as failed.

A failed item whose latest submission is a newer job than the one that failed (an automatic retry,
`dre_hpc.batch.retry`, or ``run --failed-only``) follows that job: pending or running while the
scheduler has it. A retryable failure with retries left, whose own job is still in the queue
(its finish step is about to resubmit it), is running. ``retry`` says which: "retry 1 of 2
submitted", "no retry left (attempt 3 of 3, ...)"; ``attempt`` and ``retryable`` come from the
failed marker.

A tile whose chunk count is not known yet (``objects_per_chunk`` and prep not done) has one fit item
with ``chunk=None``. Without a scheduler (``scheduler=None``) nothing is asked: submitted items
without an outcome are reported as running (``started`` marker) or pending.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from dataclasses import asdict, dataclass

from dre_hpc.batch.retry import attempt_of, decide, same_job
from dre_hpc.batch.rundir import MARKER_KINDS, OUTCOMES, RunDir, RunDirError, chunk_label, read_json

STATES = ("unsubmitted", "pending", "running", "done", "failed", "blocked")
ACTIVE = ("pending", "running")
VANISHED = "the job ended without writing an outcome (killed? out of memory? walltime?); log: {log}"
NEVER_STARTED = "the job left the queue without starting (cancelled? dependency never satisfied?); log: {log}"
RETRY_NEVER_STARTED = "resubmitted after: {reason}; but job {job} left the queue without starting; log: {log}"
NOT_RESUBMITTED = ("retryable, but its job ended without resubmitting it (see the log); "
                   "`dre-batch run --failed-only` reruns it")
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
    attempt: int | None = None       # of the failed run (failed markers; None when not read)
    retryable: bool | None = None    # the failed marker's retryable
    retry: str | None = None         # what happens about a retryable failure (see the module doc)
    redo_prep: bool | None = None    # a fit failed because its tile's prep products changed


@dataclass
class TileSummary:
    """Counts of one tile: the prep state and its fit chunks per state."""

    name: str
    index: int
    prep: str
    n_chunks: int | None
    counts: dict
    n_objects: int | None = None     # from the prep done marker
    warnings: tuple = ()             # what the prep reported (no object, image mostly NaN or zero)


class RunStatus:
    """All items of a run, with counts per state and per tile."""

    def __init__(self, run: str, items: list, time_taken: float = 0.0, preps: dict | None = None):
        self.run, self.items, self.seconds = run, items, time_taken
        self.counts = {s: 0 for s in STATES}
        self.counts.update(Counter(item.state for item in items))
        self.tiles = self._summaries()
        for summary in self.tiles:               # preps: tile -> (n_objects, warnings) of done preps
            summary.n_objects, summary.warnings = (preps or {}).get(summary.name, (None, ()))

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
                             "n_objects": t.n_objects, "warnings": list(t.warnings), "chunks": []}
                    for t in self.tiles}
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


def _latest_submissions(rundir: RunDir, attempts: dict | None = None) -> dict:
    """``{(stage, tile or tile index, index): (job_id, scheduler index)}`` from the latest record
    covering each item. The scheduler index is the position in the submitted array: the item
    index minus the block's offset (``offset`` in the record, else its first index). `attempts`,
    when given, gets the ``attempt`` of each item's latest record (None: not an automatic retry)."""
    latest = {}
    for record in rundir.submissions():
        indices = record.get("indices") or []
        offset = record.get("offset", min(indices) if indices else 0)
        tile = record.get("tile") if record.get("stage") == "fit" else None
        for index in indices:
            key = (record.get("stage"), tile, int(index))
            latest[key] = (str(record.get("job_id")), int(index) - offset)
            if attempts is not None:
                attempts[key] = record.get("attempt")
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


def _failed_marker(rundir: RunDir, stage: str, tile: str, k) -> tuple:
    """``(reason, content)`` of an item's failed marker (content {} when it cannot be read)."""
    path = rundir.marker(stage, tile, k, "failed")
    try:
        content = read_json(path, f"{stage} failed marker")
    except RunDirError as exc:
        return str(exc), {}
    reason = content.get("reason")
    return (str(reason) if reason else f"failed (no reason in {path.name})"), content


def _take_failed_fields(item, content: dict) -> None:
    """Copy what a failed marker says about rerunning onto `item`: attempt, retryable, redo_prep."""
    item.attempt, item.retryable = attempt_of(content), bool(content.get("retryable"))
    item.redo_prep = bool(content.get("redo_prep"))


def _scheduler_log(scheduler, job) -> str | None:
    """Where the scheduler put the output of `job` ``(job_id, array index)`` (SLURM:
    ``logs/slurm/...``), or None: then the item's dre-batch log is named."""
    find = getattr(scheduler, "log_file", None)          # a bare `active` object has none
    return find(*job) if find else None


class _Collector:
    """Builds the items of one run (one instance per `collect` call)."""

    def __init__(self, rundir: RunDir, scheduler):
        self.rundir, self.scheduler = rundir, scheduler
        self.record_attempts = {}
        self.submitted = _latest_submissions(rundir, self.record_attempts)
        self.items, self.kinds, self.unresolved = [], {}, {}
        self.superseded, self.finishing = {}, set()    # positions of failed items (see `failed`)
        self._retries = None

    @property
    def retries(self) -> int:
        """``scheduler.retries`` of the run (read once, when a failed item needs it)."""
        if self._retries is None:
            config = getattr(self.scheduler, "config", None)
            if config is None:
                from dre_hpc.batch.config import load_config
                config = load_config(self.rundir.config)
            self._retries = int(config.scheduler["retries"])
        return self._retries

    def element(self, job) -> str:
        """The id under which array element `job` ``(job_id, array index)`` writes its markers."""
        make = getattr(self.scheduler, "dependency_id", None)      # a bare `active` object has none
        job_id, index = job
        return make(job_id, index) if make and index is not None else job_id

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
            self.failed(item, key, job)
        elif job is not None:
            item.state = "running" if kind == "started" else "pending"
            self.unresolved[len(self.items)] = job
        elif kind == "started":       # run by hand, no record: nothing to ask
            item.state, item.reason = "running", "started without a submission record"
        self.items.append(item)
        self.kinds[len(self.items) - 1] = kind
        return item

    def failed(self, item, key, job):
        """A failed marker: the item is failed, unless a newer job was submitted for it
        (`superseded`: it follows that job) or its own job is still finishing and will resubmit
        it (`finishing`); both are settled by asking the scheduler in `resolve`."""
        item.reason, content = _failed_marker(self.rundir, item.stage, item.tile, item.chunk)
        item.state = "failed"
        _take_failed_fields(item, content)
        position = len(self.items)
        if job is not None and self.scheduler is not None and content.get("job_id") is not None:
            retry_attempt = self.record_attempts.get(key)
            if not same_job(content.get("job_id"), self.element(job)) or \
                    (retry_attempt is not None and attempt_of({"attempt": retry_attempt}) > item.attempt):
                item.state = "pending"
                item.retry = (f"retry {retry_attempt - 1} of {self.retries} submitted" if retry_attempt
                              else "resubmitted")
                self.superseded[position] = content
                self.unresolved[position] = job
                return
        if not item.retryable:
            return
        decision = decide(content, self.retries, self.record_attempts.get(key))
        if not decision.allowed:
            item.retry = decision.why_not()
        elif job is not None and self.scheduler is not None:
            item.retry = f"{decision.describe()} being submitted by its job"
            self.finishing.add(position)
            self.unresolved[position] = job
        else:
            item.retry = NOT_RESUBMITTED

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
            if position in self.finishing:
                self.settle_finishing(position, answer)
                continue
            if position in answer:
                item.state = "running" if self.kinds[position] == "started" else answer[position]
                continue
            kind, content = self.rundir.read_marker(item.stage, item.tile, item.chunk)
            if position in self.superseded and kind == "failed" and content == self.superseded[position]:
                item.log = _scheduler_log(self.scheduler, self.unresolved[position]) or item.log
                item.state = "failed"          # the newer job never wrote a marker
                item.reason = RETRY_NEVER_STARTED.format(reason=item.reason, job=self.element(
                    self.unresolved[position]), log=item.log)
                continue
            if kind in OUTCOMES:
                item.state, item.retry = kind, None
                item.reason = (content or {}).get("reason") if kind == "failed" else None
                if kind == "failed":
                    _take_failed_fields(item, content)
            else:
                template = VANISHED if kind == "started" else NEVER_STARTED
                item.log = _scheduler_log(self.scheduler, self.unresolved[position]) or item.log
                item.state, item.reason = "failed", template.format(log=item.log)

    def settle_finishing(self, position, answer):
        """A retryable failure whose own job may still be resubmitting it: running while the
        scheduler has that job; else pending when a newer submission appeared meanwhile (read the
        records again: the job may have resubmitted and ended since they were read), else failed."""
        item = self.items[position]
        if position in answer:
            item.state = "running"
            return
        key = (item.stage, item.tile if item.stage == "fit" else None,
               item.chunk if item.stage == "fit" else item.tile_index)
        attempts = {}
        newer = _latest_submissions(self.rundir, attempts).get(key)
        if newer is not None and newer != self.unresolved[position]:
            item.state, item.job_id = "pending", newer[0]
            item.retry = (f"retry {attempts[key] - 1} of {self.retries} submitted" if attempts.get(key)
                          else "resubmitted")
            return
        kind, _ = self.rundir.read_marker(item.stage, item.tile, item.chunk)
        if kind == "failed":
            item.state, item.retry = "failed", NOT_RESUBMITTED
        else:                # rewritten meanwhile by a newer job (its record was missed): follow it
            item.state = {"done": "done", "started": "running"}.get(kind, "pending")
            item.reason = item.retry = None

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
    tiles = rundir.tiles()
    for tile in tiles:
        collector.tile(tile, prep_kinds)
    collector.resolve()
    collector.block()
    preps = {t.name: _prep_outcome(rundir, t.name) for t in tiles if prep_kinds.get(t.name) == "done"}
    return RunStatus(manifest.get("run", rundir.root.name), collector.items, time.perf_counter() - start,
                     preps)


def _prep_outcome(rundir: RunDir, tile: str) -> tuple:
    """``(n_objects, warnings)`` of a tile's prep done marker (one small file per tile, not per
    chunk); ``(None, ())`` when it cannot be read."""
    try:
        content = read_json(rundir.marker("prep", tile), "prep done marker")
    except RunDirError:
        return None, ()
    n_objects = content.get("n_objects")
    return (n_objects if isinstance(n_objects, int) else None), tuple(map(str, content.get("warnings") or ()))


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
    empty = [t.name for t in status.tiles if t.n_objects == 0]
    if empty:
        lines.append(f"{len(empty)} tile(s) done with 0 objects (nothing to fit): {', '.join(empty)}")
    lines += [f"  prep {t.name}: {text}" for t in status.tiles for text in t.warnings
              if "0 objects" not in text]
    retrying = [item for item in status.items if item.retry and item.state in ACTIVE]
    if retrying:
        lines.append(f"{len(retrying)} retried or resubmitted:")
        lines += [_item_line(item) for item in retrying]
    bad = status.failed_items()
    if bad:
        lines.append(f"{len(bad)} failed or blocked:")
        lines += [_item_line(item) for item in bad]
    return "\n".join(lines)


def _item_line(item) -> str:
    """``  fit TILE chunk K [state]: reason (retry)``."""
    where = item.tile if item.stage == "prep" else f"{item.tile} chunk {_label(item.chunk)}"
    return f"  {item.stage} {where} [{item.state}]: {item.reason}" + (f" ({item.retry})" if item.retry else "")


def _label(chunk) -> str:
    return "?" if chunk is None else str(chunk)
