"""The fit statistics, written once against an array namespace ``xp`` (NumPy or CuPy).

Shapes: a group of N objects with P pixels each (the first P radial pixels of the stamp, see
`model_matrix`); the convolved model matrix ``models`` is pixel-major (P, K) for K unique models,
unit total flux each.

* ``wls``: weighted least squares with the amplitude solved per model (clamped at >= 0).
  With A = (w d) @ M, B = w @ M^2 and C = sum w d^2, the minimum over the amplitude is
  chi2_k = C - max(A_k, 0)^2 / B_k: two matrix products per batch, in float32. The chosen
  model is re-checked among the best candidates with A, B and C summed in float64, because the
  float32 difference loses digits at high S/N (float64 keeps 9 digits of chi2 at S/N 10^4).
* ``dre``: the original DRE statistic (flux matching inside the mask and a model-dependent
  variance), computed over the mask's pixels only and vectorised over the models.
"""

from __future__ import annotations

#: Most float32 candidates re-evaluated in float64 per object.
RECHECK_CANDIDATES = 4
#: Float32 chi-squares further than this fraction of C = sum w d^2 above an object's smallest are
#: not re-checked: the float32 products' rounding moved chi2 by at most 6.6e-6 C over the default
#: cube (own and full-stamp masks, S/N 50 to 10^4; `tests/test_recheck.py` measures it), 15x less;
#: stopping the products at the models' supports (`wls_chi2`'s blocks) adds nothing within 1e-3 C
#: of the minimum, and at most 5e-5 C far from it.
RECHECK_TOLERANCE = 1e-4


def wls_chi2(xp, data, weights, models, models_sq, blocks=None):
    """Chi-square of every model for every object, amplitude fitted and clamped at zero.

    Parameters
    ----------
    data, weights : (N, P) float32 arrays; weights are 1/variance, 0 outside the usable mask.
    models, models_sq : (P, K) float32 arrays: the models and their element-wise squares.
    blocks : optional ``[(k0, k1, rows), ...]`` covering the K models in order
        (`ModelMatrix.column_blocks`): the products of the models ``k0:k1`` stop at their first
        ``rows`` pixels, beyond which they hold at most `models.grid.SUPPORT_TAIL` of their sum of
        squares (as the sub-grid window's products do). Near an object's minimum that changes
        nothing beyond the float32 rounding; far from it (a small model against a large galaxy) a
        chi-square moves by at most about 5e-5 C, half `RECHECK_TOLERANCE`. The chosen model is
        re-summed over every pixel (`recheck_wls`).

    Returns
    -------
    chi2 : (N, K) float32, ``inf`` where a model has no flux on the usable pixels.
    amplitude : (N, K) float32, the best non-negative amplitude of each model.
    """
    wd = weights * data
    if blocks is None or len(blocks) == 1:
        a = wd @ models
        b = weights @ models_sq
    else:
        a = xp.empty((data.shape[0], models.shape[1]), dtype=xp.float32)
        b = xp.empty_like(a)
        for k0, k1, rows in blocks:
            a[:, k0:k1] = wd[:, :rows] @ models[:rows, k0:k1]
            b[:, k0:k1] = weights[:, :rows] @ models_sq[:rows, k0:k1]
    c = (wd * data).sum(axis=1, dtype=xp.float64).astype(xp.float32)
    has_flux = b > 0
    safe_b = xp.where(has_flux, b, 1)
    amplitude = xp.where(has_flux, xp.maximum(a, 0) / safe_b, 0)
    chi2 = c[:, None] - amplitude * xp.maximum(a, 0)
    chi2 = xp.where(has_flux, chi2, xp.inf)
    return chi2, amplitude


def amplitude_error(xp, b):
    """1-sigma error of a least-squares amplitude, 1 / sqrt(sum w m^2); inf where the model has no weight."""
    return xp.where(b > 0, 1 / xp.sqrt(xp.where(b > 0, b, 1)), xp.inf)


def recheck_wls(xp, data, weights, models, chi2, candidates=RECHECK_CANDIDATES, tolerance=RECHECK_TOLERANCE,
                models_major=None):
    """Pick the best model among the float32 best candidates with chi-squares summed in float64.

    ``models`` is the (P, K) pixel-major matrix of `wls_chi2`; ``models_major``, optional, its
    (K, >= P) model-major copy, from which the candidates' models are read as contiguous rows
    (stamp-filling masks: 0.45 -> 0.2 ms/object). The candidates of an object are its
    at most ``candidates`` smallest float32 chi-squares within ``tolerance * C`` of its smallest:
    float32 rounding moves a chi-square by far less (see `RECHECK_TOLERANCE`), so a model beyond
    that cannot be the float64 best and is not re-summed.

    Returns
    -------
    best : (N,) int, unique-model index of the best model.
    chi2_best : (N,) float64, its chi-square.
    amplitude, amplitude_err : (N,) float64, its least-squares amplitude (>= 0) and 1-sigma error.
    """
    n_obj, n_models = chi2.shape
    k = min(candidates, n_models)
    w = weights.astype(xp.float64)
    wd = w * data.astype(xp.float64)
    c = (wd * data).sum(axis=1)
    low = chi2.min(axis=1).astype(xp.float64)
    near = chi2 <= (low + tolerance * xp.abs(c)).astype(chi2.dtype)[:, None]
    crowded = xp.flatnonzero(near.sum(axis=1) > k)
    if crowded.size:                             # more near-ties than candidates: the k smallest
        top = xp.argpartition(chi2[crowded], k - 1, axis=1)[:, :k]
        near[crowded] = False
        near[crowded[:, None], top] = True
    rows, cols = xp.nonzero(near)                # object-major, every object at least once
    counts = near.sum(axis=1)
    rank = xp.arange(rows.size) - (xp.cumsum(counts) - counts)[rows]
    final = xp.argsort(rank, kind="stable")     # by candidate rank: rank 0 is every object in order
    if models_major is not None:                # contiguous rows of the model-major copy
        m = models_major[cols[final], :data.shape[1]]                           # (pairs, P)
    else:
        # gathered in column order (each row of the pixel-major matrix read forwards: 6x faster at
        # full stamps than in object order), then transposed into the final order in one copy
        by_col = xp.argsort(cols, kind="stable")
        where = xp.empty_like(by_col)
        where[by_col] = xp.arange(by_col.size)
        m = xp.take(models, cols[by_col], axis=1).T[where[final]]              # (pairs, P)
    rows, cols, rank = rows[final], cols[final], rank[final]
    a, b = xp.empty(rows.size), xp.empty(rows.size)
    a[:n_obj] = xp.einsum("ip,ip->i", wd, m[:n_obj])
    b[:n_obj] = xp.einsum("ip,ip,ip->i", w, m[:n_obj], m[:n_obj])
    if rows.size > n_obj:                        # the second and later candidates of some objects
        r, mm = rows[n_obj:], m[n_obj:]
        a[n_obj:] = xp.einsum("ip,ip->i", wd[r], mm)
        b[n_obj:] = xp.einsum("ip,ip,ip->i", w[r], mm, mm)
    a = xp.maximum(a, 0)
    has_flux = b > 0
    amp = xp.where(has_flux, a / xp.where(has_flux, b, 1), 0)
    # C - A^2/B in float64: the cancellation that float32 cannot afford costs nothing here
    chi = xp.where(has_flux, c[rows] - amp * a, xp.inf)
    table = xp.full((k, n_obj), -1)              # the pair of each object's rank-j candidate
    table[rank, rows] = xp.arange(rows.size)
    score = xp.where(table >= 0, chi[table], xp.inf)
    first = table[xp.argmin(score, axis=0), xp.arange(n_obj)]
    return cols[first], chi[first], amp[first], amplitude_error(xp, b[first])


def dre_chi_one(xp, data, rms, pixels, models, row_min=None):
    """The original DRE statistic of one object against every model, on the mask's pixels.

    ``s_k = sum_S d / sum_S m_k``; ``chi_k = mean_S (d - s_k m_k)^2 / (s_k m_k + rms^2)`` over
    the finite terms (the original's nanmean). Float32 terms and block sums, float64 across
    blocks; computed on the pixel-major (P, K) model matrix in cache-sized blocks of pixels
    (see `dre_kernel`); models whose sum is not finite, or whose denominator can cancel (a negative
    model pixel, found through ``row_min``), are redone in float64.

    Parameters
    ----------
    data, rms : (P,) float32 arrays of the object (flattened cutout), finite on ``pixels``.
    pixels : (S,) int array, the mask's usable pixels (rows of ``models``), ascending.
    models : (P, K) float32 C-contiguous pixel-major convolved models.
    row_min : optional (P,) minimum of each row of ``models`` (`ModelMatrix.row_min`).

    Returns
    -------
    chi : (K,) float32 (NaN where undefined); scale : (K,) float32 (the s_k).
    """
    from .dre_kernel import dre_chi_t
    return dre_chi_t(xp, data, rms, pixels, models, row_min=row_min)
