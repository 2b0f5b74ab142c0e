"""Sub-grid flux: the amplitude interpolated to where the chi-square surface has its minimum.

The grid steps (0.1 in b/a, 0.12 dex in radius) move the extrapolated total flux of a cuspy
profile by several per cent, because the flux is tied to the circularised radius r * sqrt(b/a).
The chi-square and ln(amplitude) vary smoothly over the grid, so both are fitted with a
quadratic over the 3 x 3 (b/a, log r) cells around the best model (at its index and angle); the
flux is ln(amplitude) evaluated at the chi-square vertex. Where the vertex is not a minimum
inside that window, a 1-D parabola along log r is tried, and failing that the best cell's flux
is kept. Only FLUX changes: the reported model stays the best grid cell.
"""

from __future__ import annotations

import numpy as np

_OFFSETS = np.array([(u, v) for u in (-1, 0, 1) for v in (-1, 0, 1)], dtype=float)
_DESIGN = np.column_stack([np.ones(9), _OFFSETS[:, 0], _OFFSETS[:, 1], _OFFSETS[:, 0] ** 2,
                           _OFFSETS[:, 1] ** 2, _OFFSETS[:, 0] * _OFFSETS[:, 1]])
_SOLVE = np.linalg.pinv(_DESIGN)          # (6, 9): quadratic coefficients from 9 values


def window_cells(grid, inverse, best_full):
    """Unique-model indices (N, 9) of the 3 x 3 (b/a, log r) cells around each best cell.

    The window is shifted inwards at the grid edges; offsets are relative to the window centre.
    Returns the cells and the best cell's (u, v) position inside the window.
    """
    idx = np.stack(np.unravel_index(best_full, grid.shape), axis=1)
    nq, nr = grid.ax_ratio.count, grid.logr.count
    cq = np.clip(idx[:, 1], 1, max(nq - 2, 1)) if nq >= 3 else idx[:, 1]
    cr = np.clip(idx[:, 3], 1, max(nr - 2, 1)) if nr >= 3 else idx[:, 3]
    q = np.clip(cq[:, None] + _OFFSETS[None, :, 0].astype(int), 0, nq - 1)
    r = np.clip(cr[:, None] + _OFFSETS[None, :, 1].astype(int), 0, nr - 1)
    n = np.broadcast_to(idx[:, :1], q.shape)
    a = np.broadcast_to(idx[:, 2:3], q.shape)
    cells = np.ravel_multi_index((n, q, a, r), grid.shape)
    return inverse[cells], np.stack([idx[:, 1] - cq, idx[:, 3] - cr], axis=1)


def _vertex_2d(chi2_9):
    """Vertex (N, 2), its validity, and the inverse Hessian (N, 2, 2) of the chi-square quadratic."""
    c = chi2_9 @ _SOLVE.T                                   # (N, 6): 1, u, v, uu, vv, uv
    h = np.stack([np.stack([2 * c[:, 3], c[:, 5]], -1), np.stack([c[:, 5], 2 * c[:, 4]], -1)], -2)
    det = h[:, 0, 0] * h[:, 1, 1] - h[:, 0, 1] ** 2
    ok = (h[:, 0, 0] > 0) & (det > 0)
    safe = np.where(ok, det, 1.0)
    h_inv = np.stack([np.stack([h[:, 1, 1], -h[:, 0, 1]], -1), np.stack([-h[:, 0, 1], h[:, 0, 0]], -1)], -2)
    h_inv = h_inv / safe[:, None, None]
    u = -(h_inv[:, 0, 0] * c[:, 1] + h_inv[:, 0, 1] * c[:, 2])
    v = -(h_inv[:, 1, 0] * c[:, 1] + h_inv[:, 1, 1] * c[:, 2])
    return np.stack([u, v], 1), ok & (np.abs(u) <= 1) & (np.abs(v) <= 1), h_inv


def _vertex_radius(chi2_9, best_uv):
    """Vertex along log r through the best cell's row of the window."""
    row = (best_uv[:, 0] + 1).astype(int) * 3
    take = np.take_along_axis
    y = np.stack([take(chi2_9, (row + k)[:, None], 1)[:, 0] for k in range(3)], 1)
    curv = y[:, 0] - 2 * y[:, 1] + y[:, 2]
    v = (y[:, 0] - y[:, 2]) / (2 * np.where(curv > 0, curv, 1.0))
    uv = np.stack([best_uv[:, 0].astype(float), v], 1)
    return uv, (curv > 0) & (np.abs(v) <= 1)


def refined_flux(chi2_9, amp_9, best_uv, fallback):
    """FLUX at the chi-square vertex; ``fallback`` (the best cell's amplitude) where undefined.

    Also returns the variance of ln(FLUX) due to the shape: g^T (2 H^-1) g, with g the gradient of
    ln(amplitude) at the vertex and H the Hessian of the chi-square (the covariance of (b/a, log r)
    is 2 H^-1); NaN where the 2-D vertex is not a minimum inside the window.
    """
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        positive = np.all(amp_9 > 0, axis=1) & np.all(np.isfinite(chi2_9), axis=1)
        chi2 = np.where(positive[:, None], chi2_9, 0.0)
        ln_amp = np.log(np.where(positive[:, None], amp_9, 1.0)) @ _SOLVE.T
        uv2, ok2, h_inv = _vertex_2d(chi2)
        uv1, ok1 = _vertex_radius(chi2, best_uv)
        uv = np.where(ok2[:, None], uv2, uv1)
        u, v = uv[:, 0], uv[:, 1]
        basis = np.stack([np.ones_like(u), u, v, u * u, v * v, u * v], 1)
        flux = np.exp((ln_amp * basis).sum(1))
        grad = np.stack([ln_amp[:, 1] + 2 * ln_amp[:, 3] * u + ln_amp[:, 5] * v,
                         ln_amp[:, 2] + 2 * ln_amp[:, 4] * v + ln_amp[:, 5] * u], 1)
        var_shape = 2 * np.einsum("ni,nij,nj->n", grad, h_inv, grad)
    ok = positive & (ok2 | ok1) & np.isfinite(flux)
    var_shape = np.where(positive & ok2 & (var_shape >= 0), var_shape, np.nan)
    return np.where(ok, flux, fallback), var_shape
