"""The sub-grid angle by cubic interpolation along the angle axis, after `subgrid.refine`.

Quadratic interpolation between models 15 degrees apart does not rotate a galaxy: on the accuracy
benchmark's S/N >= 100 galaxies (b/a < 0.7, three seeds) the refined angle overshot its offset
from the window's centre by 7 % of it (11 % for b/a < 0.3), which pulled it towards the middle
between two grid angles, by up to 0.6 degrees: a dispersion of 0.82 degrees for true angles away
from the grid's, 0.49 at them. Here, with the other parameters at their refined values, the
models along the angle are the ``slices`` ``S_k = sum_o L_o(t) M(o, k)`` (``L_o``: the refined
point's quadratic weights over the other axes' 3^(D-1) cells) at the four grid angles around the
refined one (``f - 1 .. f + 2``, ``f`` the grid angle below it), and the angle is where the
chi-square of their cubic interpolation, amplitude and sky level profiled as in `refine`, is
lowest. It costs four slices per object (about 110 model rows gathered, a few products), not the
products of a larger window.
"""

from __future__ import annotations

import numpy as np

from .backend import to_host
from .subgrid import _lagrange, _offsets, _sky_profiled, _tensor, periodic, refined_axes

#: The grid angles of a slice relative to the one below the refined angle.
NODES = np.array([-1.0, 0.0, 1.0, 2.0])
#: Offsets from the grid angle below the refined one that are tried (grid steps), then refined by a
#: parabola through the lowest and its neighbours.
SEARCH = np.linspace(-0.5, 1.5, 81)
#: Objects whose slices are gathered together.
BLOCK = 16


def angle_axis(grid):
    """Position of the angle among `refined_axes` when it wraps around and has four values or
    more (the cubic needs them); None otherwise."""
    axes = refined_axes(grid)
    for j, ax in enumerate(axes):
        if periodic(grid.axes[ax]) and grid.axes[ax].count >= 4:
            return j
    return None


def cubic_weights(s) -> np.ndarray:
    """Cubic Lagrange weights of the nodes -1, 0, 1, 2 at s (m,): (m, 4)."""
    s = np.asarray(s, np.float64)[:, None]
    out = np.ones((s.shape[0], 4))
    for i, xi in enumerate(NODES):
        for xj in NODES:
            if xj != xi:
                out[:, i] *= (s[:, 0] - xj) / (xi - xj)
    return out


def slice_cells(grid, centre, t, j):
    """Flat full-grid cells (m, 4, c) of the slices, the other axes' weights (m, c) and the grid
    angle below each refined one relative to the window's centre (m,), for window centres
    `centre` (m, D), refined points `t` (m, D) and the angle's position `j` among the refined axes."""
    axes = refined_axes(grid)
    m, d = t.shape
    others = [k for k in range(d) if k != j]
    weights = _tensor([_lagrange(t[:, others])[:, i] for i in range(len(others))], m)
    below = np.floor(t[:, j])
    offsets = _offsets(len(others)).astype(np.int64)                     # (c, D - 1)
    full = np.zeros((m, 4, offsets.shape[0], len(grid.shape)), dtype=np.int64)
    for i, ax in enumerate(axes):
        a = grid.axes[ax]
        if i == j:
            k = centre[:, i, None] + below.astype(np.int64)[:, None] + NODES.astype(np.int64)[None, :]
            full[..., ax] = (k % a.count)[:, :, None]
        else:
            full[..., ax] = (centre[:, i, None] + offsets[None, :, others.index(i)])[:, None, :]
    cells = np.ravel_multi_index(tuple(full[..., k] for k in range(len(grid.shape))), grid.shape)
    return cells, weights, below


def slice_products(xp, models, d, w, cells_unique, weights, extent, models_major=None):
    """Host float64 ``b = S^T W d`` (m, 4), ``G = S^T W S`` (m, 4, 4) and ``u = S^T w`` (m, 4) of the
    slices ``S_k = sum_o weights_o M[cells_unique[k, o]]``; ``d, w`` (m, P) on the backend,
    `extent` (m,) host: the leading rows with weighted pixels."""
    m, _, c = cells_unique.shape
    b, gram, u = np.empty((m, 4)), np.empty((m, 4, 4)), np.empty((m, 4))
    for lo in range(0, m, BLOCK):
        hi = min(lo + BLOCK, m)
        n = max(int(np.max(extent[lo:hi], initial=1)), 1)
        cols = xp.asarray(cells_unique[lo:hi].ravel())
        if models_major is not None:
            rows = models_major[cols, :n].reshape(hi - lo, 4, c, n)
        else:
            rows = xp.take(models[:n], cols, axis=1).T.reshape(hi - lo, 4, c, n)
        s = xp.einsum("kjon,ko->kjn", rows, xp.asarray(weights[lo:hi], dtype=rows.dtype))     # (k, 4, n)
        wd = xp.stack([w[lo:hi, :n] * d[lo:hi, :n], w[lo:hi, :n]], axis=2)                   # (k, n, 2)
        bu = to_host(xp.matmul(s, wd)).astype(np.float64)
        b[lo:hi], u[lo:hi] = bu[:, :, 0], bu[:, :, 1]
        gram[lo:hi] = to_host(xp.matmul(s * w[lo:hi, None, :n], s.transpose(0, 2, 1)))
    return b, gram, u


def best_offset(b, gram, u, c_total, w_sum, wd_sum, var_b):
    """The offset s (m,) in [-0.5, 1.5] grid steps from the grid angle below at which the cubic
    interpolation of the slices has the lowest chi-square, the amplitude and (with a prior of
    variance ``var_b`` > 0) a constant sky level fitted (`subgrid._sky_profiled`, as in
    `refine`); and whether that is a minimum inside the range with a positive amplitude (m,) bool."""
    b, gram, c_total = _sky_profiled(b, gram, c_total, u, w_sum, var_b, wd_sum)
    lw = cubic_weights(SEARCH)                                                 # (s, 4)
    s_ = np.einsum("sk,mk->ms", lw, b)
    q = np.einsum("sk,mkl,sl->ms", lw, gram, lw)
    with np.errstate(divide="ignore", invalid="ignore"):
        chi2 = c_total[:, None] - s_ * s_ / q
    chi2 = np.where((q > 0) & (s_ > 0) & np.isfinite(chi2), chi2, np.inf)
    i = np.argmin(chi2, axis=1)
    rows = np.arange(len(i))
    inside = (i > 0) & (i < SEARCH.size - 1) & np.isfinite(chi2[rows, i])
    j = np.clip(i, 1, SEARCH.size - 2)
    lo, mid, hi = chi2[rows, j - 1], chi2[rows, j], chi2[rows, j + 1]
    with np.errstate(divide="ignore", invalid="ignore"):
        curve = lo - 2 * mid + hi
        shift = np.where(curve > 0, 0.5 * (lo - hi) / curve, 0.0)
    step = SEARCH[1] - SEARCH[0]
    ok = inside & np.isfinite(shift)
    return SEARCH[j] + np.clip(np.nan_to_num(shift), -1, 1) * step, ok


def polish(xp, mm, grp, grid, centre, state, background, c_total, extent):
    """Refined angles of a group's objects (`refine`'s ``state``: t, ok and round per object):
    ``(rows, angles)``, the objects polished and their angles in degrees. Their errors stay
    `refine`'s: the slices' curvature gives errors 4 % smaller (median), which the accuracy
    benchmark's S/N 20-50 angles do not bear out (coverage 0.57)."""
    j = angle_axis(grid)
    if j is None:
        return np.zeros(0, np.int64), np.zeros(0)
    rows = np.flatnonzero(state["ok"] & ~state["round"])
    if not rows.size:
        return rows, np.zeros(0)
    t = state["t"][rows]
    cells, weights, below = slice_cells(grid, centre[rows], t, j)
    unique = mm.inverse[cells]
    extent = np.minimum(extent[rows], mm.support[unique].max(axis=(1, 2)))      # where the models are
    sel = xp.asarray(rows)
    b, gram, u = slice_products(xp, mm.models, grp.d[sel], grp.w[sel], unique, weights, extent,
                                None if mm.models_major is None else mm.models_major)
    _, w_sum, var_b, wd_sum = (x[rows] for x in background)
    s, ok = best_offset(b, gram, u, c_total[rows], w_sum, wd_sum, var_b)
    axis = grid.axes[refined_axes(grid)[j]]
    angle = np.mod(axis.values[centre[rows, j]] + (below + s) * axis.step, 180.0)
    return rows[ok], angle[ok]
