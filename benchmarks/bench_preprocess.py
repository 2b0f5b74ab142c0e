#!/usr/bin/env python
"""Tile preprocessing with the real tools, and reading cuts stores, timed on this machine.

    python benchmarks/bench_preprocess.py [--size 4096] [--galaxies 1000] [--workdir DIR]

(1) ``dre-sim`` draws a tile (cached in the work directory; not part of the target);
(2) ``sex_dre``, (3) ``psfex_dre``, (4) ``make_cuts`` run on it, each timed: target <= 30 s for
(2)+(3)+(4) on a 4096x4096 tile with about 1,000 galaxies; (5) reading the cuts back with
``read_cuts`` in chunks of 256 objects, one process, from the stacked layout (target >= 5,000
cutouts/s) beside the original's one-group-per-object layout, written from the same cuts in the
same run. Files are read after being written, so they come from the page cache: this measures
decoding, not the disk. The exit status is 0 only if every target passes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

from dre_hpc.cli import dre_sim, make_cuts, psfex_dre, sex_dre  # noqa: E402
from dre_hpc.io.cuts import count_cuts, read_cuts, write_cuts  # noqa: E402

TARGET_PREP_SECONDS = 30.0
TARGET_READ_RATE = 5000.0
READ_CHUNK = 256


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=4096, help="tile side in pixels [4096]")
    p.add_argument("--galaxies", type=int, default=1000, help="simulated galaxies [1000]")
    p.add_argument("--stars", type=int, default=60, help="simulated stars [60]")
    p.add_argument("--seed", type=int, default=2026)
    p.add_argument("--workdir", default="bench_preprocess", help="working directory [bench_preprocess]")
    p.add_argument("--repeat", type=int, default=3, help="read timings: best of this many [3]")
    return p.parse_args(argv)


def timed(label, func, *args):
    start = time.perf_counter()
    code = func(*args)
    seconds = time.perf_counter() - start
    if code:
        raise SystemExit(f"bench_preprocess: {label} failed with exit code {code}")
    print(f"  {label:12s} {seconds:7.2f} s")
    return seconds


def simulate(args, work: Path) -> None:
    spec = {"size": args.size, "galaxies": args.galaxies, "stars": args.stars, "seed": args.seed}
    stamp = work / "sim.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == spec and (work / "Tiles" / "bench.fits").is_file():
        print(f"(1) simulated tile: reusing {work / 'Tiles' / 'bench.fits'}")
        return
    print(f"(1) simulating a {args.size}x{args.size} tile with {args.galaxies} galaxies (not timed)")
    code = dre_sim.main(["-o", str(work / "Tiles"), "--truth-dir", str(work / "Truth"), "--name", "bench",
                         "--size", str(args.size), "--galaxies", str(args.galaxies),
                         "--stars", str(args.stars), "--seed", str(args.seed)])
    if code:
        raise SystemExit(f"bench_preprocess: dre-sim failed with exit code {code}")
    stamp.write_text(json.dumps(spec))


def read_rate(path: Path, repeat: int) -> float:
    n = count_cuts(path)
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for lo in range(0, n, READ_CHUNK):
            read_cuts(path, lo, min(lo + READ_CHUNK, n))
        best = min(best, time.perf_counter() - start)
    return n / best


def main(argv=None) -> int:
    args = parse_args(argv)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    simulate(args, work)
    tiles, sex, psf, cuts = (str(work / d) for d in ("Tiles", "Sextracted", "PSF", "Cuts"))
    print("(2)-(4) preprocessing, wall clock:")
    steps = {"sex_dre": timed("sex_dre", sex_dre.main, ["-i", tiles, "-o", sex]),
             "psfex_dre": timed("psfex_dre", psfex_dre.main, ["-i", sex, "-o", psf]),
             "make_cuts": timed("make_cuts", make_cuts.main, ["-i", tiles, "-s", sex, "-o", cuts])}
    total = sum(steps.values())
    stacked = work / "Cuts" / "bench_cuts.h5"
    n = count_cuts(stacked)
    print(f"  {'total':12s} {total:7.2f} s for {n} cutouts (target <= {TARGET_PREP_SECONDS:.0f} s)")

    print(f"(5) reading {n} cutouts in chunks of {READ_CHUNK}, one process (best of {args.repeat}):")
    data = read_cuts(stacked)
    rates = {}
    for layout, compression in (("stacked", "none"), ("stacked", "low"), ("dre", "none"), ("dre", "medium")):
        path = work / f"read_{layout}_{compression}.h5"
        write_cuts(path, data, layout=layout, compression=compression)
        rates[(layout, compression)] = read_rate(path, args.repeat)
        print(f"  {layout:8s} compression {compression:7s} {rates[(layout, compression)]:9.0f} cutouts/s")
    default = rates[("stacked", "none")]
    print(f"  stacked/none vs dre/none: {default / rates[('dre', 'none')]:.1f}x")

    ok_prep, ok_read = total <= TARGET_PREP_SECONDS, default >= TARGET_READ_RATE
    print(f"preprocessing {total:.1f} s <= {TARGET_PREP_SECONDS:.0f} s: {'PASS' if ok_prep else 'FAIL'}")
    print(f"stacked read {default:.0f}/s >= {TARGET_READ_RATE:.0f}/s: {'PASS' if ok_read else 'FAIL'}")
    return 0 if ok_prep and ok_read else 1


if __name__ == "__main__":
    sys.exit(main())
