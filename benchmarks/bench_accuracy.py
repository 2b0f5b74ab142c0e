#!/usr/bin/env python
"""Accuracy of the fit on realistic simulated tiles, beside PyImfit, with the Euclid Morphology
Challenge's metrics (issue 16, item 1).

    python benchmarks/bench_accuracy.py [--quick] [--workdir DIR] [--json PATH] [--jobs 2]
                                        [--no-bulge] [--no-imfit] [--centroids] [--seed 16] [--bound]

(1) Two seeded GalSim tiles (``accuracy_sim.py``: one Moffat, one Kolmogorov PSF; Sersic n
log-uniform 0.5-6, b/a 0.1-1, major-axis r_e log-uniform 1.5-20 px, S/N log-uniform 10-1000,
sub-pixel positions, as many faint neighbours again, stars for PSFEx). (2) The real tile workflow,
the project's commands run as subprocesses from this interpreter's environment: ``sex_dre`` ->
``psfex_dre`` -> ``make_cuts`` -> ``dre -m sersic`` (and ``dre -m bulge``, the default n = 4 cube,
unless ``--no-bulge``), ``--cpu 1``. (3) Detections matched to the truth (``match_positions``, 2 px).
(4) PyImfit (``accuracy_imfit.py``) on the same cutouts, mask, rms and PSF, as the reference.
(4b) With ``--bound``: the Cramer-Rao bound of each matched galaxy from the truth (``accuracy_bound.py``),
on its fit mask (sky known, or fitted too) and on its whole stamp, scored as three more fitters: the
information limit.
(5) Per bin of true S/N (10-20, 20-50, 50-100, 100-1000, all): bias, dispersion, outliers and
coverage of radius, flux, b/a, n and angle, completeness, catastrophic fraction
(``accuracy_scoring.py`` has the definitions), and objects/s per core; the tables side by side and,
with ``--json``, every number.

Scored objects: the target galaxies (not the faint neighbours) whose true position lies where
make_cuts cuts (80 px from the edges); completeness counts those detected, cut and fitted with
finite parameters. Every fitted object is scored, flagged or not. dre's grid parameters are scored
as they are (LOGR, AX_RATIO, ANGLE, INDEX, FLUX), their coverage from ``<P>_MEAN +- <P>_ERR``
(``FLUX +- FLUX_ERR``); refined ``<P>_FIT`` columns, where the summary has them, are scored as a
further fitter (``FIT_COLUMNS``). dre gets no ``--gain``: both fitters weight by the rms alone
(the tiles are sky-dominated). Seeds are fixed: the same options give the same tiles and the same
dre numbers. Default size: 2 tiles of 1400x1400 px with 200 target galaxies each, about 4
minutes on 2 cores (most of it PyImfit and the sersic cube); ``--quick``: 1000 px, 110 each,
about 2 minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402
from astropy.table import Table  # noqa: E402

import accuracy_bound as bound  # noqa: E402
import accuracy_imfit as aim  # noqa: E402
import accuracy_scoring as sc  # noqa: E402
from accuracy_sim import simulate, tile_populations  # noqa: E402

from dre_hpc.fit.tiles import FIT_LOG  # noqa: E402

MARGIN = 80
#: Label (``Summary_<label>``, ``dre <label>``) of the second pass: ``make_cuts --neighbours`` from
#: the sersic fit, then ``dre -m sersic`` on those cuts.
SECOND = "sersic2"
#: Tables first: the refined fits of both passes beside PyImfit.
#: accuracy_bound's pixel sets -> fitter names.
BOUNDS = {"mask": "bound (fit mask)", "mask, sky free": "bound (mask, free sky)", "stamp": "bound (stamp)"}
ORDER = ("dre sersic2 refined", "dre sersic refined", "pyimfit", *BOUNDS.values(), "dre sersic2", "dre sersic")
MATCH_RADIUS = 2.0
#: Column mapping of dre's summary: parameter -> (value column, its space, interval centre, error).
#: Space 'log10': the column holds log10 of the canonical value (px for the radius).
DRE_COLUMNS = {"radius": ("LOGR", "log10", "LOGR_MEAN", "LOGR_ERR"),
               "flux": ("FLUX", "linear", "FLUX", "FLUX_ERR"),
               "b/a": ("AX_RATIO", "linear", "AX_RATIO_MEAN", "AX_RATIO_ERR"),
               "n": ("INDEX", "linear", "INDEX_MEAN", "INDEX_ERR"),
               "angle": ("ANGLE", "linear", "ANGLE_MEAN", "ANGLE_ERR")}
#: Sub-grid refinement, scored as '<cube> refined' where the summary has any of these columns
#: (a parameter without its own column keeps DRE_COLUMNS'). Adding a column is one line.
FIT_COLUMNS = {"radius": ("LOGR_FIT", "log10", "LOGR_FIT", "LOGR_FIT_ERR"),
               "flux": ("FLUX_FIT", "linear", "FLUX_FIT", "FLUX_FIT_ERR"),
               "b/a": ("AX_RATIO_FIT", "linear", "AX_RATIO_FIT", "AX_RATIO_FIT_ERR"),
               "n": ("INDEX_FIT", "linear", "INDEX_FIT", "INDEX_FIT_ERR"),
               "angle": ("ANGLE_FIT", "linear", "ANGLE_FIT", "ANGLE_FIT_ERR")}
UNITS = {"radius": "r_fit/r_true - 1 (major-axis r_e)", "flux": "F_fit/F_true - 1",
         "b/a": "q_fit - q_true", "n": "log10(n_fit/n_true)",
         "angle": "degrees, wrapped to [-90, 90), true b/a < 0.7; outlier: > 45 deg"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smaller tiles (1000 px, 110 target galaxies each)")
    p.add_argument("--workdir", help="keep tiles and products here (reused when the tiles match); "
                   "default: a temporary directory, removed")
    p.add_argument("--json", help="write every number to this JSON file")
    p.add_argument("--seed", type=int, default=16, help="seed of the first tile (the second: +1) [16]")
    p.add_argument("--jobs", type=int, default=2, help="processes for the PyImfit fits [2]")
    p.add_argument("--cpu", type=int, default=1, help="dre --cpu [1]")
    p.add_argument("--no-bulge", action="store_true", help="skip the default n = 4 cube")
    p.add_argument("--no-imfit", action="store_true", help="skip PyImfit")
    p.add_argument("--centroids", action="store_true", help="make_cuts --centroids (XWIN_IMAGE)")
    p.add_argument("--one-pass", action="store_true", help="skip the second pass (make_cuts --neighbours "
                   "from the sersic fit, then dre -m sersic again)")
    p.add_argument("--bound", action="store_true", help="also score the Cramer-Rao bound of each galaxy "
                   "(accuracy_bound.py: GalSim, about 1 s per galaxy over --jobs processes)")
    return p.parse_args(argv)


def check_tools(args) -> dict:
    """Paths of the project's commands beside this interpreter; a clear exit if a tool is missing."""
    bindir = Path(sys.executable).parent
    cmds = {name: bindir / name for name in ("sex_dre", "psfex_dre", "make_cuts", "dre")}
    missing = [str(p) for p in cmds.values() if not p.is_file()]
    if missing:
        raise SystemExit(f"bench_accuracy: missing {', '.join(missing)}: pip install -e '.[test,bench]'")
    from dre_hpc.errors import DreError
    from dre_hpc.preprocess.tools import find_tool
    for kind in ("sextractor", "psfex"):
        try:
            find_tool(kind)
        except DreError as exc:
            raise SystemExit(f"bench_accuracy: {exc}") from None
    try:
        import galsim  # noqa: F401
    except ImportError:
        raise SystemExit("bench_accuracy: GalSim missing: pip install -e '.[sim]'") from None
    return {k: str(v) for k, v in cmds.items()}


def run(cmd: list, label: str) -> tuple:
    """Run one command; exit with its stderr if it fails. Returns (seconds, stderr)."""
    import subprocess
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"bench_accuracy: {label} failed (exit {proc.returncode}): {' '.join(cmd)}\n"
                         f"{proc.stderr[-3000:]}")
    print(f"  {label:22s} {seconds:7.1f} s", flush=True)
    return seconds, proc.stderr


def make_tiles(args, work: Path) -> list:
    pops = tile_populations(args.quick, args.seed)
    names = [f"acc_{p.psf}" for p in pops]
    stamp = work / "sim.json"
    want = [repr(p) for p in pops]
    tiles = [work / "Tiles" / f"{n}.fits" for n in names]
    if stamp.is_file() and json.loads(stamp.read_text()) == want and all(t.is_file() for t in tiles):
        print(f"(1) tiles: reusing {work / 'Tiles'}")
        return list(zip(names, pops))
    if (work / "Tiles").exists():
        shutil.rmtree(work / "Tiles")
    for name, pop in zip(names, pops):
        start = time.perf_counter()
        simulate(pop, work / "Tiles" / f"{name}.fits", work / "Truth" / f"{name}_truth.fits")
        print(f"(1) simulated {name}: {pop.size}x{pop.size} px, {pop.n_targets} targets, {pop.n_faint} faint, "
              f"{pop.n_stars} stars, {pop.psf} PSF: {time.perf_counter() - start:.1f} s", flush=True)
    stamp.write_text(json.dumps(want))
    return list(zip(names, pops))


def workflow(args, cmds, work: Path, cubes: list) -> dict:
    """sex_dre, psfex_dre, make_cuts, then dre per cube. Returns {cube: timing}."""
    d = {k: str(work / k) for k in ("Tiles", "Sextracted", "PSF", "Cuts")}
    for k in ("Sextracted", "PSF", "Cuts"):
        shutil.rmtree(d[k], ignore_errors=True)
    print("(2) tile workflow")
    run([cmds["sex_dre"], "-i", d["Tiles"], "-o", d["Sextracted"]], "sex_dre")
    run([cmds["psfex_dre"], "-i", d["Sextracted"], "-o", d["PSF"]], "psfex_dre")
    run([cmds["make_cuts"], "-i", d["Tiles"], "-s", d["Sextracted"], "-o", d["Cuts"], "--margin", str(MARGIN)]
        + (["--centroids"] if args.centroids else []), "make_cuts")
    timing = {cube: fit(cmds, work, cube, cube, d["Cuts"], d, args.cpu) for cube in cubes}
    if not args.one_pass:
        cuts2 = str(work / "Cuts_2")
        shutil.rmtree(cuts2, ignore_errors=True)
        wall, _ = run([cmds["make_cuts"], "-i", d["Tiles"], "-s", d["Sextracted"], "-o", cuts2,
                       "--margin", str(MARGIN), "--neighbours", str(work / "Summary_sersic"), "--psf", d["PSF"]]
                      + (["--centroids"] if args.centroids else []), "make_cuts --neighbours")
        second = fit(cmds, work, SECOND, "sersic", cuts2, d, args.cpu)
        first = timing["sersic"]     # both passes' fits and the second cuts count in the speed
        second.update(fit_s=second["fit_s"] + first["fit_s"] + wall / args.cpu,
                      wall_s=second["wall_s"] + first["wall_s"] + wall, recut_s=wall)
        timing[SECOND] = second
    return timing


def fit(cmds, work: Path, label: str, cube: str, cuts: str, d: dict, cpu: int) -> dict:
    """``dre -m cube`` on `cuts` into ``Summary_<label>``; its timing from dre's log."""
    out = work / f"Summary_{label}"
    shutil.rmtree(out, ignore_errors=True)
    wall, err = run([cmds["dre"], "-m", cube, "-i", cuts, "--psf", d["PSF"], "-o", str(out),
                     "--chi", str(work / f"Chi_{label}"), "--catalogs", d["Sextracted"],
                     "--compression", "none", "--cpu", str(cpu)], f"dre -m {cube} ({label})")
    fits_ = [(int(n), float(s), float(m)) for n, s, m in FIT_LOG.findall(err)]
    return {"wall_s": wall, "objects": sum(f[0] for f in fits_), "fit_s": sum(f[1] - f[2] for f in fits_),
            "models_s": sum(f[2] for f in fits_), "cpu": cpu}


def inside(truth, size):
    x, y = np.asarray(truth["X"]), np.asarray(truth["Y"])
    return (x > MARGIN) & (x < size - MARGIN) & (y > MARGIN) & (y < size - MARGIN)


def collect(work: Path, tiles: list, cubes: list) -> dict:
    """Per tile: the present targets' truth and, per cube, the matched summary row (or -1)."""
    from dre_hpc.sim.match import match_positions
    out = []
    for name, pop in tiles:
        truth = Table.read(work / "Truth" / f"{name}_truth.fits")
        present = np.nonzero((np.asarray(truth["POP"]).astype(str) == "target") & inside(truth, pop.size))[0]
        tile = {"name": name, "pop": pop, "truth": truth[present], "rows": {}, "summary": {}, "work": work}
        for cube in cubes:
            summ = Table.read(work / f"Summary_{cube}" / f"{name}_dre.fits")
            hit = match_positions(summ["X_IMAGE"], summ["Y_IMAGE"], truth["X"], truth["Y"], MATCH_RADIUS)
            row_of = np.full(len(truth), -1)
            row_of[hit[hit >= 0]] = np.nonzero(hit >= 0)[0]
            tile["rows"][cube], tile["summary"][cube] = row_of[present], summ
        out.append(tile)
    return out


def dre_estimates(tiles, cube, columns) -> tuple:
    """`Estimate` per parameter over all present targets (NaN where not matched) and the fitted mask."""
    values = {p: {"value": [], "centre": [], "err": []} for p in columns}
    fitted = []
    for tile in tiles:
        rows, summ = tile["rows"][cube], tile["summary"][cube]
        ok = rows >= 0
        for param, (col, space, ccol, ecol) in columns.items():
            for key, c in (("value", col), ("centre", ccol), ("err", ecol)):
                v = np.full(len(rows), np.nan)
                if c in summ.colnames:
                    v[ok] = np.asarray(summ[c], float)[rows[ok]]
                elif key == "value":
                    raise SystemExit(f"bench_accuracy: dre's summary has no column {c}")
                values[param][key].append(v if key != "value" or space == "linear" else 10.0 ** v)
        fitted.append(ok)
    est = {}
    for param, (col, space, ccol, ecol) in columns.items():
        has_err = all(c in tiles[0]["summary"][cube].colnames for c in (ccol, ecol))
        v = {k: np.concatenate(a) for k, a in values[param].items()}
        est[param] = sc.Estimate(v["value"], v["centre"] if has_err else None, v["err"] if has_err else None,
                                 space)
    finite = np.isfinite(est["radius"].value) & np.isfinite(est["flux"].value)
    return est, np.concatenate(fitted) & finite


def truth_arrays(tiles) -> dict:
    t = {c: np.concatenate([np.asarray(tile["truth"][c], float) for tile in tiles])
         for c in ("LOGR", "FLUX", "AX_RATIO", "INDEX", "ANGLE", "SNR")}
    return {"radius": 10.0 ** t["LOGR"], "flux": t["FLUX"], "b/a": t["AX_RATIO"], "n": t["INDEX"],
            "angle": t["ANGLE"], "snr": t["SNR"]}


def matched_targets(tiles, cube: str):
    """``(index, tile, k, row, cuts)`` for every present target that `cube`'s fit matched: its index
    over all tiles' present targets, its position `k` in its tile's truth, its `row` in the
    summary and in the tile's first cuts (`cuts`, read once per tile)."""
    from dre_hpc.io.cuts import read_cuts
    k0 = 0
    for tile in tiles:
        cuts = read_cuts(tile["work"] / "Cuts" / f"{tile['name']}_cuts.h5")
        summ, rows = tile["summary"][cube], tile["rows"][cube]
        if not np.array_equal(np.asarray(summ["NUMBER"]), cuts.objects["NUMBER"]):
            raise SystemExit(f"bench_accuracy: {tile['name']}: summary rows are not the cuts' order")
        for k, row in enumerate(rows):
            if row >= 0:
                yield k0 + k, tile, k, row, cuts
        k0 += len(rows)


def imfit_tasks(tiles, cube: str) -> list:
    """One task per present target matched by dre: its cutout, mask, rms, PSF and guess."""
    from dre_hpc.models.convolve import remove_pixel_response
    from dre_hpc.models.psf import read_psf
    tasks, psfs = [], {}
    for index, tile, _, row, cuts in matched_targets(tiles, cube):
        name = tile["name"]
        if name not in psfs:
            psfs[name] = remove_pixel_response(read_psf(tile["work"] / "PSF" / f"{name}.psf", ext_number=0))
        obj = cuts.objects[row]
        centre = (float(obj["X_IMAGE"]) - obj["X0"], float(obj["Y_IMAGE"]) - obj["Y0"])   # 1-based in the cut
        guess = aim.initial_guess(tile["summary"][cube][row], centre)
        tasks.append((index, cuts.data[row], cuts.mask[row], cuts.rms[row], psfs[name], guess))
    return tasks


def _imfit_task(task):
    index, data, mask, rms, psf, guess = task
    pyimfit, _ = aim.import_pyimfit()
    out, seconds = aim.fit_one(pyimfit, data, mask, rms, psf, guess)
    return index, out, seconds


def imfit_estimates(tasks, n_present, jobs) -> tuple:
    keys = ("r", "flux", "q", "n", "angle")
    res = {k: np.full(n_present, np.nan) for k in keys + tuple(k + "_err" for k in keys)}
    seconds, failed = 0.0, []
    with Pool(max(1, jobs)) as pool:
        for index, out, s in pool.imap_unordered(_imfit_task, tasks, chunksize=4):
            seconds += s
            for k in res:
                res[k][index] = out[k]
            if "error" in out:
                failed.append(out["error"])
    est = {"radius": sc.Estimate(res["r"], res["r"], res["r_err"]),
           "flux": sc.Estimate(res["flux"], res["flux"], res["flux_err"]),
           "b/a": sc.Estimate(res["q"], res["q"], res["q_err"]),
           "n": sc.Estimate(res["n"], res["n"], res["n_err"]),
           "angle": sc.Estimate(res["angle"], res["angle"], res["angle_err"])}
    fitted = np.isfinite(res["r"]) & np.isfinite(res["flux"])
    return est, fitted, {"objects": len(tasks), "fit_s": seconds, "failed": len(failed),
                         "failures": sorted(set(failed))[:5]}


def flagged_fraction(tiles, cube) -> float:
    flags = np.concatenate([np.asarray(t["summary"][cube]["FLAGS"])[t["rows"][cube][t["rows"][cube] >= 0]]
                            for t in tiles])
    return float(np.mean(flags != 0)) if flags.size else float("nan")


def score_dre(tiles, cubes, timing, truth) -> dict:
    """Scores of each cube's grid values, and of its refined ``<P>_FIT`` values where present."""
    scores = {}
    for cube in cubes:
        t = timing[cube]
        speed = {"speed": t["objects"] / (t["fit_s"] * t["cpu"]) if t["fit_s"] > 0 else None,
                 "speed_command": t["objects"] / (t["wall_s"] * t["cpu"])}
        est, fitted = dre_estimates(tiles, cube, DRE_COLUMNS)
        scores[f"dre {cube}"] = {"bins": sc.score_fitter(est, truth, fitted), **speed, "timing": t,
                                 "flagged": flagged_fraction(tiles, cube)}
        refined = {p: c for p, c in FIT_COLUMNS.items() if c[0] in tiles[0]["summary"][cube].colnames}
        if refined:
            est, fitted = dre_estimates(tiles, cube, {**DRE_COLUMNS, **refined})
            scores[f"dre {cube} refined"] = {"bins": sc.score_fitter(est, truth, fitted), **speed,
                                             "columns": sorted(c[0] for c in refined.values())}
    return scores


def score_imfit(tiles, truth, jobs) -> dict:
    print("(4) PyImfit on the same cutouts", flush=True)
    start = time.perf_counter()
    est, fitted, info = imfit_estimates(imfit_tasks(tiles, "sersic"), len(truth["snr"]), jobs)
    info["wall_s"] = time.perf_counter() - start
    print(f"  {info['objects']} fits, {info['failed']} failed, {info['wall_s']:.1f} s wall ({jobs} processes)",
          flush=True)
    return {"bins": sc.score_fitter(est, truth, fitted),
            "speed": info["objects"] / info["fit_s"] if info["fit_s"] > 0 else None,
            "speed_command": info["objects"] / (info["wall_s"] * max(1, jobs)), "timing": info}


def score_bound(tiles, truth, jobs) -> dict:
    """The Cramer-Rao bounds (``accuracy_bound``) of every target that dre's sersic fit matched, on its
    first cuts' mask (sky known or free) and on its whole stamp, scored as three fitters."""
    print("(4b) Cramer-Rao bounds from the truth", flush=True)
    start = time.perf_counter()
    tasks = []
    for index, tile, k, row, cuts in matched_targets(tiles, "sersic"):
        t = tile["truth"][k]
        truth_row = {c: float(t[c]) for c in ("X", "Y", "LOGR", "AX_RATIO", "INDEX", "ANGLE", "FLUX")}
        obj = cuts.objects[row]
        tasks.append((index, truth_row, (int(obj["X0"]), int(obj["Y0"])), np.asarray(cuts.mask[row], bool),
                      tile["pop"]))
    sigmas = {name: [None] * len(truth["snr"]) for name in BOUNDS}
    with Pool(max(1, jobs)) as pool:
        for index, out in pool.imap_unordered(bound.bound_task, tasks, chunksize=2):
            for name in sigmas:
                sigmas[name][index] = out[name]
    print(f"  {len(tasks)} galaxies, {time.perf_counter() - start:.1f} s wall ({jobs} processes)", flush=True)
    scores = {}
    for name, label in BOUNDS.items():
        est, pooled, fitted = bound.bound_estimates(sigmas[name], truth)
        scores[label] = {"bins": sc.score_fitter(est, pooled, fitted), "draws": bound.DRAWS}
    return scores


def report(args, tiles, truth, scores, extra) -> None:
    # the Sersic-index fits (grid, refined) beside PyImfit first, then the n = 4 cube
    names = sorted(scores, key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n))
    print(f"\n(5) {len(truth['snr'])} target galaxies inside the cut area of {len(tiles)} tiles "
          f"({', '.join(t['name'] for t in tiles)}); errors:")
    for i in range(0, len(names), 3):
        print(sc.format_tables(scores, names[i:i + 3], UNITS))
    for n in names:
        if "flagged" in scores[n]:
            print(f"{n}: {scores[n]['flagged']:.1%} of the fitted objects have FLAGS != 0 (scored anyway)")
    if "pyimfit" in extra:
        print(f"pyimfit: {extra['pyimfit']}")
    print("obj/s/core fit: dre: objects / (fit seconds of its log, less the time it took to convolve or "
          "map the models for each tile's PSF, x --cpu; sersic2: both passes' fits and make_cuts --neighbours); pyimfit: objects / summed L-M seconds (one "
          "thread per fit). all: objects / (wall x cores) of the whole dre command (cube load and "
          "convolutions included), of the PyImfit stage (its flux-error Jacobian included)")
    if args.json:
        doc = {"seed": args.seed, "quick": args.quick, "tiles": [t["name"] for t in tiles],
               "populations": [repr(t["pop"]) for t in tiles], "bins": [list(b) for b in sc.SNR_BINS],
               "units": UNITS, "scores": scores, **extra}
        Path(args.json).write_text(json.dumps(doc, indent=1, default=float))
        print(f"wrote {args.json}")


def main(argv=None) -> int:
    args = parse_args(argv)
    cmds = check_tools(args)
    pyimfit, why = (None, "skipped (--no-imfit)") if args.no_imfit else aim.import_pyimfit()
    if pyimfit is None:
        print(f"bench_accuracy: PyImfit column {why}", file=sys.stderr)
    tmp = None if args.workdir else tempfile.mkdtemp(prefix="bench_accuracy_")
    work = Path(args.workdir or tmp).resolve()
    work.mkdir(parents=True, exist_ok=True)
    cubes = ["sersic"] + ([] if args.no_bulge else ["bulge"])
    try:
        tiles = make_tiles(args, work)
        timing = workflow(args, cmds, work, cubes)
        tiles = collect(work, tiles, list(timing))
        truth = truth_arrays(tiles)
        scores = score_dre(tiles, list(timing), timing, truth)
        extra = {}
        if pyimfit is not None:
            scores["pyimfit"] = score_imfit(tiles, truth, args.jobs)
        else:
            extra["pyimfit"] = why
        if args.bound:
            scores.update(score_bound(tiles, truth, args.jobs))
        report(args, tiles, truth, scores, extra)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
