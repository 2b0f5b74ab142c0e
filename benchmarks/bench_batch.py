#!/usr/bin/env python
"""dre-batch bookkeeping speed against the targets of issue 4.

    python benchmarks/bench_batch.py [--only setup|status|collate] [--keep DIR]

(a) ``setup`` of 1,000 tiles x 20 chunks <= 10 s (`bench_setup`: to be filled in with the setup
    command; it reports "not implemented" until then);
(b) ``status`` (`dre_hpc.batch.status.collect`) of 1,000 tiles x 20 chunks <= 2 s: the markers are
    written by the benchmark (19,000 done, 1,000 failed, every prep done, one submission record
    per tile), no scheduler is asked (every item has an outcome marker);
(c) ``collate`` (`dre_hpc.batch.collate.collate`) of 100 chunks x 1,000 objects <= 10 s: 10 tiles x
    10 chunks whose FITS tables have the columns and dtypes of ``dre_hpc.io.outputs.summary_table``
    and whose chi files hold one float32 dataset of the default grid (2,520 values) per object,
    written once by the benchmark with the fit job's writers (not timed).

Printed per part: seconds, items or objects per second, and the time as a fraction of the limit.
The exit status is 0 only if every implemented part is within its limit.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "tests"))      # the hand-built run helpers of the tests

from batch_fixtures import done_chunk, done_prep, make_run, submit  # noqa: E402
from dre_hpc.batch.collate import collate  # noqa: E402
from dre_hpc.batch.status import collect  # noqa: E402

LIMITS = {"setup": 10.0, "status": 2.0, "collate": 10.0}


def bench_setup(workdir: Path, n_tiles=1000, n_chunks=20):
    """`dre-batch setup` of 1,000 tiles x 20 chunks on SLURM: the tile images exist (setup checks
    every path; empty files, setup does not open them), the whole setup is timed in process
    (config load, tile list, rendering, manifest). Returns ``(seconds, items)``, items = prep +
    fit array elements (1,000 x 21)."""
    from dre_hpc.batch.setup_run import setup_run
    images = workdir / "setup_tiles"
    images.mkdir()
    paths = [images / f"tile{i:04d}.fits" for i in range(n_tiles)]
    for path in paths:
        path.touch()
    tiles = workdir / "setup_tiles.txt"
    tiles.write_text("".join(f"{p}\n" for p in paths))
    config = workdir / "setup.yaml"
    config.write_text(f"run: {{name: bench}}\nchunking: {{chunks_per_tile: {n_chunks}}}\n"
                      f"scheduler: {{name: slurm}}\n")
    start = time.perf_counter()
    rundir = setup_run(config, tiles, workdir / "setup_run", argv=["bench"])
    seconds = time.perf_counter() - start
    assert len(rundir.tiles()) == n_tiles
    return seconds, n_tiles * (n_chunks + 1)


def _status_run(root: Path, n_tiles: int, n_chunks: int):
    """Markers for every chunk: done, except chunk 7 of every tile failed."""
    tiles = {f"tile{i:04d}": 1000 for i in range(n_tiles)}
    rundir = make_run(root, tiles, chunks_per_tile=n_chunks, scheduler="slurm")
    for index, tile in enumerate(tiles):
        done_prep(rundir, tile, 1000, n_chunks)
        submit(rundir, "fit", tile, range(n_chunks), str(1000 + index))
        folder = rundir.marker_dir("fit", tile)
        folder.mkdir(parents=True)
        for k in range(n_chunks):
            kind = "failed" if k == 7 else "done"
            text = ('{"reason": "MemoryError", "traceback": null, "exit_code": 1}' if kind == "failed"
                    else '{"tile": "%s", "chunk": %d, "rows": 50}' % (tile, k))
            rundir.marker("fit", tile, k, kind).write_text(text)
    return rundir


def bench_status(workdir: Path, n_tiles=1000, n_chunks=20):
    rundir = _status_run(workdir / "status_run", n_tiles, n_chunks)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        status = collect(rundir)
        best = min(best, time.perf_counter() - start)
    assert status.counts["done"] == n_tiles * (n_chunks - 1) + n_tiles, status.counts   # + preps
    assert status.counts["failed"] == n_tiles
    return best, len(status.items)


def _collate_run(root: Path, n_tiles: int, n_chunks: int, per_chunk: int):
    tiles = {f"tile{i:02d}": n_chunks * per_chunk for i in range(n_tiles)}
    rundir = make_run(root, tiles, chunks_per_tile=n_chunks)
    for index, (tile, n) in enumerate(tiles.items()):
        done_prep(rundir, tile, n, n_chunks)
        for k in range(n_chunks):
            done_chunk(rundir, tile, index, n, k, n_chunks)
    return rundir


def bench_collate(workdir: Path, n_tiles=10, n_chunks=10, per_chunk=1000):
    start = time.perf_counter()
    rundir = _collate_run(workdir / "collate_run", n_tiles, n_chunks, per_chunk)
    os.sync()              # the writeback of the inputs is not collate's work
    print(f"  (collate input written and synced in {time.perf_counter() - start:.1f} s, "
          f"{_size(rundir.root / 'chunks') / 1e6:.0f} MB)")
    start = time.perf_counter()
    report = collate(rundir)
    seconds = time.perf_counter() - start
    assert report.objects == n_tiles * n_chunks * per_chunk
    return seconds, report.objects


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=sorted(LIMITS), help="run one part")
    parser.add_argument("--keep", help="build the runs in this folder and keep them")
    args = parser.parse_args(argv)
    workdir = Path(args.keep or tempfile.mkdtemp(prefix="bench_batch_"))
    workdir.mkdir(parents=True, exist_ok=True)
    parts = {"setup": (bench_setup, "items"), "status": (bench_status, "items"),
             "collate": (bench_collate, "objects")}
    ok = True
    try:
        for name, (bench, unit) in parts.items():
            if args.only and name != args.only:
                continue
            print(f"{name}:")
            result = bench(workdir)
            if result is None:
                print("  not implemented yet (bench_setup)")
                continue
            seconds, count = result
            passed = seconds <= LIMITS[name]
            ok &= passed
            print(f"  {count} {unit} in {seconds:.2f} s = {count / seconds:,.0f} {unit}/s; "
                  f"{seconds / LIMITS[name]:.2f} of the {LIMITS[name]:.0f} s limit: "
                  f"{'PASS' if passed else 'FAIL'}")
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
