"""``make demo``: the main job end to end, ``dre-batch`` on the local scheduler, against simulated truth.

``dre-sim`` draws tiles with known galaxies and stars into ``Tiles/`` (truth in ``Truth/``); then
``dre-batch setup`` creates a run (local scheduler, one job per core at most), ``run`` executes the
prep jobs (SExtractor, PSFEx, cuts: the real tools) and the fit chunks, ``status`` checks that every
chunk is done, ``collate`` verifies and merges the chunks into per-tile files and one flat
catalogue, ``link`` puts them into ``run/output/``, and ``report`` writes ``run/output/report/``
(figures, an HTML page, the fits matched to the truth by position: ``validation.json``). The demo ends
by printing the report's path and the recovery of the truth. The galaxies are a realistic
population (`POPULATION`: n 0.5-6, b/a 0.1-1, S/N 10-500), fitted with the ``sersic`` cube.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import yaml

from .cli import dre_batch, dre_sim
from .sim.tile import TileSpec

RUN = "demo"
#: dre-sim ranges of the demo's galaxies: disks, bulges and everything between.
POPULATION = ("--index", "0.5", "6", "--ax-ratio", "0.1", "1.0", "--logr", "0.2", "1.2", "--snr", "10", "500")


def demo_config(path: Path, objects_per_chunk: int) -> Path:
    """The demo's run config: the ``sersic`` cube (a free index), the second pass
    (``prep.neighbours``), the tiles' gain and zero-point (dre-sim defaults), local scheduler."""
    spec = TileSpec()
    config = {"run": {"name": RUN, "seed": 2026},
              "fit": {"model": "sersic", "gain": spec.gain, "zero_point": spec.zero_point, "batch_size": 64},
              "chunking": {"objects_per_chunk": objects_per_chunk},
              # the second pass: the neighbours' fitted light out of every cut (`prep_neighbours`)
              "prep": {"neighbours": True},
              "scheduler": {"name": "local"},
              # room for the sersic models (about 5.4 GB) in the prep job: it convolves them once
              # per tile and every fit chunk of the tile maps them (`fit_job.convolve_for_fits`)
              "resources": {"prep": {"mem_gb": 16}}}
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run_steps(work: Path, tiles: int, size: int, galaxies: int, stars: int, seed: int) -> int:
    """The commands, in order; the first non-zero exit code stops the demo."""
    work.mkdir(parents=True, exist_ok=True)
    names = [f"simtile{i}" for i in range(tiles)]
    steps = [("dre-sim", dre_sim.main, ["-o", str(work / "Tiles"), "--truth-dir", str(work / "Truth"),
                                        "--name", name, "--size", str(size), "--galaxies", str(galaxies),
                                        "--stars", str(stars), "--seed", str(seed + i), *POPULATION])
             for i, name in enumerate(names)]
    tiles_file = work / "tiles.txt"
    tiles_file.write_text("".join(f"{work / 'Tiles' / name}.fits\n" for name in names))
    config = demo_config(work / "run.yaml", objects_per_chunk=max(galaxies // 3, 1))
    run_dir = str(work / "run")
    steps += [("dre-batch", dre_batch.main, args) for args in (
        ["setup", str(config), str(tiles_file), "--run-dir", run_dir, "--clobber"],
        ["run", run_dir], ["status", run_dir], ["collate", run_dir], ["link", run_dir],
        ["report", run_dir])]
    for label, func, argv in steps:
        start = time.perf_counter()
        print(f"dre-demo: {label} {' '.join(argv)}", flush=True)
        code = func(argv)
        if code:
            print(f"dre-demo: {label} failed (exit code {code})", file=sys.stderr)
            return code
        print(f"dre-demo: {label} done in {time.perf_counter() - start:.1f} s", flush=True)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="dre-demo", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="demo", help="working directory (default: demo)")
    parser.add_argument("--tiles", type=int, default=2, help="simulated tiles (default: 2)")
    parser.add_argument("--size", type=int, default=2048, help="tile side in pixels (default: 2048)")
    parser.add_argument("--galaxies", type=int, default=300, help="galaxies per tile (default: 300)")
    parser.add_argument("--stars", type=int, default=60, help="stars per tile (default: 60)")
    parser.add_argument("--seed", type=int, default=2026)
    args = parser.parse_args(argv)
    work = Path(args.workdir)
    start = time.perf_counter()
    code = run_steps(work, args.tiles, args.size, args.galaxies, args.stars, args.seed)
    if code:
        return code
    output = work / "run" / "output"
    report = output / "report"
    result = json.loads((report / "validation.json").read_text())
    print(f"dre-demo: done in {time.perf_counter() - start:.0f} s; flat catalogue {output / f'{RUN}_dre.fits'}")
    print(f"dre-demo: report {report / 'index.html'}; recovery of the simulated truth "
          f"(all numbers: {report / 'validation.json'}):")
    counts = {"truth galaxies": result["truth_galaxies"],
              "fitted and matched to a galaxy": result["matched"],
              "of those without flags": result["matched_unflagged"]}
    for key, value in {**counts, **result["headline"]}.items():
        print(f"  {key:34s} {value:.3f}" if isinstance(value, float) else f"  {key:34s} {value}")
    refined = result.get("refined", {})
    if refined:
        print("dre-demo: sub-grid estimates <P>_FIT (robust scatter of fit - true; coverage of +-1 sigma, "
              "68 % if the errors are right):")
        for name, stats in refined.items():
            unit = result["units"].get(name) or ("relative" if name == "FLUX" else "")
            print(f"  {name + '_FIT':34s} scatter {stats['all']['scatter']:.4f} {unit:8s} "
                  f"coverage {stats['all']['coverage']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
