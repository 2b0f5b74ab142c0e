"""dre-batch status: states from real markers and submission records in hand-built run directories.

Where a queue is needed, `Queue` below is a tiny in-test object with only the `active` method of the
scheduler interface (no scheduler runs in these tests; the SLURM run test covers the real one).
"""

from __future__ import annotations

import threading
import time

import pytest

from batch_fixtures import done_chunk, done_prep, failed, make_run, submit
from dre_hpc.batch import status as st
from dre_hpc.batch.rundir import RunDirError


class Queue:
    """The `active` part of a scheduler: answers from a dict and records the job ids asked about."""

    def __init__(self, answer=None):
        self.answer, self.asked = dict(answer or {}), []

    def active(self, job_ids):
        self.asked.append(list(job_ids))
        return dict(self.answer)


def by_key(status):
    return {(i.stage, i.tile, i.chunk): i for i in status.items}


def test_unsubmitted_run_has_one_item_per_prep_and_chunk(tmp_path):
    rundir = make_run(tmp_path / "run", {"a": 10, "b": 5}, chunks_per_tile=3)
    status = st.collect(rundir)
    assert len(status.items) == 2 + 6
    assert status.counts["unsubmitted"] == 8 and not status.all_done
    assert [t.name for t in status.tiles] == ["a", "b"] and status.tiles[0].n_chunks == 3


def test_markers_give_done_failed_and_reason(tmp_path):
    rundir = make_run(tmp_path / "run", {"a": 10}, chunks_per_tile=3)
    done_prep(rundir, "a", 10, 3)
    done_chunk(rundir, "a", 0, 10, 0, 3, write_outputs=False)
    failed(rundir, "fit", "a", 1, "ValueError: bad cutout")
    items = by_key(st.collect(rundir))
    assert items[("prep", "a", None)].state == "done"
    assert items[("fit", "a", 0)].state == "done"
    assert items[("fit", "a", 1)].state == "failed"
    assert items[("fit", "a", 1)].reason == "ValueError: bad cutout"
    assert items[("fit", "a", 2)].state == "unsubmitted"
    assert items[("fit", "a", 2)].log == "logs/fit/a/00002.log"


def test_scheduler_asked_only_about_submitted_items_without_outcome(tmp_path):
    rundir = make_run(tmp_path / "run", {"a": 10}, chunks_per_tile=4)
    submit(rundir, "prep", None, [0], "100")
    submit(rundir, "fit", "a", [0, 1, 2, 3], "101")
    done_prep(rundir, "a", 10, 4)
    done_chunk(rundir, "a", 0, 10, 0, 4, write_outputs=False)
    rundir.write_marker("fit", "a", 1, "started", {"job_id": "101", "host": "h", "time": "t"})
    rundir.write_marker("fit", "a", 2, "started", {"job_id": "101", "host": "h", "time": "t"})
    queue = Queue({("101", 1): "running", ("101", 3): "pending"})
    items = by_key(st.collect(rundir, queue))
    assert queue.asked == [["101"]]                      # prep 100 is done: not asked
    assert items[("fit", "a", 1)].state == "running"
    assert items[("fit", "a", 3)].state == "pending" and items[("fit", "a", 3)].job_id == "101"
    vanished = items[("fit", "a", 2)]                     # started, and the queue no longer has it
    assert vanished.state == "failed" and "ended without writing an outcome" in vanished.reason
    assert "logs/fit/a/00002.log" in vanished.reason
    assert st.collect(rundir, queue).failed_items()[0].chunk == 2


def test_latest_submission_wins_and_array_offset(tmp_path):
    rundir = make_run(tmp_path / "run", {"a": 10}, chunks_per_tile=4)
    submit(rundir, "fit", "a", [0, 1], "200")
    submit(rundir, "fit", "a", [2, 3], "201")           # second block: array index = chunk - 2
    submit(rundir, "fit", "a", [1], "300")              # a resubmission of chunk 1
    queue = Queue({("201", 1): "running", ("300", 0): "pending", ("200", 0): "pending"})
    items = by_key(st.collect(rundir, queue))
    assert items[("fit", "a", 3)].state == "running" and items[("fit", "a", 3)].job_id == "201"
    assert items[("fit", "a", 1)].state == "pending" and items[("fit", "a", 1)].job_id == "300"
    assert items[("fit", "a", 0)].state == "pending"
    assert items[("fit", "a", 2)].state == "failed"     # submitted, never started, gone from the queue
    assert "left the queue without starting" in items[("fit", "a", 2)].reason


def test_a_failed_marker_written_while_the_scheduler_is_asked_gives_its_fields(tmp_path):
    """A fit without an outcome at the scan whose failed marker appears before the scheduler
    answers (its job ended meanwhile) carries that marker's attempt, retryable and redo_prep."""
    rundir = make_run(tmp_path / "run", {"a": 10}, chunks_per_tile=2)
    done_prep(rundir, "a", 10, 2)
    submit(rundir, "fit", "a", [0, 1], "101")

    class EndsMeanwhile(Queue):
        def active(self, job_ids):
            rundir.write_marker("fit", "a", 0, "failed", {
                "reason": "products changed", "retryable": False, "redo_prep": True, "attempt": 2,
                "job_id": "101_0"})
            return super().active(job_ids)

    item = by_key(st.collect(rundir, EndsMeanwhile()))[("fit", "a", 0)]
    assert (item.state, item.reason) == ("failed", "products changed")
    assert (item.attempt, item.retryable, item.redo_prep) == (2, False, True)


def test_failed_prep_blocks_its_fits_with_the_reason(tmp_path):
    rundir = make_run(tmp_path / "run", {"a": 10, "b": 10}, chunks_per_tile=2)
    failed(rundir, "prep", "a", None, "SExtractor found no objects")
    failed(rundir, "fit", "a", 0, "prep of tile a is not done: SExtractor found no objects")
    status = st.collect(rundir)
    blocked = [i for i in status.items if i.state == "blocked"]
    assert [(i.tile, i.chunk) for i in blocked] == [("a", 0), ("a", 1)]
    assert all("SExtractor found no objects" in i.reason for i in blocked)
    assert {(i.stage, i.tile, i.chunk) for i in status.failed_items()} == {
        ("prep", "a", None), ("fit", "a", 0), ("fit", "a", 1)}
    assert [i.stage for i in status.failed_items(blocked=False)] == ["prep"]


def test_unknown_chunk_count_gives_one_fit_item(tmp_path):
    rundir = make_run(tmp_path / "run", {"a": 10, "b": 10, "c": 7}, chunks_per_tile=None, known=False)
    submit(rundir, "prep", None, [0, 1, 2], "400")
    failed(rundir, "prep", "b", None, "no PSF stars")
    done_prep(rundir, "c", 7, 3)
    status = st.collect(rundir, Queue({("400", 0): "running"}))
    fits = {(i.tile, i.chunk): i.state for i in status.items if i.stage == "fit"}
    assert fits == {("a", None): "pending", ("b", None): "blocked",
                    ("c", 0): "unsubmitted", ("c", 1): "unsubmitted", ("c", 2): "unsubmitted"}


def test_json_table_and_progress(tmp_path):
    rundir = make_run(tmp_path / "run", {"tileA": 10, "tileB": 10}, chunks_per_tile=2)
    done_prep(rundir, "tileA", 10, 2)
    done_chunk(rundir, "tileA", 0, 10, 0, 2, write_outputs=False)
    failed(rundir, "fit", "tileA", 1, "MemoryError: out of memory")
    status = st.collect(rundir)
    data = status.to_json()
    assert data["counts"]["done"] == 2 and data["counts"]["failed"] == 1 and data["all_done"] is False
    tile_a = data["tiles"][0]
    assert tile_a["name"] == "tileA" and tile_a["prep"]["state"] == "done"
    assert [c["state"] for c in tile_a["chunks"]] == ["done", "failed"]
    assert tile_a["chunks"][1]["reason"] == "MemoryError: out of memory"
    table = st.format_table(status)
    assert "tileA" in table and "1/2" in table and "MemoryError: out of memory" in table
    assert "fit tileA chunk 1 [failed]" in table
    assert st.format_progress(status).split("]")[1].startswith(" 2/6 done")


def test_all_done(tmp_path):
    rundir = make_run(tmp_path / "run", {"a": 3}, chunks_per_tile=1)
    done_prep(rundir, "a", 3, 1)
    done_chunk(rundir, "a", 0, 3, 0, 1, write_outputs=False)
    status = st.collect(rundir)
    assert status.all_done and status.counts["done"] == 2 and "failed or blocked" not in st.format_table(status)


def test_wait_polls_until_nothing_is_active(tmp_path):
    """A thread writes the done markers after a while, like a job would; the queue empties then."""
    rundir = make_run(tmp_path / "run", {"a": 4}, chunks_per_tile=2)
    submit(rundir, "prep", None, [0], "500")
    queue = Queue({("500", 0): "running"})

    def finish():
        time.sleep(0.3)
        done_prep(rundir, "a", 4, 2)
        queue.answer.clear()

    updates = []
    worker = threading.Thread(target=finish)
    worker.start()
    final = st.wait(rundir, queue, interval=0.1, on_update=updates.append, timeout=20)
    worker.join()
    assert len(updates) >= 2 and updates[0].counts["running"] == 1
    assert final.active == 0 and final.counts["done"] == 1 and final.counts["unsubmitted"] == 2


def test_archived_run_is_refused(tmp_path):
    rundir = make_run(tmp_path / "run", {"a": 4}, chunks_per_tile=1)
    rundir.collated("archive.json").parent.mkdir(parents=True)
    rundir.collated("archive.json").write_text('{"archive": "testrun_archive.tar.gz", "time": "t"}')
    with pytest.raises(RunDirError, match="archived into testrun_archive.tar.gz"):
        st.collect(rundir)


def test_status_of_20000_chunks_is_fast(tmp_path):
    """The issue's target (20,000 chunks in <= 2 s), here at 1/4 scale with a margin for CI."""
    tiles = {f"t{i:03d}": 100 for i in range(250)}
    rundir = make_run(tmp_path / "run", tiles, chunks_per_tile=20)
    for tile in tiles:
        done_prep(rundir, tile, 100, 20)
        folder = rundir.marker_dir("fit", tile)
        folder.mkdir(parents=True)
        for k in range(20):
            name = rundir.marker("fit", tile, k, "failed" if k == 7 else "done").name
            (folder / name).write_text('{"reason": "boom"}' if k == 7 else "{}")
    start = time.perf_counter()
    status = st.collect(rundir)
    elapsed = time.perf_counter() - start
    assert status.counts["done"] == 250 * 20 and status.counts["failed"] == 250
    assert elapsed < 1.0, f"status of 5,000 chunks took {elapsed:.2f} s"


def test_with_the_real_local_scheduler(tmp_path):
    """LocalScheduler.active answers per run process: alive (a sleeping child) or ended."""
    import subprocess
    from dre_hpc.batch.config import load_config
    from dre_hpc.batch.schedulers import LocalScheduler

    rundir = make_run(tmp_path / "run", {"a": 4, "b": 4}, chunks_per_tile=1)
    alive = subprocess.Popen(["sleep", "30"])
    ended = subprocess.Popen(["true"])
    ended.wait()
    try:
        submit(rundir, "prep", None, [0], f"local-{alive.pid}", scheduler="local")
        submit(rundir, "prep", None, [1], f"local-{ended.pid}", scheduler="local")
        for tile in ("a", "b"):
            rundir.write_marker("prep", tile, None, "started", {"job_id": "x", "host": "h", "time": "t"})
        items = by_key(st.collect(rundir, LocalScheduler(load_config(rundir.config), rundir)))
    finally:
        alive.kill()
        alive.wait()
    assert items[("prep", "a", None)].state == "running"
    assert items[("prep", "b", None)].state == "failed"
    assert "ended without writing an outcome" in items[("prep", "b", None)].reason
    assert items[("fit", "b", 0)].state == "blocked"
