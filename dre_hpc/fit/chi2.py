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

#: Number of best float32 candidates re-evaluated in float64 per object.
RECHECK_CANDIDATES = 4


def wls_chi2(xp, data, weights, models, models_sq):
    """Chi-square of every model for every object, amplitude fitted and clamped at zero.

    Parameters
    ----------
    data, weights : (N, P) float32 arrays; weights are 1/variance, 0 outside the usable mask.
    models, models_sq : (P, K) float32 arrays: the models and their element-wise squares.

    Returns
    -------
    chi2 : (N, K) float32, ``inf`` where a model has no flux on the usable pixels.
    amplitude : (N, K) float32, the best non-negative amplitude of each model.
    """
    wd = weights * data
    a = wd @ models
    b = weights @ models_sq
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


def recheck_wls(xp, data, weights, models, chi2, candidates=RECHECK_CANDIDATES):
    """Pick the best model among the float32 top candidates with chi-squares summed in float64.

    ``models`` is the (P, K) pixel-major matrix of `wls_chi2`.

    Returns
    -------
    best : (N,) int, unique-model index of the best model.
    chi2_best : (N,) float64, its chi-square.
    amplitude, amplitude_err : (N,) float64, its least-squares amplitude (>= 0) and 1-sigma error.
    """
    n_obj, n_models = chi2.shape
    k = min(candidates, n_models)
    top = xp.argsort(chi2, axis=1)[:, :k] if k == n_models else \
        xp.argpartition(chi2, k - 1, axis=1)[:, :k]
    w = weights.astype(xp.float64)
    wd = w * data.astype(xp.float64)
    c = (wd * data).sum(axis=1)
    # every candidate column in one pass over the rows (a row-wise gather reads each row once),
    # and the objects' weights pixel-major too, so that every product below runs along rows
    cand = xp.take(models, top.T.ravel(), axis=1)                           # (P, k * N)
    w_t, wd_t = xp.ascontiguousarray(w.T), xp.ascontiguousarray(wd.T)       # (P, N)
    chi, amp, b = (xp.empty((n_obj, k)) for _ in range(3))
    for j in range(k):
        m = cand[:, j * n_obj:(j + 1) * n_obj]                              # (P, N): object i's column i
        a = xp.einsum("pi,pi->i", wd_t, m)
        b[:, j] = xp.einsum("pi,pi,pi->i", w_t, m, m)
        has_flux = b[:, j] > 0
        amp[:, j] = xp.where(has_flux, xp.maximum(a, 0) / xp.where(has_flux, b[:, j], 1), 0)
        # C - A^2/B in float64: the cancellation that float32 cannot afford costs nothing here
        chi[:, j] = xp.where(has_flux, c - amp[:, j] * xp.maximum(a, 0), xp.inf)
    pick = xp.argmin(chi, axis=1)
    rows = xp.arange(n_obj)
    b_best = b[rows, pick]
    return top[rows, pick], chi[rows, pick], amp[rows, pick], amplitude_error(xp, b_best)


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
