#!/usr/bin/env python
"""``dre-batch report`` speed for a run of 100,000 objects (issue 6: "in seconds").

    python benchmarks/bench_report.py [--run-dir DIR] [--objects N] [--keep DIR]

A real collated run is needed (its prep products feed the gallery): ``--run-dir`` (e.g.
``demo/run`` after ``make demo``), or the benchmark makes one with ``dre_hpc.demo`` (2 tiles of
1024x1024 with 120 galaxies each, about 20 s, not timed). Its copy is then scaled up: the flat
catalogue's rows are repeated to ``--objects`` rows (positions repeat too, so the truth matching
sees many candidates per galaxy, as it would not in a real run) and every tile gets 50 chunks with
done markers, as a 100,000-object run in 100 chunks would have. Timed, in process:

* the report of the original small run (the baseline),
* the report of the scaled run, with its gallery (12 random + 12 worst fits),
* ``report --text`` of the scaled run (reads and computes, writes nothing).

Printed: seconds, objects per second and the time as a fraction of the 10 s limit. The exit status
is 0 only when the scaled report is within the limit.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from dre_hpc.batch.chunking import chunk_range  # noqa: E402
from dre_hpc.batch.collate import RECORD  # noqa: E402
from dre_hpc.batch.rundir import RunDir, write_json  # noqa: E402
from dre_hpc.report.build import build_report  # noqa: E402

LIMIT = 10.0            # seconds for the report of 100,000 objects
CHUNKS_PER_TILE = 50


def make_run(work: Path) -> Path:
    from dre_hpc import demo
    code = demo.main(["--workdir", str(work), "--tiles", "2", "--size", "1024", "--galaxies", "120",
                      "--stars", "30"])
    if code:
        raise SystemExit(f"the demo run failed (exit code {code})")
    return work / "run"


def scale_run(source: Path, target: Path, objects: int) -> int:
    """Copy `source` to `target` and repeat its flat catalogue's rows to `objects` rows; give every
    tile `CHUNKS_PER_TILE` done chunks in the collate record and markers. Returns the row count."""
    from astropy.io import fits
    shutil.copytree(source, target, symlinks=True)
    rundir = RunDir(target)
    run = rundir.read_manifest()["run"]
    flat = rundir.collated(f"{run}_dre.fits")
    with fits.open(flat) as hdul:
        big = np.resize(np.asarray(hdul[1].data), objects)
        header = hdul[1].header
    flat.unlink()
    fits.BinTableHDU(big, header=header).writeto(flat)
    record = json.loads(rundir.collated(RECORD).read_text())
    tiles = np.char.rstrip(big["TILE"].astype(str))
    for tile in record["tiles"]:
        n = int(np.sum(tiles == tile))
        chunks = []
        for k in range(CHUNKS_PER_TILE):
            start, stop = chunk_range(n, k, CHUNKS_PER_TILE)
            chunks.append({"chunk": k, "start": start, "stop": stop, "sha256": {}})
            write_json(rundir.marker("fit", tile, k), {"seconds": 0.8 + 0.001 * (stop - start), "ranks": 1})
        record["tiles"][tile]["chunks"] = chunks
    rundir.collated(RECORD).write_text(json.dumps(record))
    return len(big)


def timed(func, *args, **kwargs) -> tuple:
    start = time.perf_counter()
    out = func(*args, **kwargs)
    return time.perf_counter() - start, out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", help="a collated run to start from (default: make one)")
    parser.add_argument("--objects", type=int, default=100_000)
    parser.add_argument("--keep", help="work in this directory and keep it")
    args = parser.parse_args(argv)
    work = Path(args.keep or tempfile.mkdtemp(prefix="bench_report_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        source = Path(args.run_dir) if args.run_dir else make_run(work / "small")
        small_rows = build_report(source, write=False).summary["objects"]
        base, _ = timed(build_report, source)
        rows = scale_run(source, work / "scaled", args.objects)
        text, _ = timed(build_report, work / "scaled", write=False)
        full, report = timed(build_report, work / "scaled")
        print(f"report of the small run ({small_rows} objects, baseline): {base:.2f} s")
        print(f"report --text of {rows} objects: {text:.2f} s ({rows / text:,.0f} objects/s)")
        print(f"report of {rows} objects: {full:.2f} s ({rows / full:,.0f} objects/s), "
              f"{full / LIMIT:.2f} of the {LIMIT:.0f} s limit, {full / base:.2f}x the small run's; "
              f"parts: {report.seconds}")
        return 0 if full <= LIMIT else 1
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
