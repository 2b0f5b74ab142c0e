#!/usr/bin/env python
"""Model-cube generation and loading, timed on this machine.

    python benchmarks/bench_models.py [--workers 1 2] [--index-count 12] [--workdir DIR] [--keep]

(1) the ``sersic`` preset cube (n = 0.5..6 step 0.5 x the default q, angle and radius axes: 30,240
models, 27,468 distinct, 128x128 px), rendered (`make_cube`) and written (`write_cube`) with each
``--workers`` count, and whether the files are byte-identical; (2) the cube as ``dre -m sersic``
meets it once cached: `resolve_model('sersic')` (the cache look-up: no rendering) and `read_cube`
(reading and checking the 2 GB file; right after it was written, so from the page cache: decoding,
not the disk). ``--index-count K`` renders only the first K index values (and says so). The
``--workdir`` holds the cubes and the cache (``DRE_HPC_CACHE`` is set to ``WORKDIR/cache``); it is
removed at the end unless ``--keep``. Timings are single runs; other processes make them noisy
(``cpu`` is this process's and its workers' CPU time). Exits non-zero if the cubes differ.

On the 2-core development machine (AMD EPYC, another test run beside it): generate 28 s with one
worker (render 24 s), 19 s with two (render 14 s), 2.0 GB file, read_cube 5.7 s; peak memory 2.5 GB
generating. Before (renderer version 1: no mirror symmetry, one process, the stamps expanded and
copied before writing): 52 s (render 42.5 s), peak memory 4.0 GB, the same float32 data.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import resource
import shutil
import sys
import time
from pathlib import Path

# one BLAS thread per process: the worker processes are the parallelism
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

from dre_hpc.models import generate  # noqa: E402
from dre_hpc.models.cube_io import read_cube, write_cube  # noqa: E402
from dre_hpc.models.grid import Axis, ModelGrid  # noqa: E402
from dre_hpc.models.sersic import default_workers  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to time [1 2]")
    p.add_argument("--index-count", type=int, default=12, help="index values of the sersic grid to "
                   "render, from n = 0.5 [12: the whole preset]")
    p.add_argument("--workdir", default="bench_models", help="cubes and cache [bench_models]")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    return p.parse_args(argv)


def cpu_seconds() -> float:
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def bench_grid(index_count: int) -> ModelGrid:
    grid = generate.sersic_grid()
    if index_count == grid.index.count:
        return grid
    index = Axis("INDEX", grid.index.start, grid.index.step, index_count)
    return ModelGrid(index, *grid.axes[1:], boxsize=grid.boxsize, has_index_axis=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    os.environ["DRE_HPC_CACHE"] = str(work / "cache")
    grid = bench_grid(args.index_count)
    distinct = grid.unique_models()[0].size
    print(f"grid {'x'.join(map(str, grid.shape))} x {grid.boxsize}x{grid.boxsize} px: {grid.size} "
          f"models, {distinct} distinct; n = {grid.index.values[0]:g}..{grid.index.values[-1]:g}"
          + ("" if grid == generate.sersic_grid() else " (a part of the sersic preset)"))
    print(f"CPUs usable: {len(os.sched_getaffinity(0))}; default workers: {default_workers()}")
    rows, files = [], []
    try:
        for workers in args.workers:
            out = work / f"sersic_w{workers}.fits"
            cpu0, t0 = cpu_seconds(), time.perf_counter()
            cube, _ = generate.make_cube(grid, workers=workers)
            t1 = time.perf_counter()
            write_cube(out, cube, grid, overwrite=True, extra_cards=generate.generator_cards())
            del cube
            t2 = time.perf_counter()
            rows.append((f"generate, {workers} worker{'s' if workers > 1 else ''}", t2 - t0,
                         cpu_seconds() - cpu0, f"render {t1 - t0:.1f} s + write {t2 - t1:.1f} s; "
                         f"{distinct / (t1 - t0):.0f} models/s"))
            files.append(out)
        generation_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
        size = files[0].stat().st_size
        digests = {sha256(f) for f in files}
        same = len(digests) == 1

        cached = generate.cube_path(grid, "sersic")
        cached.parent.mkdir(parents=True, exist_ok=True)
        os.replace(files[-1], cached)  # what ensure_cube would have written
        files[-1] = cached
        stamp = cached.stat().st_mtime_ns
        t0 = time.perf_counter()
        if grid == generate.sersic_grid():
            path = generate.resolve_model("sersic")
        else:
            path = generate.ensure_cube(grid, "sersic")
        t1 = time.perf_counter()
        assert path == cached and cached.stat().st_mtime_ns == stamp, "the cached cube was rendered again"
        rows.append(("resolve_model('sersic'), cached", t1 - t0, None, "cache look-up, no rendering"))
        cpu0, t0 = cpu_seconds(), time.perf_counter()
        cube, got = read_cube(path)
        t1 = time.perf_counter()
        assert got == grid and cube.shape == grid.shape + (grid.boxsize, grid.boxsize)
        rows.append(("read_cube of the cached cube", t1 - t0, cpu_seconds() - cpu0,
                     f"{cube.nbytes / 1e6 / (t1 - t0):.0f} MB/s (page cache)"))
        del cube
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    print()
    print(f"| {'step':34s} | {'wall s':>7s} | {'cpu s':>7s} | notes")
    print(f"|{'-' * 36}|{'-' * 9}|{'-' * 9}|{'-' * 40}")
    for label, wall, cpu, note in rows:
        cpu_text = "" if cpu is None else f"{cpu:7.1f}"
        print(f"| {label:34s} | {wall:7.2f} | {cpu_text:>7s} | {note}")
    print()
    print(f"file size: {size / 1e6:.1f} MB ({size / 2 ** 30:.2f} GiB); cubes identical for workers "
          f"{args.workers}: {'yes' if same else 'NO'}")
    print(f"peak memory of this process: {generation_peak:.2f} GB generating (a worker process: "
          f"under 0.1 GB), {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.2f} GB after "
          f"read_cube")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
