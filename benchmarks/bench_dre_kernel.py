#!/usr/bin/env python
"""Time and check the kernel of the original DRE statistic (`dre_hpc.fit.dre_kernel.dre_chi_t`).

    python benchmarks/bench_dre_kernel.py [--threads T] [--objects N] [--hi-objects M] [--repeat R]

One CPU core by default (BLAS threads set before NumPy is imported). The model matrix is the
default cube's unique models convolved with the simulated Moffat PSF (``--remove-pixel-response``:
its pixel response removed first, as `NodeModels.for_psf` does), pixel-major (P, K) float32 with
the rows in radial order (stable argsort of the distance from the stamp centre). Two sets of simulated cutouts
(`dre_hpc.sim.cutouts.simulate_cutouts`) give each object's data, rms and usable pixels (mask,
finite data, rms > 0) in that order:

* ``realistic``: ``SimSpec(n_objects=N, seed=2026)``, S/N 50-200 (masks of a few hundred pixels);
* ``high S/N``: ``SimSpec(n_objects=M, seed=7, snr=(3e3, 3e4))``, peak pixels up to ~1e4 x rms
  and masks up to the whole stamp.

For each set it prints ms/object and ns per (pixel, model) term of the previous kernel (copied
below as `old_dre_chi_t`) and of the current one (given the per-row model minimum, as a caller
that keeps the matrix does, and without it), how many best models (argmin over k) agree with a
float64 NumPy reference of the formula and with the previous kernel, and the largest relative chi
difference from the reference. ``--variants`` adds the algebraic three-pass form
``chi = (sum_S (d + v)^2 / (s m + v) - sum_S (d + v)) / S`` in float32, to show why the kernel does
not use it (it loses the digits). Timings are the best of ``--repeat`` runs; other processes on
the machine make them noisy (``--clock cpu`` measures this thread's CPU time instead of wall time).
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=None, help="BLAS threads [1: one core]")
    p.add_argument("--objects", type=int, default=64, help="realistic cutouts [64]")
    p.add_argument("--hi-objects", type=int, default=16, help="high S/N cutouts [16]; 0: none")
    p.add_argument("--repeat", type=int, default=3, help="timed repetitions, the best is kept [3]")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall", help="timer [wall]")
    p.add_argument("--variants", action="store_true", help="also the rejected algebraic variant")
    p.add_argument("--remove-pixel-response", action="store_true",
                   help="convolve with the PSF's pixel response removed first, as NodeModels.for_psf does")
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

from dre_hpc.fit import dre_kernel  # noqa: E402
from dre_hpc.models.convolve import convolve_cube, remove_pixel_response  # noqa: E402
from dre_hpc.models.generate import load_default_cube  # noqa: E402
from dre_hpc.sim.cutouts import SimSpec, simulate_cutouts  # noqa: E402


def log(msg=""):
    print(msg, flush=True)


# -- inputs ------------------------------------------------------------------------------------------

def radial_order(boxsize):
    """Flat stamp indices by distance from the centre pixel (B // 2, B // 2), stable."""
    c = boxsize // 2
    y, x = np.indices((boxsize, boxsize))
    return np.argsort(np.hypot(y - c, x - c).ravel(), kind="stable")


def model_matrix(psf, sharpen=False):
    """(P, K) float32 C-contiguous: the unique convolved models, rows in radial order."""
    cube, grid = load_default_cube()
    representatives, _ = grid.unique_models()
    b = grid.boxsize
    stamps = np.asarray(cube, dtype=np.float32).reshape(-1, b, b)[representatives]
    conv = convolve_cube(stamps, remove_pixel_response(psf) if sharpen else psf)
    order = radial_order(b)
    return np.ascontiguousarray(conv.reshape(len(conv), -1)[:, order].T), order


def objects(cuts, order):
    """[(data, rms, pixels)] per cutout: flat arrays in radial order, usable pixels ascending."""
    out = []
    for data, rms, mask in zip(cuts.data, cuts.rms, cuts.mask):
        d = np.ascontiguousarray(data.ravel()[order], dtype=np.float32)
        r = np.ascontiguousarray(rms.ravel()[order], dtype=np.float32)
        usable = mask.ravel()[order] & np.isfinite(d) & np.isfinite(r) & (r > 0)
        out.append((d, r, np.flatnonzero(usable)))
    return out


# -- the kernels -------------------------------------------------------------------------------------

def reference(data, rms, pixels, models_t):
    """float64 NumPy reference of the formula: nanmean over S of the terms; NaN if none finite."""
    d = data[pixels].astype(np.float64)
    v = rms[pixels].astype(np.float64) ** 2
    m = models_t[pixels].astype(np.float64)
    with np.errstate(all="ignore"):
        s = d.sum() / m.sum(axis=0)
        u = s * m
        terms = (d[:, None] - u) ** 2 / (u + v[:, None])
        finite = np.isfinite(terms)
        count = finite.sum(axis=0)
        chi = np.where(count > 0, np.where(finite, terms, 0).sum(axis=0) / np.maximum(count, 1), np.nan)
    return chi, s


def ill_conditioned(data, rms, pixels, models_t, scale):
    """(K,) bool: s m < -rms^2 / 2 on some pixel of S (float32 rounding of s m amplified > 3x)."""
    v = rms[pixels].astype(np.float64) ** 2
    u = models_t[pixels].astype(np.float64) * scale
    return (u < -0.5 * v[:, None]).any(axis=0)


OLD_BLOCK_BYTES = 256 * 1024
OLD_GATHER_BYTES = 24 * 1024 * 1024


def old_dre_chi_t(data, rms, pixels, models_t):
    """The previous kernel (NumPy path), for comparison: gather the S rows of the (P, K) matrix,
    then per L2-sized block u = s m; r = (d - u)^2; u += rms^2; r /= u; column sums."""
    n_pix, n_models = int(pixels.shape[0]), int(models_t.shape[1])
    f32, f64 = np.float32, np.float64
    d = data[pixels].astype(f32, copy=False)
    var = rms[pixels].astype(f32, copy=False)
    var = var * var
    if n_pix == 0:
        return np.full(n_models, np.nan, dtype=f32), np.full(n_models, np.nan, dtype=f32)
    rows = min(max(8, OLD_BLOCK_BYTES // (4 * max(n_models, 1))), n_pix)
    whole = n_pix * n_models * 4 <= OLD_GATHER_BYTES
    gathered = np.empty((n_pix if whole else rows, n_models), dtype=f32)
    res = np.empty((rows, n_models), dtype=f32)
    part = np.empty(n_models, dtype=f32)
    acc = np.zeros(n_models, dtype=f64)
    starts = range(0, n_pix, rows)
    if whole:
        np.take(models_t, pixels, axis=0, out=gathered, mode="clip")

    def block(i, j):
        if whole:
            return gathered[i:j]
        g = gathered[: j - i]
        np.take(models_t, pixels[i:j], axis=0, out=g, mode="clip")
        return g

    with np.errstate(all="ignore"):
        for i in starts:
            j = min(i + rows, n_pix)
            block(i, j).sum(axis=0, out=part)
            acc += part
        scale = (d.sum(dtype=f64) / acc).astype(f32)
        acc[...] = 0
        for i in starts:
            j = min(i + rows, n_pix)
            g, r = block(i, j), res[: j - i]
            np.multiply(g, scale[None, :], out=g)
            np.subtract(d[i:j, None], g, out=r)
            np.multiply(r, r, out=r)
            np.add(g, var[i:j, None], out=g)
            np.divide(r, g, out=r)
            r.sum(axis=0, out=part)
            acc += part
        chi = acc / n_pix
        bad = np.flatnonzero(~np.isfinite(chi))
        if bad.size:
            m = models_t[pixels[:, None], bad[None, :]].astype(f64)
            u = m * scale[bad].astype(f64)[None, :]
            terms = (d.astype(f64)[:, None] - u) ** 2 / (u + var.astype(f64)[:, None])
            finite = np.isfinite(terms)
            count = finite.sum(axis=0)
            chi[bad] = np.where(count > 0, np.where(finite, terms, 0).sum(axis=0) / np.maximum(count, 1), np.nan)
    return chi.astype(f32), scale


def algebraic_dre_chi_t(data, rms, pixels, models_t, rows=32):
    """Rejected variant: with w = s m + v and a = d + v, sum_S (d - s m)^2 / w = sum_S a^2 / w - sum_S a
    (sum_S s m = sum_S d): three float32 passes and a matrix-vector product, no residual formed."""
    n_pix = int(pixels.shape[0])
    d = data[pixels].astype(np.float32)
    v = rms[pixels].astype(np.float32) ** 2
    a = d + v
    c = a * a
    g = np.take(models_t, pixels, axis=0)
    with np.errstate(all="ignore"):
        total = sum(np.ones(min(rows, n_pix - i), np.float32) @ g[i:i + rows] for i in range(0, n_pix, rows))
        scale = (d.sum(dtype=np.float64) / np.asarray(total, dtype=np.float64)).astype(np.float32)
        acc = np.zeros(g.shape[1])
        for i in range(0, n_pix, rows):
            w = g[i:i + rows] * scale
            w += v[i:i + rows, None]
            np.reciprocal(w, out=w)
            acc += c[i:i + rows] @ w
        chi = (acc - a.sum(dtype=np.float64)) / n_pix
    return chi.astype(np.float32), scale


# -- measurement -------------------------------------------------------------------------------------

def clock():
    return time.thread_time() if ARGS is not None and ARGS.clock == "cpu" else time.perf_counter()


def timed(kernels, objs, repeat):
    """Best seconds per object of each kernel over all objects; the kernels interleaved per run."""
    best = {name: np.inf for name in kernels}
    for fn in kernels.values():                      # warm-up (first touch of the matrix rows)
        fn(*objs[0])
    for _ in range(max(1, repeat)):
        for name, fn in kernels.items():
            t = clock()
            for o in objs:
                fn(*o)
            best[name] = min(best[name], (clock() - t) / len(objs))
    return best


def best_model(chi):
    return int(np.argmin(np.where(np.isfinite(chi), chi, np.inf)))


def agreement(fn, objs, refs):
    """(same best model as the reference: count, the largest relative chi difference, results)."""
    same, worst, results = 0, 0.0, []
    for o, (chi_ref, _) in zip(objs, refs):
        chi, scale = fn(*o)
        results.append(chi)
        finite = np.isfinite(chi_ref)
        if not np.array_equal(finite, np.isfinite(chi)):
            worst = np.inf
        if finite.any():
            rel = np.abs(chi[finite].astype(np.float64) - chi_ref[finite]) / np.abs(chi_ref[finite])
            worst = max(worst, float(rel.max()))
            same += int(best_model(chi) == best_model(chi_ref))
    return same, worst, results


def report(label, objs, models_t, row_min, repeat, variants):
    n_models = models_t.shape[1]
    sizes = np.array([o[2].size for o in objs])
    prefix = np.array([o[2][-1] + 1 if o[2].size else 0 for o in objs])
    log(f"\n{label}: {len(objs)} objects, S mean {sizes.mean():.0f} (min {sizes.min()}, max {sizes.max()}), "
        f"prefix n / S mean {np.mean(prefix / np.maximum(sizes, 1)):.2f}")
    kernels = {
        "old": lambda d, r, p: old_dre_chi_t(d, r, p, models_t),
        "new": lambda d, r, p: dre_kernel.dre_chi_t(np, d, r, p, models_t, row_min=row_min),
        "new, no row_min": lambda d, r, p: dre_kernel.dre_chi_t(np, d, r, p, models_t),
    }
    if variants:
        kernels["algebraic (rejected)"] = lambda d, r, p: algebraic_dre_chi_t(d, r, p, models_t)
    seconds = timed(kernels, objs, repeat)
    refs = [reference(*o, models_t) for o in objs]
    ill = [int(np.sum(ill_conditioned(*o, models_t, s))) for o, (_, s) in zip(objs, refs)]
    log(f"  models with an ill-conditioned denominator (s m < -rms^2 / 2 on a pixel of S): "
        f"{sum(ill)} in {sum(i > 0 for i in ill)} objects")
    terms = float(sizes.mean()) * n_models
    checks = {name: agreement(fn, objs, refs) for name, fn in kernels.items()}
    old_choice = [best_model(c) for c in checks["old"][2]]
    for name, sec in seconds.items():
        same, worst, results = checks[name]
        vs_old = sum(int(best_model(c) == o) for c, o in zip(results, old_choice))
        log(f"  {name:22s} {1e3 * sec:7.3f} ms/object  {1e9 * sec / terms:5.3f} ns/term  "
            f"x{seconds['old'] / sec:4.2f}   best model = reference {same}/{len(objs)}, = old {vs_old}/{len(objs)}   "
            f"max |chi - ref| / ref {worst:.1e}")
    return seconds["new"] / terms


def main(args):
    log(f"threads: {args.threads or 1}, numpy {np.__version__}")
    t = time.perf_counter()
    cuts, _, psf = simulate_cutouts(SimSpec(n_objects=args.objects, seed=2026))
    hi = simulate_cutouts(SimSpec(n_objects=args.hi_objects, seed=7, snr=(3e3, 3e4)))[0] if args.hi_objects else None
    models_t, order = model_matrix(psf, args.remove_pixel_response)
    t_build = time.perf_counter() - t
    t = time.perf_counter()
    row_min = dre_kernel.model_row_min(np, models_t)
    t_min = time.perf_counter() - t
    n_pix, n_models = models_t.shape
    log(f"model matrix ({n_pix}, {n_models}) float32, rows in radial order; inputs {t_build:.1f} s; "
        f"model_row_min {1e3 * t_min:.0f} ms (once per matrix); negative model values "
        f"{np.mean(models_t < 0):.1%}")
    per_term = report("realistic (S/N 50-200)", objects(cuts, order), models_t, row_min, args.repeat, args.variants)
    if hi is not None:
        sub = objects(hi, order)
        peak = [float(np.max(d[p] / r[p])) for d, r, p in sub]
        log(f"\n(high S/N: peak data / rms {min(peak):.0f} - {max(peak):.0f})")
        report("high S/N (3e3-3e4)", sub, models_t, row_min, args.repeat, args.variants)
    log(f"\nnew kernel at S = 500, K = {n_models}: about {1e3 * per_term * 500 * n_models:.3f} ms/object "
        f"(the realistic set's ns/term)")
    return 0


if __name__ == "__main__":
    sys.exit(main(ARGS))
