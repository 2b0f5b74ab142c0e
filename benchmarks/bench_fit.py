#!/usr/bin/env python
"""Fit throughput of dre_hpc against the hardware limits and the original DRE code.

    python benchmarks/bench_fit.py [--objects N] [--threads T] [--index-cube sersic|PATH|none]
                                   [--command-objects M] [--backend cpu|gpu]

One CPU core by default (BLAS and FFT threads set before NumPy is imported). The default model
cube is convolved with a simulated Moffat PSF; B simulated cutouts (de Vaucouleurs galaxies, S/N
50-200, masks from the simulation) are tiled to N objects. Every limit is measured in the same run:

(a)  the float32 matrix-product rate (GFLOP/s) of two (N x P) @ (P x K) products over the whole
     stamp (what ``wls`` needs), and from it two limits in objects/s: the *full-stamp* limit and
     the *own-mask* limit, ``sum_i 4 * npix_i * K`` flops (each object's usable pixels only);
(b)  ``wls``, default cube, through the fit path (`fit_cutouts`): objects/s, its fraction of the
     own-mask limit, and a per-stage breakdown (ms/object);
(b2) ``wls`` on cutouts whose masks fill the stamp: its fraction of the full-stamp limit;
(c)  a per-object NumPy version of the original DRE statistic (float64 cube, boolean mask,
     nansum/nanmean), on --compare objects;
(d)  ``--statistic dre``: objects/s and its speed-up over (c); (e) whether it chooses the same
     models as (c) (no centring, like the original) and chi agrees to float32 precision;
(f)  ``wls`` with a Sersic-index axis (the ``sersic`` preset, or --index-cube FILE): objects/s and
     its own-mask limit;
(g)  the whole ``dre`` command on a stacked cuts file of --command-objects objects (cube read,
     convolution, reading, fitting, writing the Summary and chi files), with and without its
     one-time costs; (h) the same on large-mask galaxies beside the original per-object algorithm;
plus peak memory and a PASS/FAIL table against the targets of issue 15.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

TARGETS = {"wls_rate": 3000.0, "wls_own_mask": 0.30, "wls_full_stamp": 0.80, "dre_rate": 1000.0,
           "index_rate": 300.0, "command_rate": 2000.0, "command_vs_original": 50.0}
CHI_RTOL = 1e-5                 # (e): float32 precision, a few tens of ulps


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--objects", type=int, default=2048, help="objects fitted in (a), (b), (d) [2048]")
    p.add_argument("--threads", type=int, default=None, help="BLAS/FFT threads [1: one core]")
    p.add_argument("--compare", type=int, default=20, help="objects of the original-code baseline (c) [20]")
    p.add_argument("--base", type=int, default=64, help="distinct simulated cutouts, tiled to --objects [64]")
    p.add_argument("--batch-size", type=int, default=None, help="FitOptions.batch_size [FitOptions default]")
    p.add_argument("--repeat", type=int, default=2, help="timed repetitions, the best is kept [2]")
    p.add_argument("--index-cube", default="sersic", help="cube with an index axis for (f): 'sersic' "
                   "(the preset, generated into the cache on first use), a FITS file, or 'none' [sersic]")
    p.add_argument("--index-objects", type=int, default=512, help="objects fitted in (f) [512]")
    p.add_argument("--command-objects", type=int, default=10000, help="objects of the dre command run (g) [10000]")
    p.add_argument("--large-objects", type=int, default=600, help="large-mask objects of (h) [600]")
    p.add_argument("--backend", default="cpu", choices=("cpu", "gpu"), help="fit backend [cpu]")
    p.add_argument("--skip", nargs="*", default=[], choices=("dre", "index", "command"),
                   help="parts to leave out")
    p.add_argument("--seed", type=int, default=2026)
    p.add_argument("--cache", default=None, help="DRE_HPC_CACHE directory [environment / default]")
    return p.parse_args(argv)


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None:
    _threads = str(ARGS.threads or 1)
    for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS",
                 "NUMEXPR_NUM_THREADS", "VECLIB_MAXIMUM_THREADS"):
        os.environ[_var] = _threads
    if ARGS.cache:
        os.environ["DRE_HPC_CACHE"] = ARGS.cache

import numpy as np  # noqa: E402  (after the thread settings)

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

from dre_hpc.fit import engine  # noqa: E402
from dre_hpc.fit.engine import FitOptions, fit_cutouts  # noqa: E402
from dre_hpc.fit.model_matrix import NodeModels  # noqa: E402
from dre_hpc.models.cube_io import read_cube  # noqa: E402
from dre_hpc.models.generate import default_cube_path, ensure_default_cube  # noqa: E402
from dre_hpc.sim.cutouts import SimSpec, simulate_cutouts  # noqa: E402


def log(msg=""):
    print(msg, flush=True)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Profiler:
    """Time spent inside some engine functions, by wrapping them in the engine's namespace."""

    NAMES = ("clean_cutouts", "footprint_extent", "centre_cutouts", "centred_rows", "wls_chi2", "recheck_wls",
             "dre_chi_one", "window_products", "refine", "summarize", "posterior_weights")

    def __init__(self):
        self.saved, self.seconds = {}, {}

    def __enter__(self):
        for name in self.NAMES:
            fn = getattr(engine, name, None)
            if callable(fn):
                self.saved[name] = fn
                setattr(engine, name, self._wrap(name, fn))
        return self

    def _wrap(self, name, fn):
        def timed(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t
        return timed

    def __exit__(self, *exc):
        for name, fn in self.saved.items():
            setattr(engine, name, fn)
        return False

    def report(self, total, n):
        """One line: milliseconds per object in each wrapped function and in the rest."""
        parts = [f"{name} {1e3 * self.seconds[name] / n:.3f}" for name in self.NAMES if name in self.seconds]
        parts.append(f"total {1e3 * total / n:.3f}")
        return "ms/object: " + ", ".join(parts)


def timed_fit(mm, cuts, options, repeat):
    """Best of `repeat` runs of fit_cutouts after a warm-up: (seconds, profiler of that run, results)."""
    fit_cutouts(mm, cuts.subset(np.arange(min(8, len(cuts)))), options)
    best, prof, res = np.inf, None, None
    for _ in range(max(1, repeat)):
        with Profiler() as p:
            t = time.perf_counter()
            res = fit_cutouts(mm, cuts, options)
            sec = time.perf_counter() - t
        if sec < best:
            best, prof = sec, p
    return best, prof, res


def original_dre_chi(models64, data, rms, mask):
    """The original DRE statistic of one object, as the original code computed it (float64, (K, B, B))."""
    models = models64[..., mask]                      # (K, S) boolean-mask gather of the float cube
    d = data[mask]
    r = rms[mask]
    scale = np.nansum(d) / np.sum(models, axis=-1)
    sm = scale[:, None] * models
    residual = (d - sm) ** 2 / (sm + r ** 2)
    return np.nanmean(residual, axis=-1), scale


def original_rate(mm, cuts, n, repeat):
    """Objects/s of the original algorithm on the first `n` cutouts; also its chi (n, K)."""
    stamps = np.stack([mm.stamp(int(r)) for r in mm.representatives]).astype(np.float64)
    chi = np.empty((n, mm.n_models))
    best = np.inf
    for _ in range(max(1, repeat)):
        t = time.perf_counter()
        for i in range(n):
            chi[i], _ = original_dre_chi(stamps, cuts.data[i].astype(np.float64),
                                         cuts.rms[i].astype(np.float64), cuts.mask[i])
        best = min(best, time.perf_counter() - t)
    return n / best, chi


def gemm_rate(mm, n, repeat, rng):
    """GFLOP/s of the two float32 (N, P) @ (P, K) products of ``wls`` over the whole stamp."""
    xp = mm.xp
    a = xp.asarray(rng.standard_normal((n, mm.n_pixels), dtype=np.float32))
    b = xp.asarray(rng.random((n, mm.n_pixels), dtype=np.float32))
    best = np.inf
    for _ in range(max(1, repeat) + 1):
        t = time.perf_counter()
        x = a @ mm.models
        y = b @ mm.models_sq
        if xp is not np:
            xp.cuda.Stream.null.synchronize()
        best = min(best, time.perf_counter() - t)
        del x, y
    return 2 * (2.0 * n * mm.n_pixels * mm.n_models) / best / 1e9


def own_mask_limit(cuts, k, gflops):
    """Objects/s if the products ran over each object's own mask pixels only, at `gflops`."""
    npix = cuts.mask.reshape(len(cuts), -1).sum(axis=1)
    return len(cuts) / (4.0 * float(npix.sum()) * k / (gflops * 1e9))


def models_for(cube_path, psf, backend, threads):
    t = time.perf_counter()
    cube, grid = read_cube(cube_path)
    t_load = time.perf_counter() - t
    holder = NodeModels(None, lambda: (cube, grid, str(cube_path)), backend=backend, workers=threads)
    t = time.perf_counter()
    mm = holder.for_psf(psf)
    return mm, t_load, time.perf_counter() - t


def full_mask_cutouts(cuts):
    """The same galaxies with masks that fill the stamp (every pixel usable)."""
    big = cuts.subset(np.arange(len(cuts)))
    big.mask[...] = True
    return big


def tiled(cuts, n):
    """`n` objects cycling through `cuts`, each with its own NUMBER and name (as a tile's would be)."""
    from dre_hpc.io.cuts import object_name
    many = cuts.subset(np.arange(n) % len(cuts))
    many.objects["NUMBER"] = np.arange(1, n + 1)
    many.names = [object_name(int(e), int(k)) for e, k in zip(many.objects["EXT_NUMBER"], many.objects["NUMBER"])]
    return many


def run_command(cuts, psf, workdir: Path, extra=()):
    """Wall seconds of the whole ``dre`` command (in this process) on `cuts`."""
    from astropy.io import fits

    from dre_hpc.cli.dre import main as dre_main
    from dre_hpc.io.cuts import write_cuts
    workdir.mkdir(parents=True, exist_ok=True)
    write_cuts(workdir / "bench_cuts.h5", cuts, layout="stacked", compression="none")
    fits.PrimaryHDU(psf.astype(np.float32)).writeto(workdir / "psf.fits", overwrite=True)
    argv = ["-i", str(workdir / "bench_cuts.h5"), "--psf", str(workdir / "psf.fits"), "-o", str(workdir / "S"),
            "--chi", str(workdir / "C"), "--catalogs", str(workdir / "none"), "--compression", "none", *extra]
    t = time.perf_counter()
    code = dre_main(argv)
    if code != 0:
        raise SystemExit(f"dre exited with {code}")
    return time.perf_counter() - t


def main(args):
    threads = args.threads or 1
    log(f"dre_hpc fit benchmark: {args.objects} objects, {threads} thread(s), backend {args.backend}, "
        f"numpy {np.__version__}")
    rng = np.random.default_rng(args.seed)
    opt_kw = {} if args.batch_size is None else {"batch_size": args.batch_size}
    rows = []                                   # (name, objects/s, ratio text, target text, verdict)

    def verdict(ok):
        return "PASS" if ok else "FAIL"

    spec = SimSpec(n_objects=args.base, seed=args.seed)
    base_cuts, _, psf = simulate_cutouts(spec)
    cube_path = ensure_default_cube()
    mm, t_load, t_conv = models_for(cube_path, psf, args.backend, threads)
    log(f"default cube {default_cube_path().name}: grid {mm.grid.shape}, K = {mm.n_models} unique models, "
        f"P = {mm.n_pixels} pixels; cube read {t_load:.2f} s, convolution {t_conv:.2f} s; "
        f"peak RSS {peak_rss_mb():.0f} MB")
    n = args.objects
    cuts = base_cuts.subset(np.arange(n) % len(base_cuts))
    npix = cuts.mask.reshape(n, -1).sum(axis=1)
    log(f"mask pixels per object: median {np.median(npix):.0f}, range {npix.min()}-{npix.max()}")

    # (a) limits
    gflops = gemm_rate(mm, min(n, 1024), args.repeat, rng)
    full_limit = gflops * 1e9 / (4.0 * mm.n_pixels * mm.n_models)
    own_limit = own_mask_limit(cuts, mm.n_models, gflops)
    log(f"(a) float32 GEMM rate {gflops:.1f} GFLOP/s -> full-stamp limit {full_limit:.0f} objects/s, "
        f"own-mask limit {own_limit:.0f} objects/s")
    rows.append(("(a) full-stamp limit", full_limit, "", "", ""))
    rows.append(("(a) own-mask limit", own_limit, "", "", ""))

    # (b) wls
    t_wls, prof, _ = timed_fit(mm, cuts, FitOptions(statistic="wls", **opt_kw), args.repeat)
    rate = n / t_wls
    log(f"(b) wls: {rate:.0f} objects/s = {rate / own_limit:.0%} of the own-mask limit")
    log(f"    {prof.report(t_wls, n)}")
    rows.append(("(b) wls, default cube", rate, f"{rate / own_limit:.0%} of own-mask",
                 f">= {TARGETS['wls_rate']:.0f}/s, {TARGETS['wls_own_mask']:.0%}",
                 verdict(rate >= TARGETS["wls_rate"] and rate / own_limit >= TARGETS["wls_own_mask"])))
    big = full_mask_cutouts(cuts.subset(np.arange(min(n, 512))))
    t_big, prof, _ = timed_fit(mm, big, FitOptions(statistic="wls", **opt_kw), args.repeat)
    rate_big = len(big) / t_big
    log(f"(b2) wls, masks filling the stamp: {rate_big:.0f} objects/s = {rate_big / full_limit:.0%} of the "
        f"full-stamp limit")
    log(f"    {prof.report(t_big, len(big))}")
    rows.append(("(b2) wls, full-stamp masks", rate_big, f"{rate_big / full_limit:.0%} of full-stamp",
                 f">= {TARGETS['wls_full_stamp']:.0%}", verdict(rate_big / full_limit >= TARGETS["wls_full_stamp"])))

    # (c) original, (d) dre, (e) agreement
    m_cmp = min(args.compare, n)
    rate_orig, orig_chi = original_rate(mm, cuts, m_cmp, 1)
    log(f"(c) original statistic, per object (NumPy float64): {rate_orig:.1f} objects/s")
    rows.append(("(c) original DRE (NumPy f64)", rate_orig, "", "", ""))
    if "dre" not in args.skip:
        t_dre, prof, _ = timed_fit(mm, cuts, FitOptions(statistic="dre", **opt_kw), args.repeat)
        rate_dre = n / t_dre
        log(f"(d) dre: {rate_dre:.0f} objects/s = {rate_dre / rate_orig:.1f}x (c)")
        log(f"    {prof.report(t_dre, n)}")
        res = fit_cutouts(mm, cuts.subset(np.arange(m_cmp)), FitOptions(statistic="dre", centre=False, **opt_kw))
        best_fit = mm.inverse[np.ravel_multi_index(tuple(res["MODEL_IDX"].astype(np.int64).T), mm.grid.shape)]
        agree = float(np.mean(best_fit == np.nanargmin(orig_chi, axis=1)))
        chi_fit = res["SURFACE"][:, mm.representatives].astype(np.float64)
        both = np.isfinite(chi_fit) & np.isfinite(orig_chi)
        max_rel = float((np.abs(chi_fit - orig_chi) / np.maximum(np.abs(orig_chi), 1e-300))[both].max())
        same = agree == 1.0 and max_rel <= CHI_RTOL and np.array_equal(np.isfinite(chi_fit), np.isfinite(orig_chi))
        log(f"(e) dre without centring vs (c): same best model {agree:.0%}, max relative chi difference "
            f"{max_rel:.1e}")
        rows.append(("(d) dre statistic", rate_dre, f"{rate_dre / rate_orig:.0f}x (c)",
                     f">= {TARGETS['dre_rate']:.0f}/s", verdict(rate_dre >= TARGETS["dre_rate"])))
        rows.append(("(e) dre == original", None, f"best {agree:.0%}, chi {max_rel:.1e}",
                     f"100%, <= {CHI_RTOL:g}", verdict(same)))
    rss_default = peak_rss_mb()

    # (f) index axis
    rss_index = None
    if "index" not in args.skip and args.index_cube != "none":
        del mm
        from dre_hpc.models.generate import resolve_model
        t = time.perf_counter()
        index_path = resolve_model(args.index_cube)
        t_gen = time.perf_counter() - t
        imm, t_iload, t_iconv = models_for(index_path, psf, args.backend, threads)
        log(f"(f) index cube {Path(index_path).name}: grid {imm.grid.shape}, K = {imm.n_models}; resolved "
            f"{t_gen:.1f} s, read {t_iload:.1f} s, convolution {t_iconv:.1f} s")
        icuts = cuts.subset(np.arange(min(args.index_objects, n)))
        i_own = own_mask_limit(icuts, imm.n_models, gflops)
        t_idx, prof, _ = timed_fit(imm, icuts, FitOptions(statistic="wls", **opt_kw), 1)
        rate_idx = len(icuts) / t_idx
        log(f"    wls: {rate_idx:.0f} objects/s = {rate_idx / i_own:.0%} of its own-mask limit {i_own:.0f}")
        log(f"    {prof.report(t_idx, len(icuts))}")
        rows.append(("(f) wls, index axis", rate_idx, f"{rate_idx / i_own:.0%} of own-mask",
                     f">= {TARGETS['index_rate']:.0f}/s", verdict(rate_idx >= TARGETS["index_rate"])))
        rss_index = peak_rss_mb()
        del imm

    # (g) and (h): the whole dre command
    if "command" not in args.skip:
        with tempfile.TemporaryDirectory(prefix="dre_bench_") as tmp:
            big_n = args.command_objects
            many = tiled(base_cuts, big_n)
            wall = run_command(many, psf, Path(tmp) / "g", ["--backend", args.backend])
            rate_cmd = big_n / wall
            log(f"(g) dre command, {big_n} objects: {wall:.1f} s wall (cube read and convolution "
                f"included) = {rate_cmd:.0f} objects/s")
            rows.append(("(g) dre command, I/O included", rate_cmd, "", f">= {TARGETS['command_rate']:.0f}/s",
                         verdict(rate_cmd >= TARGETS["command_rate"])))
            large = full_mask_cutouts(tiled(base_cuts, args.large_objects))
            wall_l = run_command(large, psf, Path(tmp) / "h", ["--backend", args.backend])
            rate_l = len(large) / wall_l
            mm_l, _, _ = models_for(cube_path, psf, "cpu", threads)
            rate_orig_l, _ = original_rate(mm_l, large, min(args.compare, 10), 1)
            log(f"(h) dre command, {len(large)} galaxies with stamp-filling masks: {rate_l:.0f} objects/s; "
                f"original algorithm on them {rate_orig_l:.2f} objects/s: {rate_l / rate_orig_l:.0f}x")
            rows.append(("(h) dre command, large masks", rate_l, f"{rate_l / rate_orig_l:.0f}x original",
                         f">= {TARGETS['command_vs_original']:.0f}x",
                         verdict(rate_l / rate_orig_l >= TARGETS["command_vs_original"])))

    log()
    log(f"{'':32s} {'objects/s':>10s}  {'ratio':<22s} {'target':<18s} result")
    for name, value, ratio, target, result in rows:
        value_s = f"{value:10.1f}" if value is not None else f"{'':10s}"
        log(f"{name:32s} {value_s}  {ratio:<22s} {target:<18s} {result}")
    log(f"peak RSS: {rss_default:.0f} MB with the default cube"
        + (f", {rss_index:.0f} MB after the index cube" if rss_index else ""))
    ok = all(r[4] != "FAIL" for r in rows)
    log(f"overall: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(ARGS))
