"""Sub-grid refinement: continuous parameters and their errors from the chi-square surface.

After the grid search, the chi-square of the 3^D cells around the best cell (D: the grid's axes
with three values or more; the angle wraps around when its axis covers 180 degrees, the other
axes' windows are moved inwards at the grid's edges) is fitted by least squares with a full
quadratic in D dimensions, as SDSS's photo interpolated between its models. Its vertex gives the
parameters (``<NAME>_FIT``), its Hessian H their covariance 2 H^-1 (the Delta chi2 = 1 ellipsoid),
scaled by the reduced chi-square where that exceeds 1. The flux is ln(amplitude) fitted over the
same cells and evaluated at the vertex; its error adds the fixed-shape amplitude error and the
shape's part g^T C g (g: the gradient of ln(amplitude) at the vertex).

Where the angle has no positive curvature (a round galaxy) the other parameters are refined
without it, and ANGLE_FIT keeps the grid's angle with the spread of a uniform angle (52 degrees).
A parameter the grid does not vary (one or two values) keeps its grid value, with a NaN error.
Flags: REFINE_FAILED (no minimum of the quadratic: the grid's values are kept), REFINE_FAR (the
vertex is more than one grid step from the best cell along some axis: the quadratic extrapolates;
it is kept at most 1.5 steps beyond the window), SECOND_MINIMUM (another local minimum of the
grid, not next to the best cell, within Delta chi2 < 1 of it).

Everything here works on host arrays; `fit.engine` takes the windows off the backend.
"""

from __future__ import annotations

import itertools
from functools import lru_cache

import numpy as np

from ..flags import FitFlag

#: Columns written by `refine`, each with ``_ERR`` beside it.
FIT_COLUMNS = ("INDEX_FIT", "AX_RATIO_FIT", "ANGLE_FIT", "LOGR_FIT", "FLUX_FIT")
#: Standard deviation of an angle uniform over 180 degrees: ANGLE_FIT_ERR of a round galaxy.
UNIFORM_ANGLE_ERR = 180.0 / np.sqrt(12.0)
#: Farthest the vertex may lie outside its window, in grid steps (beyond: clipped, REFINE_FAR).
MAX_EXTRAPOLATION = 0.5


def periodic(axis) -> bool:
    """Whether an axis wraps around: the angle when its values cover 180 degrees."""
    return axis.name == "ANGLE" and axis.count > 1 and abs(axis.count * axis.step - 180.0) < 1e-6


def refined_axes(grid) -> tuple:
    """Positions in ``grid.axes`` of the axes refined: those with three values or more."""
    return tuple(i for i, a in enumerate(grid.axes) if a.count >= 3)


@lru_cache(maxsize=None)
def _design(d: int):
    """Offsets (3^d, d) of the window's cells, the quadratic's (j, k) pairs (j <= k) and the
    (n_coef, 3^d) matrix that gives its coefficients (1, t_j, then t_j t_k) from the cells' values:
    central differences at the window's centre (value, gradient, curvature along each axis through
    the axis neighbours, mixed terms through the four diagonal neighbours). A least-squares
    quadratic over all 3^d cells weighs the corners, where the surface is least quadratic, as much
    as the centre: its b/a was biased by +0.035 on n = 4 galaxies, central differences' by 0.002."""
    offsets = np.array(list(itertools.product((-1, 0, 1), repeat=d)), dtype=np.int64).reshape(-1, d)
    pairs = [(j, k) for j in range(d) for k in range(j, d)]
    where = {tuple(o): i for i, o in enumerate(offsets.tolist())}

    def at(**moves):
        vec = [0] * d
        for j, step in moves.items():
            vec[int(j[1:])] = step
        return where[tuple(vec)]

    stencil = np.zeros((1 + d + len(pairs), len(offsets)))
    stencil[0, at()] = 1.0
    for j in range(d):
        stencil[1 + j, at(**{f"a{j}": 1})] += 0.5
        stencil[1 + j, at(**{f"a{j}": -1})] -= 0.5
    for m, (j, k) in enumerate(pairs):
        row = stencil[1 + d + m]
        if j == k:
            row[at(**{f"a{j}": 1})] += 0.5
            row[at(**{f"a{j}": -1})] += 0.5
            row[at()] -= 1.0
        else:
            for sj in (1, -1):
                for sk in (1, -1):
                    row[at(**{f"a{j}": sj, f"a{k}": sk})] += sj * sk / 4.0
    return offsets.astype(float), pairs, stencil


def window(grid, idx):
    """The 3^D cells around the cells ``idx`` (N, 4 axis indices): flat full-grid indices
    (N, 3^D) and the window centres (N, D) as axis indices (moved inwards at bounded edges)."""
    axes = refined_axes(grid)
    offsets, _, _ = _design(len(axes))
    full = np.repeat(idx[:, None, :], len(offsets), axis=1)
    centre = idx[:, axes].copy()
    for j, ax in enumerate(axes):
        a = grid.axes[ax]
        if not periodic(a):
            centre[:, j] = np.clip(centre[:, j], 1, a.count - 2)
        full[:, :, ax] = (centre[:, j, None] + offsets[None, :, j].astype(np.int64)) % a.count
    cells = np.ravel_multi_index(tuple(full[..., k] for k in range(len(grid.shape))), grid.shape)
    return cells, centre


def _quadratic(values, d):
    """Gradient (N, d) and Hessian (N, d, d) at the window centre of the least-squares quadratic."""
    _, pairs, solve = _design(d)
    c = values @ solve.T
    hess = np.zeros((len(values), d, d))
    for m, (j, k) in enumerate(pairs):
        coef = c[:, 1 + d + m]
        if j == k:
            hess[:, j, j] = 2 * coef
        else:
            hess[:, j, k] = hess[:, k, j] = coef
    return c, c[:, 1:1 + d], hess


def _vertex(grad, hess, keep):
    """Vertex offsets (N, d) of the quadratic over the axes `keep` (others stay at 0), whether it is
    a minimum, and the inverse Hessian (N, d, d) over those axes (0 elsewhere)."""
    n, d = grad.shape
    sub = hess[:, keep][:, :, keep]
    with np.errstate(invalid="ignore"):
        finite = np.isfinite(sub).all(axis=(1, 2)) & np.isfinite(grad[:, keep]).all(axis=1)
        safe = np.where(finite[:, None, None], sub, np.eye(len(keep)))
        ok = finite & (np.linalg.eigvalsh(safe)[:, 0] > 0)
    inv = np.zeros((n, d, d))
    t = np.zeros((n, d))
    if ok.any():
        sub_inv = np.linalg.inv(safe[ok])
        inv[np.ix_(np.flatnonzero(ok), keep, keep)] = sub_inv
        t[np.ix_(np.flatnonzero(ok), keep)] = -np.einsum("nij,nj->ni", sub_inv, grad[ok][:, keep])
    return t, ok, inv


def refine(grid, best_values, best_full, fetch, amp, amp_err, reduced_chi2):
    """Continuous parameters, errors and flags around the best cells.

    Parameters
    ----------
    best_values : dict of (N,) grid values of the best cell (INDEX, AX_RATIO, ANGLE, LOGR).
    best_full : (N,) flat full-grid index of the best cell.
    fetch : ``fetch(cells, rows)`` -> (chi2, amp), host float64 (len(rows), 3^D): the chi-square
        and best amplitude of the cells ``cells`` (flat full-grid indices) of the objects ``rows``.
    amp, amp_err : (N,) the best cell's amplitude and its fixed-shape error.
    reduced_chi2 : (N,) chi2 / dof of the best cell: the covariance is scaled by it where > 1.

    The quadratic is made at the best cell; where its vertex is nearer another cell, once more
    at that cell (a Newton step on the grid). Returns a dict of the `FIT_COLUMNS`, their ``_ERR``
    and ``FLAGS`` (REFINE_* bits).
    """
    axes = refined_axes(grid)
    d, n = len(axes), len(best_full)
    out = {}
    for a in grid.axes:            # axes not refined: the grid's value, no error
        out[f"{a.name}_FIT"] = np.asarray(best_values[a.name], dtype=np.float64).copy()
        out[f"{a.name}_FIT_ERR"] = np.full(n, np.nan)
    flags = np.zeros(n, dtype=np.int64)
    amp_c, amp_err = np.asarray(amp, np.float64), np.asarray(amp_err, np.float64)
    if d == 0 or n == 0:
        out["FLUX_FIT"], out["FLUX_FIT_ERR"] = amp_c.copy(), amp_err.copy()
        out["FLAGS"] = flags
        return out
    best = np.stack(np.unravel_index(best_full, grid.shape), axis=1)
    cells, centre = window(grid, best)
    chi2_w, amp_w = fetch(cells, np.arange(n))
    t, ok, inv, round_ = _solve(grid, axes, chi2_w, best[:, axes] - centre)
    # a Newton step on the grid: where the vertex is nearer another cell, again from that cell
    near = best.copy()
    for j, ax in enumerate(axes):
        a = grid.axes[ax]
        step = centre[:, j] + np.rint(np.clip(t[:, j], -1, 1)).astype(np.int64)
        near[:, ax] = step % a.count if periodic(a) else np.clip(step, 0, a.count - 1)
    cells2, centre2 = window(grid, near)
    again = np.flatnonzero(ok & (centre2 != centre).any(axis=1))
    if again.size:
        chi2_2, amp_2 = fetch(cells2[again], again)
        t2, ok2, inv2, round2 = _solve(grid, axes, chi2_2, best[again][:, axes] - centre2[again])
        take = again[ok2]
        t[take], inv[take], round_[take], centre[take], amp_w[take] = (
            t2[ok2], inv2[ok2], round2[ok2], centre2[take], amp_2[ok2])
    offset = centre + t - best[:, axes]                     # vertex - best cell, in steps
    for j, ax in enumerate(axes):
        if periodic(grid.axes[ax]):
            offset[:, j] = (offset[:, j] + grid.axes[ax].count / 2) % grid.axes[ax].count - grid.axes[ax].count / 2
    flags |= np.where(np.isfinite(chi2_w).all(axis=1) & ~ok, int(FitFlag.REFINE_FAILED), 0)
    flags |= np.where(ok & (np.abs(offset) > 1).any(axis=1), int(FitFlag.REFINE_FAR), 0)
    t = np.where(ok[:, None], np.clip(t, -1 - MAX_EXTRAPOLATION, 1 + MAX_EXTRAPOLATION),
                 best[:, axes] - centre)                    # failed: the best cell
    cov = 2.0 * inv * np.maximum(np.nan_to_num(reduced_chi2, nan=1.0), 1.0)[:, None, None]
    for j, ax in enumerate(axes):
        a = grid.axes[ax]
        value = a.values[centre[:, j]] + t[:, j] * a.step
        err = np.where(ok, np.sqrt(np.maximum(cov[:, j, j], 0.0)) * a.step, np.nan)
        if periodic(a):
            value = np.mod(value, 180.0)
            err = np.where(round_, UNIFORM_ANGLE_ERR, err)
        else:
            value = np.clip(value, a.values[0], a.values[-1])
        out[f"{a.name}_FIT"], out[f"{a.name}_FIT_ERR"] = value, err
    out["FLUX_FIT"], out["FLUX_FIT_ERR"] = _flux(amp_w, amp_c, amp_err, t, cov, ok, d)
    out["FLAGS"] = flags
    return out


def _solve(grid, axes, chi2_w, best_off):
    """Vertex offsets (N, d) from the window centre, whether it is a minimum, the inverse Hessian
    (N, d, d), and whether the angle was left out (no curvature along it: then its offset is the
    best cell's)."""
    d = len(axes)
    usable = np.isfinite(chi2_w).all(axis=1)
    _, grad, hess = _quadratic(np.where(usable[:, None], chi2_w, 0.0), d)
    t, ok, inv = _vertex(grad, hess, list(range(d)))
    round_ = np.zeros(len(chi2_w), dtype=bool)
    angle = [j for j, ax in enumerate(axes) if grid.axes[ax].name == "ANGLE"]
    if angle and d > 1:
        retry = np.flatnonzero(~ok & usable)
        if retry.size:
            keep = [j for j in range(d) if j != angle[0]]
            t2, ok2, inv2 = _vertex(grad[retry], hess[retry], keep)
            t2[:, angle[0]] = best_off[retry, angle[0]]
            rows = retry[ok2]
            t[rows], inv[rows], ok[rows], round_[rows] = t2[ok2], inv2[ok2], True, True
    return t, ok & usable, inv, round_


def _flux(amp_w, amp_c, amp_err, t, cov, ok, d):
    """ln(amplitude)'s quadratic over the window at the vertex `t`, and its error (see module)."""
    _, pairs, _ = _design(d)
    positive = ok & (amp_w > 0).all(axis=1) & np.isfinite(amp_w).all(axis=1)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        c, grad0, hess = _quadratic(np.log(np.where(positive[:, None], amp_w, 1.0)), d)
        basis = np.column_stack([np.ones(len(t))] + [t[:, j] for j in range(d)]
                                + [t[:, j] * t[:, k] for j, k in pairs])
        flux = np.exp((c * basis).sum(axis=1))
        g = grad0 + np.einsum("nij,nj->ni", hess, t)
        var_shape = np.einsum("ni,nij,nj->n", g, cov, g)
        rel_fixed = amp_err / amp_c
    positive &= np.isfinite(flux)
    flux = np.where(positive, flux, amp_c)
    err = np.where(positive, flux * np.sqrt(rel_fixed ** 2 + np.maximum(var_shape, 0.0)), amp_err)
    return flux.astype(np.float64), err.astype(np.float64)


def second_minimum(grid, chi2_full, best_full, inverse) -> np.ndarray:
    """(N,) bool: a local minimum of the grid surface within Delta chi2 < 1 of the best, more than
    one step from the best cell along some axis and not the best's own unique model."""
    n = len(chi2_full)
    found = np.zeros(n, dtype=bool)
    if n == 0:
        return found
    with np.errstate(invalid="ignore"):
        low = np.fmin.reduce(chi2_full, axis=1)
        rows, cells = np.nonzero(chi2_full < (low + 1.0)[:, None])
    cells_u, best_u = inverse[cells], inverse[best_full][rows]
    coords = np.stack(np.unravel_index(cells, grid.shape), axis=1)
    best = np.stack(np.unravel_index(best_full, grid.shape), axis=1)[rows]
    dist = np.abs(coords - best)
    for ax, a in enumerate(grid.axes):
        if periodic(a):
            dist[:, ax] = np.minimum(dist[:, ax], a.count - dist[:, ax])
    keep = (dist.max(axis=1) > 1) & (cells_u != best_u)
    rows, cells, coords = rows[keep], cells[keep], coords[keep]
    value = chi2_full[rows, cells]
    is_min = np.ones(rows.size, dtype=bool)
    for ax, a in enumerate(grid.axes):
        if a.count < 2:
            continue
        for step in (-1, 1):
            nb = coords.copy()
            nb[:, ax] += step
            if periodic(a):
                nb[:, ax] %= a.count
                valid = np.ones(rows.size, dtype=bool)
            else:
                valid = (nb[:, ax] >= 0) & (nb[:, ax] < a.count)
                nb[:, ax] = np.clip(nb[:, ax], 0, a.count - 1)
            other = chi2_full[rows, np.ravel_multi_index(tuple(nb.T), grid.shape)]
            is_min &= ~valid | (value <= other)
    found[rows[is_min]] = True
    return found
