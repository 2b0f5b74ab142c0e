"""The batched fit: cutouts in, per-object catalogue columns and chi-square surfaces out.

One `ModelMatrix` holds the PSF-convolved unique models of a cube on the chosen backend,
once per process. `fit_cutouts` streams the objects through it in batches; a bad object gets
flags and fill values, never an exception.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from ..errors import DreError
from ..flags import UNFITTED, CutFlag, FitFlag
from .angle import polish
from .backend import to_host
from .centering import LANCZOS_ORDER, centre_cutouts, shift_nearest, variance_factor
from .chi2 import amplitude_error, dre_chi_one, recheck_wls, wls_chi2
from .compiled import use_compiled
from .gather import centred_rows, mask_extent
from .model_matrix import ModelMatrix
from .refine import refined_flux, window_cells
from .subgrid import (FIT_COLUMNS, background_variance, refine, refined_axes, second_minimum, window,
                      window_products)
from .summary import posterior_weights, summarize

STATISTICS = ("wls", "dre")
#: Largest group of objects sharing one pair of matrix products (see `product_groups`).
MAX_GROUP = 256
#: Fraction of its peak rate a float32 product (g, n) @ (n, K) reaches with g rows (OpenBLAS,
#: one core, measured for n ~ 1000, K ~ 2300) and the fixed cost of a group in seconds: the cost
#: model by which `product_groups` trades padding rows against small, slow products.
GEMM_EFFICIENCY = ((1, 0.05), (2, 0.1), (4, 0.25), (8, 0.44), (16, 0.59), (32, 0.68), (64, 0.75),
                   (128, 0.88), (256, 0.95))
GROUP_OVERHEAD_S = 2e-4
PEAK_FLOPS = 1e11
#: Pixels a Lanczos shift reads beyond its output, besides the integer part of the offset.
LANCZOS_MARGIN = LANCZOS_ORDER + 1
#: With no ``batch_size`` set, a batch holds about this many bytes per float64 (objects, grid
#: cells) array: the more objects a batch has, the closer the footprints that `product_groups`
#: puts together (1024 objects: 15 % less fit time than 256 on the default cube), within
#: `AUTO_BATCH_RANGE` objects (1024 for the default cube, 512 with the ``sersic`` index axis).
AUTO_BATCH_BYTES = 128 * 2 ** 20
AUTO_BATCH_RANGE = (16, 1024)
#: Objects whose catalogue columns are computed together from their float64 (objects, cells)
#: surfaces: few enough that those stay in cache (2.5 MB for the default cube).
SUMMARY_ROWS = 128


def auto_batch_size(grid) -> int:
    """Objects per batch when none is set: the power of two whose float64 surfaces come nearest
    `AUTO_BATCH_BYTES` from below, within `AUTO_BATCH_RANGE`. Depends on the grid only."""
    fit = max(AUTO_BATCH_BYTES // (8 * grid.size), 1)
    lo, hi = AUTO_BATCH_RANGE
    return int(min(hi, max(lo, 1 << (int(fit).bit_length() - 1))))


@dataclass(frozen=True)
class FitOptions:
    """How to fit. ``gain`` (e-/ADU) adds the Poisson term model/gain to the variance (two passes);
    ``batch_size`` None: chosen from the grid (`auto_batch_size`, see `for_grid`)."""

    statistic: str = "wls"
    gain: float | None = None
    min_pixels: int = 16
    batch_size: int | None = None
    centre: bool = True

    def __post_init__(self):
        if self.statistic not in STATISTICS:
            raise DreError(f"unknown statistic {self.statistic!r}: expected one of {', '.join(STATISTICS)}")
        if self.gain is not None and not self.gain > 0:
            raise DreError(f"gain must be a positive number of e-/ADU, got {self.gain}")
        if self.batch_size is not None and self.batch_size < 1:
            raise DreError(f"batch size must be >= 1, got {self.batch_size}")

    def for_grid(self, grid) -> "FitOptions":
        """These options with the batch size fixed: `auto_batch_size` of `grid` when it is None."""
        return self if self.batch_size is not None else replace(self, batch_size=auto_batch_size(grid))


def clean_cutouts(cuts):
    """Host arrays of a batch with bad pixels neutralised (copied only then), and the input flags.

    Returns data, rms (N, B, B) float32 (0 and 1 where not finite or rms <= 0), mask, bad (bool),
    offsets (N, 2) (0 where unknown) and flags (N,) int.
    """
    data = np.asarray(cuts.data, dtype=np.float32)
    rms = np.asarray(cuts.rms, dtype=np.float32)
    mask = np.asarray(cuts.mask, dtype=bool)
    bad = np.zeros(data.shape, dtype=bool)
    flags = np.where(~mask.any(axis=(1, 2)), int(FitFlag.EMPTY_MASK), 0)
    # three reductions, no (N, B, B) temporaries: a sum is finite only if every pixel is (an
    # overflow only sends a sound cutout to the pixel-by-pixel check), min > 0 fails on NaN too
    flat = (len(data), data.shape[1] * data.shape[2])
    with np.errstate(over="ignore", invalid="ignore"):
        r = rms.reshape(flat)
        sound = (np.isfinite(data.reshape(flat).sum(axis=1)) & (r.min(axis=1, initial=np.inf) > 0)
                 & np.isfinite(r.max(axis=1, initial=0.0)))
    suspect = np.flatnonzero(~sound)                 # rare: only these are looked at pixel by pixel
    if suspect.size:
        data, rms = data.copy(), rms.copy()
        d, r, m = data[suspect], rms[suspect], mask[suspect]
        nonfinite = ~np.isfinite(d) | ~np.isfinite(r)
        bad_rms = np.isfinite(r) & (r <= 0)
        flags[suspect] |= np.where((nonfinite & m).any(axis=(1, 2)), int(FitFlag.NONFINITE_INPUT), 0)
        flags[suspect] |= np.where((bad_rms & m).any(axis=(1, 2)), int(FitFlag.BAD_RMS), 0)
        bad[suspect] = nonfinite | bad_rms
        d[bad[suspect]], r[bad[suspect]] = 0.0, 1.0
        data[suspect], rms[suspect] = d, r
    offsets = np.asarray(cuts.offsets, dtype=np.float64)
    unknown = ~np.isfinite(offsets).all(axis=1)
    flags |= np.where(unknown, int(FitFlag.NO_CENTRE), 0)
    padded = (cuts.objects["CUT_FLAGS"] & int(CutFlag.PADDED)) != 0
    flags |= np.where(padded, int(FitFlag.CUT_PADDED), 0)
    offsets = np.where(unknown[:, None], 0.0, offsets)
    return data, rms, mask, bad, offsets, flags


def footprint_extent(mm, mask, offsets, centre: bool) -> np.ndarray:
    """(N,) number of radial rows that reach every pixel of each object's mask once centred."""
    if not len(mask):
        return np.zeros(0, np.int64)
    if use_compiled(np, optional=True):
        return mask_extent(mask, offsets, mm.rank, centre)
    if centre:
        for axis in (1, 2):
            mask = shift_nearest(np, mask, offsets[:, axis - 1], axis)
    rank1 = (mm.rank + 1).astype(np.uint16 if mm.n_pixels < 2 ** 16 else np.int64)
    return (mask.reshape(len(mask), -1) * rank1).max(axis=1).astype(np.int64)


def product_groups(extent, n_models: int, max_group: int = MAX_GROUP) -> list:
    """Objects sorted by footprint (then position) and cut into groups that share one pair of
    products over the largest footprint among them: a dynamic programme over the cut points that
    minimises the modelled time (`GEMM_EFFICIENCY`, `GROUP_OVERHEAD_S`), so similar footprints go
    together in large, fast products. Depends only on the batch, not on chunks or ranks."""
    order = np.lexsort((np.arange(extent.size), extent))
    e = np.maximum(extent[order], 1).astype(np.float64)
    n = e.size
    sizes, effs = (np.array(v, dtype=np.float64) for v in zip(*GEMM_EFFICIENCY))
    rows = np.arange(max_group, 0, -1)                       # group sizes of the starts j - max_group..j-1
    per_row = 4.0 * rows * n_models / (np.interp(np.log(rows), np.log(sizes), effs) * PEAK_FLOPS)
    best, cut = np.zeros(n + 1), np.zeros(n + 1, dtype=np.int64)
    for j in range(1, n + 1):
        lo = max(0, j - max_group)
        cost = best[lo:j] + per_row[max_group - (j - lo):] * e[j - 1]
        k = int(np.argmin(cost))
        best[j], cut[j] = cost[k] + GROUP_OVERHEAD_S, lo + k
    groups, j = [], n
    while j > 0:
        groups.append(order[cut[j]:j])
        j = cut[j]
    return groups[::-1]


@dataclass
class Group:
    """One product group: (g, n) backend arrays over the first n radial pixels."""

    index: np.ndarray          # positions in the batch
    n: int
    d: object
    w: object
    rms: object
    usable: object
    npix: np.ndarray           # host (g,)


def prepare_group(xp, mm, clean, index, n: int, centre: bool, min_pixels: int) -> Group:
    """Centre the objects `index` of a cleaned batch inside the window that holds the first `n`
    radial pixels (a margin wide enough for the Lanczos kernel: the kept pixels are exactly those
    of a whole-stamp shift) and gather those pixels into radial order."""
    data, rms, mask, bad, offsets, _ = clean
    box = mm.grid.boxsize
    if use_compiled(xp, optional=True):
        d, r, usable, w, npix = centred_rows(data, rms, mask, bad, offsets, index, mm.order[:n], box,
                                             centre, min_pixels)
        return Group(index, n, d, w, r, usable, npix)
    c, h = box // 2, int(np.ceil(mm.radius[n - 1])) if n else 0
    margin = LANCZOS_MARGIN + int(np.ceil(np.abs(offsets[index]).max(initial=0.0)))
    y0, y1 = max(c - h - margin, 0), min(c + h + margin + 1, box)
    window = (index, slice(y0, y1), slice(y0, y1))
    d, r, m, b = (xp.asarray(a[window]) for a in (data, rms, mask, bad))
    if centre:
        d, r, m, b = centre_cutouts(xp, d, r, m, b, xp.asarray(offsets[index]))
    py, px = np.divmod(mm.order[:n], box)
    rel = xp.asarray((py - y0) * (y1 - y0) + (px - y0))
    g = len(index)
    # take along the rows: 2-3x faster than the equivalent fancy index a[:, rel]
    d, r = xp.take(d.reshape(g, -1), rel, axis=1), xp.take(r.reshape(g, -1), rel, axis=1)
    usable = xp.take((m & ~b).reshape(g, -1), rel, axis=1)
    w, npix = pixel_weights(xp, r, usable, min_pixels)
    return Group(index, n, d, w, r, usable, npix)


def pixel_weights(xp, rms, usable, min_pixels: int):
    """(N, P) float32 weights 1/rms^2 on the usable pixels (0 elsewhere, and for objects with fewer
    than `min_pixels` of them) and the host (N,) usable pixel counts."""
    npix = to_host(usable.sum(axis=1))
    w = xp.where(usable, 1.0 / (rms * rms), 0).astype(xp.float32)
    w[xp.asarray(npix < min_pixels)] = 0
    return w, npix


def prepare_cutouts(xp, cuts, options):
    """Whole stamps as the fit sees them (for displays such as the report's gallery): the pixels
    `prepare_group` keeps have exactly these values. Returns d, w, rms, usable (N, P) in stamp
    order on the backend, and the host npix, flags and variance factor of the centring."""
    data, rms, mask, bad, offsets, flags = clean_cutouts(cuts)
    centre = bool(options.centre and np.any(offsets != 0))
    d, r, m, b = (xp.asarray(a) for a in (data, rms, mask, bad))
    if centre:
        d, r, m, b = centre_cutouts(xp, d, r, m, b, xp.asarray(offsets))
    n = len(flags)
    usable, r = (m & ~b).reshape(n, -1), r.reshape(n, -1)
    w, npix = pixel_weights(xp, r, usable, options.min_pixels)
    flags |= np.where(npix < options.min_pixels, int(FitFlag.FEW_PIXELS), 0)
    shrink = variance_factor(np, offsets) if centre else np.ones(n)
    return d.reshape(n, -1), w, r, usable, npix, flags, shrink


def _fit_wls(xp, mm, grp):
    models = mm.models[:grp.n]
    chi2, amp_all = wls_chi2(xp, grp.d, grp.w, models, mm.models_sq[:grp.n], mm.column_blocks(grp.n))
    best, chi2_best, amp, err = recheck_wls(xp, grp.d, grp.w, models, chi2, models_major=mm.models_major)
    surface = chi2.astype(xp.float64)
    surface[xp.arange(grp.d.shape[0]), best] = chi2_best      # exact value at the chosen model
    return best, chi2_best, amp, err, surface, surface, amp_all


def _fit_dre(xp, mm, grp):
    g, k = grp.d.shape[0], mm.n_models
    stat = xp.full((g, k), xp.nan, dtype=xp.float32)
    scale = xp.zeros((g, k), dtype=xp.float32)
    for i in np.flatnonzero(grp.npix > 0):
        pixels = xp.flatnonzero(grp.usable[i])
        if pixels.size:
            stat[i], scale[i] = dre_chi_one(xp, grp.d[i], grp.rms[i], pixels, mm.models[:grp.n],
                                            mm.row_min[:grp.n])
    finite = xp.isfinite(stat)
    best = xp.argmin(xp.where(finite, stat, xp.inf), axis=1)
    amp = scale[xp.arange(g), best].astype(xp.float64)
    chi2_best, err = _chi2_and_error(xp, mm.columns(best, grp.n), amp, grp.d, grp.w)
    stat = stat.astype(xp.float64)
    surface = xp.where(finite, stat * xp.asarray(grp.npix)[:, None], xp.inf)
    return best, chi2_best, amp, err, surface, xp.where(finite, stat, xp.inf), scale


def _chi2_and_error(xp, models, amp, d, w):
    """Float64 chi-square of each object's chosen model and the error of its amplitude."""
    m = models.astype(xp.float64)
    resid = d.astype(xp.float64) - amp[:, None] * m
    return (w * resid * resid).sum(axis=1), amplitude_error(xp, (w * m * m).sum(axis=1))


def poisson_weights(xp, models, amp, w_sky, rms, gain):
    """Weights 1 / (rms^2 + model/gain) from a first fit's best model (where ``w_sky`` > 0).

    The source's Poisson variance comes from the model, not from the data: data-based variance
    gives upward noise fluctuations less weight and biased fluxes low by 2-3 % in our tile tests.
    ``gain`` is a number or one per object (the centring shift scales the variance: gain / factor).
    """
    model = xp.nan_to_num(amp[:, None] * models.astype(xp.float64), nan=0.0)
    gain = xp.asarray(gain, dtype=xp.float64).reshape(-1, 1)
    var = rms.astype(xp.float64) ** 2 + xp.maximum(model, 0.0) / gain
    return xp.where(w_sky > 0, 1.0 / var, 0.0).astype(xp.float32)


def _fit_group(mm, grp, options, shrink):
    """The statistic of one group: best, chi2_best, amp, err, chi2 (g, K), stat (g, K), amp (g, K)."""
    xp = mm.xp
    if options.statistic == "wls":
        out = _fit_wls(xp, mm, grp)
        if options.gain:
            grp.w = poisson_weights(xp, mm.columns(out[0], grp.n), out[2], grp.w, grp.rms,
                                    options.gain / shrink[grp.index])
            out = _fit_wls(xp, mm, grp)
        return out
    best, chi2_best, amp, err, chi2_u, stat_u, amp_u = _fit_dre(xp, mm, grp)
    if options.gain:                  # the statistic has its own variance; CHI2 and errors use this
        grp.w = poisson_weights(xp, mm.columns(best, grp.n), amp, grp.w, grp.rms,
                                options.gain / shrink[grp.index])
        chi2_best, err = _chi2_and_error(xp, mm.columns(best, grp.n), amp, grp.d, grp.w)
    return best, chi2_best, amp, err, chi2_u, stat_u, amp_u


class _Windows:
    """Per object of a batch (host arrays): the sub-grid window's centre and products (`subgrid`)."""

    def __init__(self, grid, n_obj, shrink, back_err=None):
        self.grid, self.shrink, self.back_err = grid, shrink, back_err
        d, c = len(refined_axes(grid)), 3 ** len(refined_axes(grid))
        self.centre = np.zeros((n_obj, d), dtype=np.int64)
        self.b, self.gram, self.c_total = np.zeros((n_obj, c)), np.zeros((n_obj, c, c)), np.zeros(n_obj)
        self.u, self.w_sum, self.npix = np.zeros((n_obj, c)), np.zeros(n_obj), np.zeros(n_obj)
        self.wd_sum = np.zeros(n_obj)
        self.columns = None                  # `refine`'s columns, filled group by group

    def add(self, xp, mm, grp, fitted):
        """The windows around the best models of a fitted group (`fitted`: `_fit_group`'s), their
        sub-grid refinement and its angle by cubic interpolation (`angle.polish`)."""
        if not self.centre.shape[1]:
            return
        best_unique = to_host(fitted[0])
        idx = np.stack(np.unravel_index(mm.representatives[best_unique], self.grid.shape), axis=1)
        cells, self.centre[grp.index] = window(self.grid, idx)
        usable = to_host(grp.w > 0)
        weighted = usable.shape[1] - np.argmax(usable[:, ::-1], axis=1)     # last weighted row + 1
        unique = mm.inverse[cells]
        extent = np.minimum(weighted, mm.support[unique].max(axis=1))        # where the models are
        self.b[grp.index], self.gram[grp.index], self.u[grp.index] = window_products(
            xp, mm.models[:grp.n], grp.d, grp.w, unique, extent,
            None if mm.models_major is None else mm.models_major[:, :grp.n])
        w = grp.w.astype(xp.float64)
        wd = w * grp.d
        self.c_total[grp.index], self.wd_sum[grp.index] = to_host((wd * grp.d).sum(axis=1)), to_host(wd.sum(axis=1))
        self.w_sum[grp.index], self.npix[grp.index] = to_host(w.sum(axis=1)), grp.npix
        self._refine(xp, mm, grp, best_unique, fitted, weighted)

    def _refine(self, xp, mm, grp, best_unique, fitted, weighted):
        """`refine` on the group's window products, then `angle.polish` on its data (`weighted`:
        each object's last weighted row + 1)."""
        rows = np.asarray(grp.index)
        best_full = mm.representatives[best_unique].astype(np.int64)
        state, background = {}, self.background(rows)
        reduced = to_host(fitted[1]) / _dof(self.grid, grp.npix)
        out = refine(self.grid, self.grid.parameters(best_full), best_full, *self.rows(rows), to_host(fitted[2]),
                     to_host(fitted[3]), reduced, background, state)
        polished, angles = polish(xp, mm, grp, self.grid, self.centre[rows], state, background,
                                  self.c_total[rows], weighted)
        out["ANGLE_FIT"][polished] = angles
        if self.columns is None:
            self.columns = {k: np.zeros(len(self.c_total), v.dtype) for k, v in out.items()}
        for k, v in out.items():
            self.columns[k][rows] = v

    def rows(self, rows):
        """centre, b, gram, c_total and the centring's variance factor of the objects `rows`."""
        return self.centre[rows], self.b[rows], self.gram[rows], self.c_total[rows], self.shrink[rows]

    def background(self, rows):
        """``(u, sum w, variance of the background level, sum w d)`` of the objects `rows` (`refine`)."""
        back_err = None if self.back_err is None else self.back_err[rows]
        return (self.u[rows], self.w_sum[rows], background_variance(self.w_sum[rows], self.npix[rows], back_err),
                self.wd_sum[rows])


def _back_err(cuts):
    """The cuts' ``BACK_ERR`` (the uncertainty of their background level), None where they have none."""
    objects = getattr(cuts, "objects", None)
    if objects is None or "BACK_ERR" not in (objects.dtype.names or ()):
        return None
    return np.asarray(objects["BACK_ERR"], float)


def fit_statistic(mm: ModelMatrix, cuts, options: FitOptions):
    """The statistic of every object of a batch against every unique model, group by group.

    Returns backend arrays (best, chi2_best, amp, err, chi2 (N, K), stat (N, K), amp (N, K)), the
    host (N,) usable pixel counts and flags, and the sub-grid windows (`_Windows`; None for ``dre``).
    """
    xp = mm.xp
    clean = clean_cutouts(cuts)
    offsets, flags = clean[4], clean[5]
    centre = bool(options.centre and np.any(offsets != 0))
    shrink = variance_factor(np, offsets) if centre else np.ones(len(flags))
    extent = footprint_extent(mm, clean[2], offsets, centre)
    n_obj, k = len(flags), mm.n_models
    out = [xp.zeros(n_obj, dtype=xp.int64), *(xp.zeros(n_obj) for _ in range(3)),
           *(xp.zeros((n_obj, k)) for _ in range(2)), xp.zeros((n_obj, k), dtype=xp.float32)]
    same_surface = options.statistic == "wls"          # wls's own surface is its chi-square
    if same_surface:
        out[5] = out[4]
    npix = np.zeros(n_obj, dtype=np.int64)
    windows = _Windows(mm.grid, n_obj, shrink, _back_err(cuts)) if options.statistic == "wls" else None
    for index in product_groups(extent, k):
        n = max(int(extent[index].max()), 1)
        grp = prepare_group(xp, mm, clean, index, n, centre, options.min_pixels)
        npix[index] = grp.npix
        rows = xp.asarray(index)
        fitted = _fit_group(mm, grp, options, shrink)
        for i, value in enumerate(fitted):
            if not (same_surface and i == 5):
                out[i][rows] = value
        if windows is not None:
            windows.add(xp, mm, grp, fitted)
    flags |= np.where(npix < options.min_pixels, int(FitFlag.FEW_PIXELS), 0)
    return (*out, npix, flags, windows)


def fit_batch(mm: ModelMatrix, cuts, options: FitOptions) -> dict:
    """Fit one batch of cutouts; return host arrays: catalogue columns and ``SURFACE`` (N, grid.size).

    The statistic is computed for the whole batch (`fit_statistic`), the columns `SUMMARY_ROWS`
    objects at a time (every column is computed row by row)."""
    fitted = fit_statistic(mm, cuts, options)
    n = len(fitted[8])
    refined = _refined(mm, fitted)
    parts = [_batch_columns(mm, options, fitted, refined, slice(lo, min(lo + SUMMARY_ROWS, n)))
             for lo in range(0, max(n, 1), SUMMARY_ROWS)]
    return parts[0] if len(parts) == 1 else {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _batch_columns(mm: ModelMatrix, options: FitOptions, fitted, refined, rows: slice) -> dict:
    """The catalogue columns and surfaces of the objects `rows` of a fitted batch."""
    xp, grid = mm.xp, mm.grid
    same_surface = fitted[5] is fitted[4]
    best, chi2_best, amp, err, chi2_u, stat_u, amp_u, npix, flags = (a[rows] for a in fitted[:9])
    inverse = xp.asarray(mm.inverse)
    # take along the rows: C-ordered (a[:, idx] is F-ordered, and every row reduction below slow)
    chi2_full = to_host(xp.take(chi2_u, inverse, axis=1))
    stat_full = chi2_full if same_surface else to_host(xp.take(stat_u, inverse, axis=1))
    best_unique = to_host(best)
    best_full = mm.representatives[best_unique].astype(np.int64)
    dof = _dof(grid, npix)
    if options.statistic == "wls":
        stat_full = stat_full / dof[:, None]
    posterior = posterior_weights(chi2_full)
    cols = summarize(grid, chi2_full, stat_full, best_full, posterior)
    cells, best_uv = window_cells(grid, mm.inverse, best_full)
    cells_d = xp.asarray(cells)
    flux, var_ln_shape = refined_flux(to_host(xp.take_along_axis(chi2_u, cells_d, axis=1)),
                        to_host(xp.take_along_axis(amp_u, cells_d, axis=1)).astype(np.float64),
                        best_uv, to_host(amp))
    cols.update(CHI2=to_host(chi2_best), DOF=dof.astype(np.int64), NPIX=npix.astype(np.int64),
                FLUX=flux, FLUX_ERR=_flux_error(xp, flux, to_host(err), var_ln_shape, posterior, amp_u, inverse))
    refined = {k: v[rows] for k, v in refined.items()}
    if fitted[9] is not None:
        refined["FLAGS"] = refined["FLAGS"] | np.where(
            second_minimum(grid, chi2_full, best_full, mm.inverse), int(FitFlag.SECOND_MINIMUM), 0)
    no_model = ~np.isfinite(stat_full).any(axis=1) | ~np.isfinite(cols["CHI2"])
    flags = flags | np.where(no_model, int(FitFlag.FIT_FAILED), 0) | refined.pop("FLAGS")
    cols.update(refined)
    flags |= np.where(~(cols["FLUX"] > 0) & ((flags & int(UNFITTED)) == 0), int(FitFlag.NONPOSITIVE_FLUX), 0)
    flags |= np.where((flags & int(UNFITTED)) == 0, cols.pop("EDGE_FLAGS"), 0)
    cols["FLAGS"] = flags.astype(np.int64)
    _fill_unfitted(cols)
    cols["SURFACE"] = stat_full.astype(np.float32)
    return cols


def _dof(grid, npix):
    """Degrees of freedom: usable pixels less the amplitude and the grid's varied parameters."""
    return np.maximum(npix - (1 + sum(a.count > 1 for a in grid.axes)), 1)


def _refined(mm, fitted) -> dict:
    """The sub-grid columns of a whole batch (`subgrid.refine`) and their REFINE_* flags; NaN for
    ``dre`` (no windows: its surface is not a chi-square)."""
    best, chi2_best, amp, err, npix, windows = (fitted[i] for i in (0, 1, 2, 3, 7, 9))
    n = len(npix)
    if windows is None:
        out = {name + suffix: np.full(n, np.nan) for name in FIT_COLUMNS for suffix in ("", "_ERR")}
        out["FLAGS"] = np.zeros(n, dtype=np.int64)
        return out
    if windows.columns is not None:          # refined group by group (`_Windows.add`)
        return dict(windows.columns)
    best_full = mm.representatives[to_host(best)].astype(np.int64)
    reduced = to_host(chi2_best) / _dof(mm.grid, npix)
    return refine(mm.grid, mm.grid.parameters(best_full), best_full, *windows.rows(slice(None)),
                  to_host(amp), to_host(err), reduced, windows.background(slice(None)))


def _flux_error(xp, flux, err_fixed, var_ln_shape, p, amp_u, inverse):
    """Flux error: the fixed-shape error plus the part due to the shape's uncertainty.

    Radius, axis ratio and flux are degenerate, so the fixed-shape error alone is too small. The
    shape part is propagated through the local chi-square quadratic (`refined_flux`) where it has
    a minimum, else taken as the spread of the amplitude (``amp_u`` on the backend, unique models)
    over the grid posterior ``p`` exp(-dchi2/2), for those objects only.
    """
    var_shape = flux ** 2 * var_ln_shape
    rows = np.flatnonzero(~np.isfinite(var_ln_shape))
    if rows.size:
        amp_full = to_host(xp.take(amp_u[xp.asarray(rows)], inverse, axis=1))
        pr = p[rows]
        mean = np.einsum("ij,ij->i", pr, amp_full)
        var_shape[rows] = np.maximum(np.einsum("ij,ij,ij->i", pr, amp_full, amp_full) - mean ** 2, 0.0)
    return np.sqrt(err_fixed ** 2 + var_shape)


def _fill_unfitted(cols):
    """Objects that could not be fitted get fill values (NaN, MODEL_IDX -1), never stale numbers."""
    bad = (cols["FLAGS"] & int(UNFITTED)) != 0
    if not bad.any():
        return
    for name, values in cols.items():
        if name in ("FLAGS", "NPIX", "DOF"):
            continue
        if name == "MODEL_IDX":
            values[bad] = -1
        elif np.issubdtype(values.dtype, np.floating):
            values[bad] = np.nan


def fit_cutouts(mm: ModelMatrix, cuts, options: FitOptions, progress=None) -> dict:
    """Fit every cutout of a `CutoutSet` in batches; concatenated host columns (see `fit_batch`)."""
    options = options.for_grid(mm.grid)
    parts = []
    for start in range(0, len(cuts), options.batch_size):
        stop = min(start + options.batch_size, len(cuts))
        parts.append(fit_batch(mm, cuts.subset(slice(start, stop)), options))
        if progress:
            progress(stop, len(cuts))
    if not parts:
        return {}
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
