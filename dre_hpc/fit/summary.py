"""From chi-square surfaces to catalogue columns: best model, surface means and errors, edge flags.

All functions work on NumPy arrays on the host, vectorised over objects.

* ``<NAME>_MEAN`` / ``<NAME>_ERR`` (INDEX, AX_RATIO, ANGLE, LOGR) are moments of the grid
  posterior ``p ~ exp(-(chi2 - chi2_min) / 2)`` over every cell of the full grid; the angle is a
  circular quantity of period 180 degrees. Each error includes in quadrature the grid's
  discreteness ``step / sqrt(12)``, so a surface sharper than one step gives the step's limit,
  not zero.
* ``CHI``, ``CHI_STD``, ``LOGR_CHI``, ``LOGR_VAR``, ``LOGR_CHI_VAR``, ``LOGR_PARAB``, ``LOGR_STD``
  follow the original DRE definitions applied to the statistic's own surface (the reduced
  chi-square for ``wls``, the original chi for ``dre``).
"""

from __future__ import annotations

import numpy as np

from ..flags import FitFlag


#: Largest chi-square difference whose posterior weight is kept: exp(-700) is the last normal
#: double (beyond it exp returns slow subnormals that no sum of weights >= 1 can see).
MAX_DELTA_CHI2 = 1400.0


def posterior_weights(chi2_full):
    """exp(-(chi2 - min) / 2) per object, normalised; rows without a finite value are all zero.

    Computed in place in one (N, cells) buffer; weights below exp(-MAX_DELTA_CHI2 / 2) are 0."""
    low = np.fmin.reduce(chi2_full, axis=1) if chi2_full.shape[1] else np.zeros(len(chi2_full))
    low = np.where(np.isfinite(low), low, 0.0)
    p = np.subtract(chi2_full, low[:, None])
    p *= -0.5
    keep = p > -0.5 * MAX_DELTA_CHI2               # False for inf and NaN too
    np.maximum(p, -0.5 * MAX_DELTA_CHI2, out=p)
    np.exp(p, out=p)
    np.copyto(p, 0.0, where=~keep)
    total = p.sum(axis=1, keepdims=True)
    p /= np.where(total > 0, total, 1.0)
    return p


def surface_moments(grid, p):
    """Posterior means and errors of every grid parameter; the angle as a 180-degree circular quantity.

    One matrix product ``p @ V`` gives every moment at once (V: each axis's values and squares,
    cos and sin of twice the angle), so the (N, cells) posterior is read once.
    """
    out = {}
    cells = [v.ravel() for v in np.meshgrid(*(a.values for a in grid.axes), indexing="ij")]
    columns = []
    for axis, values in zip(grid.axes, cells):
        if axis.name == "ANGLE":
            columns += [np.cos(2 * np.deg2rad(values)), np.sin(2 * np.deg2rad(values))]
        else:
            columns += [values, values * values]
    moments = p @ np.stack(columns, axis=1)
    col = 0
    for axis in grid.axes:
        floor2 = axis.step ** 2 / 12.0 if axis.count > 1 else 0.0
        first, second = moments[:, col], moments[:, col + 1]
        col += 2
        if axis.name == "ANGLE":
            z = first + 1j * second
            mean = np.mod(np.rad2deg(np.angle(z)) / 2.0, 180.0)
            resultant = np.clip(np.abs(z), 1e-300, 1.0)
            spread = np.rad2deg(np.sqrt(-2.0 * np.log(resultant)) / 2.0)
            out["ANGLE_MEAN"], out["ANGLE_ERR"] = mean, np.sqrt(spread ** 2 + floor2)
        else:
            var = np.maximum(second - first ** 2, 0.0)
            out[f"{axis.name}_MEAN"], out[f"{axis.name}_ERR"] = first, np.sqrt(var + floor2)
    return out


def original_radius_statistics(grid, chi_full, best_logr):
    """LOGR_CHI, LOGR_VAR, LOGR_CHI_VAR of the original: 1/chi-weighted radius moments over the cube.

    The weights 1/chi are broad, so the moments come from one product ``w @ [1, r, r^2]`` (the
    variance as E[r^2] - E[r]^2 loses nothing here)."""
    radius = np.broadcast_to(10.0 ** grid.logr.values, grid.shape).ravel()
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = np.where(np.isfinite(chi_full), 1.0 / chi_full, 0.0)
        norm, m1, m2 = (inv @ np.stack([np.ones_like(radius), radius, radius * radius], axis=1)).T
        r_chi = m1 / norm
        best = 10.0 ** best_logr
        r_var = np.maximum(m2 / norm - 2 * best * r_chi + best * best, 0.0)
        r_chi_var = np.maximum(m2 / norm - r_chi * r_chi, 0.0)
        return np.log10(r_chi), np.log10(r_var), np.log10(r_chi_var)


def radius_parabola(grid, chi_full, model_idx):
    """LOGR_PARAB, LOGR_STD: vertex and 1/sqrt(2a) of a parabola through ln(chi) at 3 radii."""
    logr = grid.logr.values
    n = chi_full.shape[0]
    vertex, std = np.full(n, np.nan), np.full(n, np.nan)
    if logr.size < 3:
        return vertex, std
    cube = chi_full.reshape((n,) + grid.shape)
    centre = np.clip(model_idx[:, 3], 1, logr.size - 2)
    rows = np.arange(n)
    with np.errstate(divide="ignore", invalid="ignore"):
        y = np.log(np.stack([cube[rows, model_idx[:, 0], model_idx[:, 1], model_idx[:, 2], centre + k]
                             for k in (-1, 0, 1)], axis=1))
        step = grid.logr.step
        x1 = logr[centre]
        curvature = (y[:, 0] - 2 * y[:, 1] + y[:, 2])          # 2 a h^2 for y = a x^2 + b x + c
        a = curvature / (2 * step ** 2)
        vertex = x1 - step * (y[:, 2] - y[:, 0]) / (2 * curvature)
        std = 1.0 / np.sqrt(2 * a)
        x = np.stack([x1 - step, x1, x1 + step], axis=1)
    outside_models = (vertex < logr[0]) | (vertex > logr[-1]) | ~(a > 0)
    outside_window = (vertex < x[:, 0]) | (vertex > x[:, 2])
    best = logr[model_idx[:, 3]]
    vertex = np.where(outside_window, best, vertex)
    std = np.where(outside_window, np.nan, std)
    return np.where(outside_models, np.nan, vertex), np.where(outside_models, np.nan, std)


def edge_flags(grid, model_idx):
    """Flags for a best model on a bounded grid edge (the angle is periodic and has none)."""
    flags = np.zeros(model_idx.shape[0], dtype=np.int64)
    n_index, n_q, _, n_r = grid.shape
    if n_r > 1:
        flags |= np.where(model_idx[:, 3] == 0, int(FitFlag.EDGE_LOGR_MIN), 0)
        flags |= np.where(model_idx[:, 3] == n_r - 1, int(FitFlag.EDGE_LOGR_MAX), 0)
    if n_q > 1:
        flags |= np.where(model_idx[:, 1] == 0, int(FitFlag.EDGE_AX_RATIO_MIN), 0)
    if n_index > 1:
        on_edge = (model_idx[:, 0] == 0) | (model_idx[:, 0] == n_index - 1)
        flags |= np.where(on_edge, int(FitFlag.EDGE_INDEX), 0)
    return flags


def finite_std(values):
    """Standard deviation of each row's finite values (NaN for a row without any), in two passes
    over the row instead of nanstd's copies."""
    finite = np.isfinite(values)
    count = finite.sum(axis=1)
    x = np.where(finite, values, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = x.sum(axis=1) / count
        x -= np.where(finite, mean[:, None], 0.0)
        return np.sqrt(np.einsum("ij,ij->i", x, x) / count)


def summarize(grid, chi2_full, stat_full, best_full, posterior=None):
    """Catalogue columns of a batch.

    Parameters
    ----------
    grid : ModelGrid
    chi2_full : (N, grid.size) float64, chi-square surface for the posterior weights.
    stat_full : (N, grid.size) float64, the statistic's own surface (CHI and the original's columns).
    best_full : (N,) int, flat full-grid index of the chosen model.
    posterior : optional (N, grid.size) `posterior_weights` of ``chi2_full`` (computed if omitted).
    """
    model_idx = np.stack(np.unravel_index(best_full, grid.shape), axis=1)
    params = grid.parameters(best_full)
    cols = {"MODEL_IDX": model_idx.astype(np.int16)}
    cols.update({name: params[name] for name in ("INDEX", "LOGR", "AX_RATIO", "ANGLE")})
    rows = np.arange(best_full.size)
    cols["CHI"] = stat_full[rows, best_full]
    cols["CHI_STD"] = finite_std(stat_full)
    (cols["LOGR_CHI"], cols["LOGR_VAR"],
     cols["LOGR_CHI_VAR"]) = original_radius_statistics(grid, stat_full, params["LOGR"])
    cols["LOGR_PARAB"], cols["LOGR_STD"] = radius_parabola(grid, stat_full, model_idx)
    cols.update(surface_moments(grid, posterior if posterior is not None else posterior_weights(chi2_full)))
    cols["EDGE_FLAGS"] = edge_flags(grid, model_idx)
    return cols
