#!/usr/bin/env python
"""The chunk worker (``python -m dre_hpc.batch.worker fit``) with 1 and 2 MPI ranks: throughput,
memory per rank with and without the node-shared model cube, and the cost of checkpoints.

    python benchmarks/bench_worker.py [--objects N] [--repeat R] [--batch-size B] [--cache DIR]
                                      [--fresh] [--keep DIR]

Prepared once and cached (``DIR``, default ``$TMPDIR/dre_bench_worker``): one simulated tile
(`dre_hpc.sim.tile`) sized for about N objects after the prep cuts (default 3,000; the galaxy
density of a 4096x4096 tile with 1,000 galaxies), run through the real prep (SExtractor, PSFEx,
cuts). Every measured run is a fresh run directory over that tile (config written as
tests/batch_helpers.make_run writes it, the prep products hard-linked), one chunk holding every
object, the default cube, ``resources.fit.cpus_per_task=1`` (one BLAS thread per rank: 2 ranks
use the 2 cores), ``fit.batch_size`` at its default unless ``--batch-size``. The chunk is fitted
by the real worker, as a job script runs it: one process without MPI for 1 rank, ``mpirun
--oversubscribe -n 2 ... --ranks 2`` for 2. Its done marker gives the fitted objects, the job's
seconds on rank 0 (after start-up: imports, MPI) and per rank the fit-only seconds, the units and
objects it fitted and its memory (peak RSS, PSS, private) at the end of the fit.

Printed:

(a) throughput: objects/s over the wall time of the process(es), over the job's seconds, and
    fit-only (objects / the slowest rank's fit seconds), for 1 rank and for 2 ranks with the
    dynamic and the static schedule; the ratio 2 ranks / 1 rank;
(b) memory per rank with 2 ranks, ``fit.shared_models`` true and false (PSS counts a shared page
    once per node, split among the processes that map it);
(c) checkpoints, 1 rank: the default interval (``checkpoint_seconds=300``), after every unit
    (``checkpoint_objects=1``) and none (``checkpoint_seconds=0``), the job's time against none;
    and, measured in this process, the time to save one fitted unit as a checkpoint part against
    the time to fit it: each object is saved at most once whatever the interval and the cost is
    per byte, so that share is about the overhead at the default interval too (issue 5: < 5 %);
(d) whether every run wrote the same results: the chi files' sha256 (from the done markers) and
    the summary tables' data (their FITS headers differ by design: ``CFGHASH`` is the run config's
    hash, which the schedule, sharing and checkpoint settings are part of).

After one warm-up run with 1 and with 2 ranks (not counted: the page cache, the first MPI start),
each configuration runs ``--repeat`` times (interleaved); the fastest job time is kept. The load
average before and after is printed: the numbers mean little on a busy machine. The exit status
is 0 only when every run wrote the same results. About 2 minutes on this 2-core machine with the
defaults, plus about 50 s the first time (simulation and prep of a 7424x7424 tile).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "tests"))      # make_run: the tests' hand-written run directory

import numpy as np  # noqa: E402

from batch_helpers import make_run  # noqa: E402
from dre_hpc.batch.rundir import RunDir  # noqa: E402

ISSUE_CHECKPOINT_LIMIT = 0.05           # checkpoint overhead at the default interval
DEFAULT_INTERVAL = 300.0                # fit.checkpoint_seconds default
#: The default cube (n = 4, `bulge`), which the README's figures are for; dre-batch's own default
#: is the `sersic` cube.
COMMON = ["chunking.chunks_per_tile=1", "resources.fit.cpus_per_task=1", "fit.model=bulge"]

#: label -> (ranks, config overrides). Order: the order of the printed tables.
CONFIGS = {
    "1 rank": (1, []),
    "2 ranks dynamic": (2, []),
    "2 ranks static": (2, ["fit.schedule=static"]),
    "2 ranks unshared": (2, ["fit.shared_models=false"]),
    "1 rank ckpt every unit": (1, ["fit.checkpoint_objects=1"]),
    "1 rank ckpt none": (1, ["fit.checkpoint_seconds=0"]),
}


def log(text=""):
    print(text, flush=True)


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


# -- the prepared tile (cached) ------------------------------------------------------------------------

def tile_spec(objects: int, seed: int):
    """A TileSpec for about `objects` cut objects: 1.07 galaxies per object (stars and the margin
    are cut), at the density of a 4096x4096 tile with 1,000 galaxies."""
    from dre_hpc.sim.tile import TileSpec
    galaxies = math.ceil(objects * 1.07)
    size = max(1024, math.ceil(4096 * math.sqrt(galaxies / 1000) / 256) * 256)
    return TileSpec(size=size, n_galaxies=galaxies, n_stars=60, seed=seed)


def prepared_tile(cache: Path, objects: int, seed: int, fresh: bool) -> RunDir:
    """The run whose prep is done (simulated and prepared on first use)."""
    from dre_hpc.batch.worker import run_stage
    from dre_hpc.sim.tile import simulate_tile
    spec = tile_spec(objects, seed)
    folder = cache / f"objects{objects}_seed{seed}_size{spec.size}"
    base = RunDir(folder / "base")
    if fresh:
        shutil.rmtree(folder, ignore_errors=True)
    if base.root.is_dir() and base.manifest.is_file():
        name = base.tiles()[0].name
        if base.read_marker("prep", name)[0] == "done":
            return base
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    start = time.perf_counter()
    image = simulate_tile(spec, folder / "Tiles" / "bench.fits", folder / "truth.fits")[0]
    log(f"  simulated a {spec.size}x{spec.size} tile with {spec.n_galaxies} galaxies in "
        f"{time.perf_counter() - start:.1f} s")
    base = make_run(folder, [image], COMMON, name="base")
    start = time.perf_counter()
    if run_stage("prep", base.root, tile=0) != 0:
        raise SystemExit(f"the prep failed: {base.read_marker('prep', 'bench')[1]}")
    log(f"  prepared it (SExtractor, PSFEx, cuts) in {time.perf_counter() - start:.1f} s")
    return base


def clone(base: RunDir, where: Path, overrides) -> RunDir:
    """A new run directory over the base run's tile, its prep products hard-linked."""
    tile = base.tiles()[0]
    run = make_run(where.parent, [tile.image], COMMON + list(overrides), name=where.name)
    shutil.copytree(base.tile_dir(tile.name), run.tile_dir(tile.name), copy_function=os.link)
    marker = run.marker("prep", tile.name, outcome="done")
    marker.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(base.marker("prep", tile.name, outcome="done"), marker)
    return run


# -- one fit ---------------------------------------------------------------------------------------------

def mpi_env() -> dict:
    env = dict(os.environ)
    if hasattr(os, "geteuid") and os.geteuid() == 0:       # Open MPI refuses root without these
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    return env


def fit(run: RunDir, ranks: int) -> dict:
    """Run the chunk's fit job; its done marker plus ``wall`` (seconds of the whole command)."""
    command = [sys.executable, "-m", "dre_hpc.batch.worker", "fit", ".", "--tile", "0", "--chunk", "0"]
    if ranks > 1:
        mpirun = shutil.which("mpirun") or shutil.which("mpiexec")
        if mpirun is None:
            raise SystemExit("mpirun not found (Open MPI: bin/install-system-packages)")
        command = [mpirun, "--oversubscribe", "-n", str(ranks), *command, "--ranks", str(ranks)]
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=run.root, env=mpi_env(), capture_output=True, text=True,
                          timeout=600)
    wall = time.perf_counter() - start
    tile = run.tiles()[0].name
    kind, done = run.read_marker("fit", tile, 0)
    if proc.returncode != 0 or kind != "done":
        raise SystemExit(f"fit failed (exit {proc.returncode}, marker {kind}):\n{proc.stderr[-3000:]}\n"
                         f"{json.dumps(done, indent=1)[:3000]}")
    done["wall"] = wall
    dre = run.chunk_outputs(tile, 0)["dre"]
    done["table_sha256"], done["header"] = table_digest(dre)
    return done


def table_digest(path) -> tuple:
    """sha256 of a FITS table's column data (not its header) and the header's cards."""
    from astropy.io import fits
    with fits.open(path) as hdul:
        data = hdul[1].data
        digest = hashlib.sha256()
        for name in data.names:
            column = np.ascontiguousarray(data[name])
            digest.update(name.encode() + str(column.dtype).encode() + column.tobytes())
        header = {k: v for k, v in hdul[1].header.items() if k and not k.startswith(("TTYPE", "TFORM"))}
    return digest.hexdigest(), header


# -- report ----------------------------------------------------------------------------------------------

def rates(done: dict) -> dict:
    n = done["fitted_objects"]
    fit_s = max(r["fit_seconds"] for r in done["per_rank"])
    return {"objects": n, "wall": done["wall"], "job": done["seconds"], "fit": fit_s,
            "wall_rate": n / done["wall"], "job_rate": n / done["seconds"], "fit_rate": n / fit_s}


def best(results: list) -> dict:
    """The run with the shortest job time."""
    return min(results, key=lambda d: d["seconds"])


def print_throughput(results: dict):
    log("(a) throughput (objects/s; wall: the whole command incl. start-up; job: the worker's "
        "seconds on rank 0; fit: objects / slowest rank's fit seconds)")
    log(f"  {'':18} {'objects':>7} {'wall s':>7} {'job s':>7} {'fit s':>7} {'wall/s':>8} {'job/s':>8} "
        f"{'fit/s':>8}  units per rank")
    one = rates(best(results["1 rank"]))
    for label in ("1 rank", "2 ranks dynamic", "2 ranks static"):
        done = best(results[label])
        r = rates(done)
        units = " + ".join(f"{p['units']}({p['objects']})" for p in done["per_rank"])
        log(f"  {label:18} {r['objects']:7d} {r['wall']:7.2f} {r['job']:7.2f} {r['fit']:7.2f} "
            f"{r['wall_rate']:8.1f} {r['job_rate']:8.1f} {r['fit_rate']:8.1f}  {units}")
    for label in ("2 ranks dynamic", "2 ranks static"):
        r = rates(best(results[label]))
        log(f"  ratio {label} / 1 rank: wall {r['wall_rate'] / one['wall_rate']:.2f}, "
            f"job {r['job_rate'] / one['job_rate']:.2f}, fit {r['fit_rate'] / one['fit_rate']:.2f}")


def print_memory(results: dict):
    log("(b) memory per rank, 2 ranks, at the end of the fit (MB)")
    log(f"  {'':24} {'rank':>4} {'peak RSS':>9} {'RSS':>7} {'PSS':>7} {'private':>8}")
    for label, title in (("2 ranks dynamic", "shared_models true"), ("2 ranks unshared", "shared_models false")):
        done = best(results[label])
        for stats in done["per_rank"]:
            log(f"  {title:24} {stats['rank']:4d} {stats['max_rss_mb']:9.1f} {stats.get('rss_mb', 0):7.1f} "
                f"{stats.get('pss_mb', float('nan')):7.1f} {stats.get('private_mb', float('nan')):8.1f}")
        total = sum(s.get("pss_mb", 0) for s in done["per_rank"])
        log(f"  {title:24}  sum of PSS {total:.1f} MB")


def unit_save_cost(base: RunDir, extra, workdir: Path, repeat=5) -> dict:
    """In this process: fit the chunk's first unit (one BLAS thread), then write it as a checkpoint
    part `repeat` times (np.savez, fsync, rename: `Checkpoint.save`). Seconds of the fit, median
    seconds and bytes of one save."""
    from threadpoolctl import threadpool_limits

    from dre_hpc.batch import fit_job
    from dre_hpc.batch.checkpoint import Checkpoint
    from dre_hpc.batch.chunk_fit import fit_unit
    from dre_hpc.batch.chunking import chunk_range
    from dre_hpc.batch.comm import SerialComm
    from dre_hpc.batch.config import load_config
    from dre_hpc.fit.tiles import psf_index
    from dre_hpc.models.psf import read_psf
    config = load_config(base.config, extra)
    tile = base.tiles()[0]
    prep = base.read_marker("prep", tile.name)[1]
    with threadpool_limits(limits=1, user_api="blas"):
        models = fit_job.load_models(config, SerialComm())
        bounds = chunk_range(int(prep["n_objects"]), 0, 1)
        work = fit_job.ChunkWork(base, config, tile, 0, prep, bounds, models)
        unit = work.units[0]
        matrix = models.for_psf(read_psf(work.products["psf"], ext_number=psf_index(unit.ext)))
        cuts = work.reader.unit(unit)
        fit_unit(matrix, cuts, work.options)                        # warm-up
        start = time.perf_counter()
        result = fit_unit(matrix, cuts, work.options)
        fit_seconds = time.perf_counter() - start
    checkpoint = Checkpoint(workdir / "save_cost.ckpt", "bench")
    seconds = []
    for _ in range(repeat):
        start = time.perf_counter()
        path = checkpoint.save({unit.uid: result})
        seconds.append(time.perf_counter() - start)
    size = path.stat().st_size
    checkpoint.clear()
    return {"objects": unit.size, "fit": fit_seconds, "save": float(np.median(seconds)), "bytes": size}


def print_checkpoints(results: dict, cost: dict):
    log("(c) checkpoints, 1 rank (job seconds, fastest of the repeats)")
    none = best(results["1 rank ckpt none"])
    rows = (("default (300 s)", "1 rank"), ("every unit", "1 rank ckpt every unit"), ("none", "1 rank ckpt none"))
    for title, label in rows:
        done = best(results[label])
        log(f"  {title:16} {done['seconds']:7.2f} s  checkpoints {done['checkpoints']:3d}  "
            f"ratio vs none {done['seconds'] / none['seconds']:.3f}")
    default = best(results["1 rank"])["seconds"] / none["seconds"] - 1
    every = best(results["1 rank ckpt every unit"])["seconds"] / none["seconds"] - 1
    log(f"  whole runs: default {default:+.1%}, every unit {every:+.1%} against none (no checkpoint "
        f"falls due within a {none['seconds']:.0f} s fit at the default interval; differences of a "
        f"few % are noise here)")
    share = cost["save"] / cost["fit"]
    log(f"  one unit measured in process: fit {cost['objects']} objects {cost['fit'] * 1000:.0f} ms, "
        f"save them ({cost['bytes'] / 1e6:.1f} MB, fsync) {cost['save'] * 1000:.1f} ms = {share:.1%} "
        f"of their fit time")
    log(f"  every fitted object is saved at most once whatever the interval (those of the last "
        f"interval never) and the cost is per byte, so about {share:.1%} is also the overhead at the "
        f"default {DEFAULT_INTERVAL:.0f} s once checkpoints fall due; issue: < {ISSUE_CHECKPOINT_LIMIT:.0%}: "
        f"{'PASS' if share < ISSUE_CHECKPOINT_LIMIT else 'FAIL'}")


def print_identity(results: dict) -> bool:
    runs = [(label, i, done) for label, dones in results.items() for i, done in enumerate(dones)]
    chi = {done["outputs"]["chi"]["sha256"] for _, _, done in runs}
    tables = {done["table_sha256"] for _, _, done in runs}
    dre_files = {done["outputs"]["dre"]["sha256"] for _, _, done in runs}
    same_config = all(len({d["outputs"]["dre"]["sha256"] for d in dones}) == 1 for dones in results.values())
    differing = sorted({key for _, _, d in runs for key in d["header"]
                        if len({str(x["header"].get(key)) for _, _, x in runs}) > 1})
    log(f"(d) outputs of all {len(runs)} runs ({len(results)} configurations x repeats):")
    log(f"  chi files (sha256 in the done markers): {'identical' if len(chi) == 1 else f'{len(chi)} different'}")
    log(f"  summary table data: {'identical' if len(tables) == 1 else f'{len(tables)} different'}")
    one_two = {d["outputs"]["dre"]["sha256"] for label in ("1 rank", "2 ranks dynamic") for d in results[label]}
    log(f"  _dre.fits files: {len(dre_files)} distinct sha256 for {len(results)} configurations; "
        f"repeats of one configuration {'identical' if same_config else 'DIFFER'}; 1 rank and 2 ranks "
        f"(same config) {'identical' if len(one_two) == 1 else 'DIFFER'}; header cards that differ "
        f"between configurations: {', '.join(differing) or 'none'}")
    return len(chi) == 1 and len(tables) == 1 and same_config and len(one_two) == 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--objects", type=int, default=3000, help="objects in the tile, about [3000]")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each configuration [3]")
    parser.add_argument("--batch-size", type=int, help="fit.batch_size [automatic: 1024 for the default cube]")
    parser.add_argument("--seed", type=int, default=11, help="simulation seed [11]")
    parser.add_argument("--cache", default=None,
                        help="folder of the prepared tile [$TMPDIR/dre_bench_worker]")
    parser.add_argument("--fresh", action="store_true", help="simulate and prepare the tile again")
    parser.add_argument("--keep", help="write the measured runs into this folder and keep them")
    args = parser.parse_args(argv)
    from dre_hpc.models.generate import ensure_default_cube
    ensure_default_cube()                              # generated once, outside the timings
    cache = Path(args.cache or Path(tempfile.gettempdir()) / "dre_bench_worker")
    begin = time.perf_counter()
    log(f"machine: {os.cpu_count()} CPUs, load average {load()}")
    log(f"tile (cache {cache}):")
    base = prepared_tile(cache, args.objects, args.seed, args.fresh)
    prep = base.read_marker("prep", base.tiles()[0].name)[1]
    extra = [f"fit.batch_size={args.batch_size}"] if args.batch_size else []
    from dre_hpc.batch.config import load_config
    from dre_hpc.fit.engine import auto_batch_size
    from dre_hpc.models.grid import ModelGrid
    batch = load_config(base.config, extra)["fit"]["batch_size"] or auto_batch_size(ModelGrid.default())
    log(f"  {prep['n_objects']} objects in one chunk, fit.batch_size {batch}: "
        f"{math.ceil(prep['n_objects'] / batch)} batches per extension")
    workdir = Path(args.keep or tempfile.mkdtemp(prefix="bench_worker_"))
    workdir.mkdir(parents=True, exist_ok=True)
    results = {label: [] for label in CONFIGS}
    try:
        for ranks in (1, 2):           # not counted: page cache (cube, cuts), first MPI start
            done = fit(clone(base, workdir / f"warm_up_{ranks}", extra), ranks)
            log(f"  warm-up {ranks} rank{'s' if ranks > 1 else ''}: wall {done['wall']:.2f} s, "
                f"job {done['seconds']:.2f} s")
        for repeat in range(args.repeat):
            for label, (ranks, overrides) in CONFIGS.items():
                run = clone(base, workdir / f"{label.replace(' ', '_')}_{repeat}", extra + overrides)
                done = fit(run, ranks)
                results[label].append(done)
                log(f"  run {repeat + 1}/{args.repeat} {label:24} wall {done['wall']:6.2f} s, job "
                    f"{done['seconds']:6.2f} s, {done['fitted_objects']} objects, "
                    f"{done['checkpoints']} checkpoints")
                shutil.rmtree(run.root / "tiles", ignore_errors=True)      # the links, not the base
        cost = unit_save_cost(base, extra, workdir)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    log()
    print_throughput(results)
    print_memory(results)
    print_checkpoints(results, cost)
    same = print_identity(results)
    log(f"load average {load()}; benchmark {time.perf_counter() - begin:.0f} s")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
