#!/usr/bin/env python
"""Fit throughput of dre_hpc against the hardware limit and against the original DRE code.

    python benchmarks/bench_fit.py [--objects N] [--threads T] [--compare M] [--base B]

One CPU core by default (BLAS and scipy.fft threads set before NumPy is imported). The default
model cube (generated into the cache on first use) is convolved with a simulated Moffat PSF; B
simulated cutouts are tiled to N objects. Printed:

(a) the float32 matrix-product limit: two (N x P) @ (P x K) products (what ``wls`` needs);
(b) ``fit_cutouts(..., FitOptions(statistic='wls'))`` objects/s and its fraction of (a);
(c) a per-object NumPy version of the original DRE statistic (float64 cube, boolean mask,
    nansum/nanmean), on M objects;
(d) ``--statistic dre`` through ``fit_cutouts`` objects/s and its speed-up over (c);
(e) whether (c) and (d) choose the same best model, and the largest relative chi difference;
plus the one-time costs, a summary table and PASS/FAIL against the targets.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

TARGET_WLS_FRACTION = 0.50      # (b) / (a)
TARGET_DRE_SPEEDUP = 5.0        # (d) / (c)
CHI_RTOL = 1e-5                 # (e): float32 precision, a few tens of ulps


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--objects", type=int, default=1024, help="objects fitted in (a), (b), (d) [1024]")
    p.add_argument("--threads", type=int, default=None, help="BLAS/FFT threads [1: one core]")
    p.add_argument("--compare", type=int, default=20, help="objects of the original-code baseline (c) [20]")
    p.add_argument("--base", type=int, default=64, help="distinct simulated cutouts, tiled to --objects [64]")
    p.add_argument("--batch-size", type=int, default=None, help="FitOptions.batch_size [FitOptions default]")
    p.add_argument("--repeat", type=int, default=2, help="timed repetitions, the best is kept [2]")
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

from dre_hpc.fit.engine import FitOptions, fit_cutouts  # noqa: E402
from dre_hpc.fit.tiles import CubeModels  # noqa: E402
from dre_hpc.models.generate import default_cube_path, load_default_cube  # noqa: E402
from dre_hpc.sim.cutouts import SimSpec, simulate_cutouts  # noqa: E402


class Clock:
    def __init__(self):
        self.start = time.perf_counter()

    def __call__(self):
        return time.perf_counter() - self.start


def log(msg=""):
    print(msg, flush=True)


class Profiler:
    """Time spent inside some engine functions, by wrapping them in the engine's namespace."""

    NAMES = ("_prepare", "centre_cutouts", "wls_chi2", "recheck_wls", "dre_chi_one")

    def __init__(self):
        from dre_hpc.fit import engine
        self.engine, self.saved, self.seconds = engine, {}, {}

    def __enter__(self):
        for name in self.NAMES:
            fn = getattr(self.engine, name, None)
            if callable(fn):
                self.saved[name] = fn
                setattr(self.engine, name, self._wrap(name, fn))
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
            setattr(self.engine, name, fn)
        return False

    def report(self, total, n):
        """One line: milliseconds per object in each wrapped function and in the rest."""
        parts, inner = [], 0.0
        for name in self.NAMES:
            if name in self.seconds:
                sec = self.seconds[name]
                parts.append(f"{name} {1e3 * sec / n:.2f}")
                if name != "centre_cutouts":           # centring runs inside _prepare
                    inner += sec
        parts.append(f"rest {1e3 * (total - inner) / n:.2f}")
        return "ms/object: " + ", ".join(parts)


def timed_fit(mm, cuts, options, repeat):
    """Best of `repeat` runs of fit_cutouts: (seconds, profiler of that run)."""
    best, prof = np.inf, None
    for _ in range(max(1, repeat)):
        with Profiler() as p:
            t = Clock()
            fit_cutouts(mm, cuts, options)
            sec = t()
        if sec < best:
            best, prof = sec, p
    return best, prof


def original_dre_chi(models64, data, rms, mask):
    """The original DRE statistic of one object, as the original code computed it (float64)."""
    models = models64[..., mask]                      # (K, S) boolean-mask gather of the float cube
    d = data[mask]
    r = rms[mask]
    scale = np.nansum(d) / np.sum(models, axis=-1)
    sm = scale[:, None] * models
    residual = (d - sm) ** 2 / (sm + r ** 2)
    return np.nanmean(residual, axis=-1), scale


def matmul_limit(mm, n, repeat, rng):
    """Best time of the two (N, P) @ (P, K) float32 products of the wls statistic."""
    k, p = mm.models.shape
    a = rng.standard_normal((n, p), dtype=np.float32)
    b = rng.random((n, p), dtype=np.float32)
    models_t, models_sq_t = mm.models.T, (mm.models * mm.models).T
    best = np.inf
    for _ in range(max(1, repeat)):
        t = Clock()
        x = a @ models_t
        y = b @ models_sq_t
        best = min(best, t())
        del x, y
    flops = 2 * (2.0 * n * p * k)
    return best, flops


def main(args):
    threads = args.threads or 1
    log(f"dre_hpc fit benchmark: {args.objects} objects, {threads} thread(s), numpy {np.__version__}")
    log(f"cube cache: {default_cube_path()}")
    rng = np.random.default_rng(args.seed)

    # -- one-time costs ------------------------------------------------------------------
    t = Clock()
    cube, grid = load_default_cube()
    t_load = t()
    t = Clock()
    spec = SimSpec(n_objects=args.base, seed=args.seed)
    base_cuts, _, psf = simulate_cutouts(spec)
    t_sim = t()
    t = Clock()
    models = CubeModels(cube, grid, str(default_cube_path()), workers=threads)
    mm = models.for_psf(psf)
    t_conv = t()
    k, p = mm.models.shape
    log(f"grid {grid.shape} = {grid.size} cells, K = {k} unique models of P = {p} pixels")
    log(f"one-time: cube load {t_load:.2f} s, convolution of {k} models {t_conv:.2f} s "
        f"(simulating {args.base} cutouts {t_sim:.2f} s)")
    npix = base_cuts.mask.reshape(len(base_cuts), -1).sum(axis=1)
    log(f"mask pixels per object: median {np.median(npix):.0f}, range {npix.min()}-{npix.max()}")

    n = args.objects
    cuts = base_cuts.subset(np.arange(n) % len(base_cuts))
    opt_kw = {} if args.batch_size is None else {"batch_size": args.batch_size}

    # -- (a) matrix-product limit --------------------------------------------------------------
    t_mm, flops = matmul_limit(mm, n, args.repeat, rng)
    gflops = flops / t_mm / 1e9
    limit = n / t_mm
    log(f"(a) float32 2 x ({n} x {p}) @ ({p} x {k}): {t_mm:.3f} s, {gflops:.1f} GFLOP/s "
        f"-> limit {limit:.0f} objects/s")

    # -- (b) wls through fit_cutouts -------------------------------------------------------------
    wls = FitOptions(statistic="wls", **opt_kw)
    fit_cutouts(mm, cuts.subset(slice(0, min(8, n))), wls)          # warm-up (imports, first calls)
    t_wls, prof = timed_fit(mm, cuts, wls, args.repeat)
    rate_wls = n / t_wls
    log(f"(b) wls fit_cutouts: {t_wls:.3f} s, {rate_wls:.0f} objects/s = {rate_wls / limit:.0%} of (a)")
    log(f"    {prof.report(t_wls, n)}")

    # -- (c) the original statistic, per object in NumPy --------------------------------------------
    m_cmp = min(args.compare, n)
    t = Clock()
    cube64 = mm.host.astype(np.float64)          # the original cast the (convolved) cube to float
    t_cast = t()
    orig_chi = np.empty((m_cmp, k))
    t_orig = np.inf
    for _ in range(max(1, args.repeat)):
        t = Clock()
        for i in range(m_cmp):
            orig_chi[i], _ = original_dre_chi(cube64, cuts.data[i].astype(np.float64),
                                              cuts.rms[i].astype(np.float64), cuts.mask[i])
        t_orig = min(t_orig, t())
    rate_orig = m_cmp / t_orig
    del cube64
    log(f"(c) original statistic, per object (NumPy float64): {m_cmp} objects in {t_orig:.3f} s, "
        f"{rate_orig:.1f} objects/s (one-time float64 cast {t_cast:.2f} s)")

    # -- (d) dre through fit_cutouts ---------------------------------------------------------------
    from dre_hpc.fit.dre_kernel import transposed_models
    t = Clock()
    transposed_models(np, mm.models)
    t_transpose = t()
    dre = FitOptions(statistic="dre", **opt_kw)
    fit_cutouts(mm, cuts.subset(slice(0, min(8, n))), dre)          # warm-up
    t_dre, prof = timed_fit(mm, cuts, dre, args.repeat)
    rate_dre = n / t_dre
    log(f"(d) dre fit_cutouts: {t_dre:.3f} s, {rate_dre:.0f} objects/s = {rate_dre / rate_orig:.1f}x (c) "
        f"(one-time transposed model copy {t_transpose:.2f} s)")
    log(f"    {prof.report(t_dre, n)}")
    dre_raw = FitOptions(statistic="dre", centre=False, **opt_kw)
    t_dre0, prof = timed_fit(mm, cuts, dre_raw, args.repeat)
    rate_dre0 = n / t_dre0
    log(f"(d0) dre fit_cutouts without sub-pixel centring (the original's work): {t_dre0:.3f} s, "
        f"{rate_dre0:.0f} objects/s = {rate_dre0 / rate_orig:.1f}x (c)")
    log(f"    {prof.report(t_dre0, n)}")

    # -- (e) agreement, same inputs as the original (no sub-pixel centring) --------------------------
    t = Clock()
    res = fit_cutouts(mm, cuts.subset(slice(0, m_cmp)), dre_raw)
    t_raw = t()
    reps, inverse = grid.unique_models()
    best_fit = inverse[np.ravel_multi_index(tuple(res["MODEL_IDX"].astype(np.int64).T), grid.shape)]
    best_orig = np.nanargmin(orig_chi, axis=1)
    agree = float(np.mean(best_fit == best_orig))
    chi_fit = res["SURFACE"][:, reps].astype(np.float64)
    both = np.isfinite(chi_fit) & np.isfinite(orig_chi)
    rel = np.abs(chi_fit - orig_chi) / np.maximum(np.abs(orig_chi), 1e-300)
    max_rel = float(rel[both].max()) if both.any() else np.nan
    same_finite = bool(np.array_equal(np.isfinite(chi_fit), np.isfinite(orig_chi)))
    chi_ok = same_finite and max_rel <= CHI_RTOL
    log(f"(e) {m_cmp} objects without centring ({m_cmp / t_raw:.0f} objects/s): same best model "
        f"{agree:.1%}; max |chi - chi_orig| / chi_orig = {max_rel:.2e} over {both.sum()} values "
        f"(float32 precision: <= {CHI_RTOL:g}); finite patterns equal: {same_finite}")

    # -- summary ----------------------------------------------------------------------------------
    rows = [
        ("(a) float32 matmul limit", limit, "", ""),
        ("(b) wls fit_cutouts", rate_wls, f"{rate_wls / limit:.0%} of (a)",
         "PASS" if rate_wls / limit >= TARGET_WLS_FRACTION else "FAIL"),
        ("(c) original DRE (NumPy f64)", rate_orig, "", ""),
        ("(d) dre fit_cutouts", rate_dre, f"{rate_dre / rate_orig:.1f}x (c)",
         "PASS" if rate_dre / rate_orig >= TARGET_DRE_SPEEDUP else "FAIL"),
        ("(d0) dre, centre=False", rate_dre0, f"{rate_dre0 / rate_orig:.1f}x (c)", "(info)"),
        ("(e) dre == original", None, f"best {agree:.0%}, chi {max_rel:.1e}",
         "PASS" if agree == 1.0 and chi_ok else "FAIL"),
    ]
    log()
    log(f"{'':30s} {'objects/s':>10s}  {'ratio':<22s} {'target':<12s} result")
    targets = ["", f">= {TARGET_WLS_FRACTION:.0%}", "", f">= {TARGET_DRE_SPEEDUP:g}x", "",
               f"100%, <= {CHI_RTOL:g}"]
    for (name, rate, ratio, verdict), target in zip(rows, targets):
        rate_s = f"{rate:10.1f}" if rate is not None else f"{'':10s}"
        log(f"{name:30s} {rate_s}  {ratio:<22s} {target:<12s} {verdict}")
    log(f"one-time: cube load {t_load:.2f} s, convolution {t_conv:.2f} s, dre transposed copy {t_transpose:.2f} s")
    ok = all(r[3] != "FAIL" for r in rows)
    log(f"overall: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(ARGS))
