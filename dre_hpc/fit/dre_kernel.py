"""Fast kernel of the original DRE statistic (``--statistic dre``), written against ``xp``.

For one object with usable pixels S and every model k of the pixel-major model matrix (P, K)::

    s_k = sum_S d / sum_S m_k ;   chi_k = mean_S (d - s_k m_k)^2 / (s_k m_k + rms^2)

The denominator depends on the model, so every (pixel, model) term is computed; with NumPy alone
the cost is the number of passes over the (S, K) terms, each about 0.1 ns per term (one core, L2
resident). Per block of pixels (`BLOCK_BYTES`, two float32 buffers that stay in L2):

1. model sums ``sum_S m_k``: a matrix-vector product (BLAS), float32 within a block, float64
   across blocks;
2. ``u = s m`` (the pass that reads the models); ``r = d - u``; ``u += rms^2``; ``r *= r``;
   ``r /= u``; the sum over the block's pixels by a matrix-vector product (float32 within the
   block, float64 across blocks). On NumPy these passes are one compiled sweep (`_terms`, Numba):
   the same float32 operations term for term, summed over the rows in float32 as before; CuPy
   runs the passes.

The rows of the matrix are in radial order, so an object's pixels lie in a prefix ``[0, n)`` of
rows and mostly fill it: a block of rows of which at least `DENSE_FRACTION` are pixels of S is
read in place (no gather), its other rows weighted 0 in both sums (and given data 0, variance
`_FAR` so that their terms stay finite); the pixels of the other blocks are gathered (``take``).

Not fewer passes: with ``w = s m + rms^2`` and ``a = d + rms^2`` the sum is algebraically
``sum_S a^2 / w - sum_S a`` (``sum_S s m = sum_S d``), three passes and a BLAS product, but the
two sums agree to many digits when the S/N is high or rms^2 is large in data units, and float32
loses them (5e-4 relative on the simulated S/N 50-200 cutouts, see
``benchmarks/bench_dre_kernel.py --variants``): the residual ``d - s m`` has to be formed. The
element-wise squares of the models (``models_sq_t``) are not needed.

NumPy specifics (numerically neutral, so the same code runs on CuPy and gives the same numbers
on any namespace for the same blocks): the ufunc buffer size is lowered inside the kernel
(`UFUNC_BUFSIZE`; NumPy's default makes the broadcasting passes twice as slow), and the scratch
buffers are kept per thread and reused (`_workspace`; fresh buffers of a few hundred kB cost
page faults on every call). At most about ``2 BLOCK_BYTES + GATHER_BYTES`` per thread.

Exact float64 re-do (rare): a model whose float32 chi is not finite (a non-finite term or
scale), or whose denominator ``s m + rms^2`` is ill-conditioned on a pixel of S (a negative model
value with ``s m < -ILL_CONDITIONED rms^2``: the float32 rounding of ``s`` and ``s m`` would be
amplified without bound), is recomputed in float64 from the float32 inputs, its scale summed in
float64, the mean taken over its finite terms (NaN if none): the original's ``nanmean``. Negative
model values are found with the per-row minimum of the matrix over the models, ``row_min``; a
caller that keeps the matrix computes it once (`model_row_min`) and passes it, otherwise the
kernel takes the minimum of the rows it reads (one more pass, about 12 % slower).
"""

from __future__ import annotations

import contextlib
import threading
from functools import lru_cache

import numpy as np

from .backend import to_host
from .compiled import njit, use_compiled

#: Target size in bytes of one (rows, K) float32 work buffer on NumPy (two of them stay in L2).
BLOCK_BYTES = 288 * 1024
#: Pixels per block on other backends (GPU): float32 partial sums over at most this many terms.
GPU_BLOCK_ROWS = 1024
#: Largest float32 gather of the sparse pixels' rows (all blocks) kept for both passes; beyond it
#: the sparse rows are gathered block by block, twice (once per pass).
GATHER_BYTES = 8 * 1024 * 1024
#: Largest float32 gather of the models redone in float64 (S x models); more models go in chunks.
REDO_BYTES = 32 * 1024 * 1024
#: A block of consecutive rows is used in place (rows outside S weighted 0) when at least this
#: fraction of its rows are pixels of S; otherwise its pixels are gathered.
DENSE_FRACTION = 0.6
#: A denominator s m + rms^2 with s m < -ILL_CONDITIONED * rms^2 is redone in float64: relative
#: float32 errors of s m are amplified by at most (1 + c) / (1 - c) = 3 elsewhere.
ILL_CONDITIONED = 0.5
#: NumPy's ufunc buffer size inside the kernel (elements, a multiple of 16). With the default
#: (8192) NumPy copies broadcast operands through its buffers when a row (K) is shorter than the
#: buffer, which doubles the cost of ``u = s m``, ``d - u`` and ``u + rms^2``.
UFUNC_BUFSIZE = 1024
#: Variance given to the rows of a dense block that are not in S (weight 0): keeps their terms
#: finite and far from ill-conditioned.
_FAR = 1e30

_local = threading.local()


def model_row_min(xp, models_t):
    """Per-row minimum over the models of a (P, K) matrix: the ``row_min`` of `dre_chi_t`.

    Compute it once per model matrix (one pass over it) and pass it with every object.
    """
    return xp.min(models_t, axis=1)


def _block_rows(xp, n_models, n_pixels):
    if xp.__name__ != "numpy":                              # GPU: few, large kernels
        return GPU_BLOCK_ROWS
    return max(8, BLOCK_BYTES // (4 * max(n_models, 1)))


class _errstate:
    """numpy.errstate(all='ignore') on NumPy; nothing on backends without floating-point traps."""

    def __init__(self, xp):
        self._inner = xp.errstate(all="ignore") if hasattr(xp, "errstate") else None

    def __enter__(self):
        if self._inner is not None:
            self._inner.__enter__()

    def __exit__(self, *exc):
        if self._inner is not None:
            return self._inner.__exit__(*exc)
        return False


@contextlib.contextmanager
def _ufunc_bufsize(size):
    """NumPy's ufunc buffer size set to ``size`` inside (context-local in NumPy 2, thread-local before)."""
    old = np.setbufsize(size)
    try:
        yield
    finally:
        np.setbufsize(old)


def _workspace(xp, name, shape):
    """A float32 scratch array of at least ``shape`` (leading axis grown), reused per thread on NumPy."""
    if xp.__name__ != "numpy":
        return xp.empty(shape, dtype=xp.float32)
    cache = getattr(_local, "buffers", None)
    if cache is None:
        cache = _local.buffers = {}
    buf = cache.get(name)
    if buf is None or buf.shape[1:] != tuple(shape[1:]) or buf.shape[0] < shape[0]:
        buf = cache[name] = np.empty(shape, dtype=np.float32)
    return buf[: shape[0]]


def _plan(px, n_rows, rows):
    """Split the sorted pixel indices ``px`` into dense row blocks and gathered pixels.

    The prefix ``[0, n_rows)`` is cut into blocks of ``rows`` rows; a block with at least
    `DENSE_FRACTION` of its rows in S is dense. Returns ``dense``, the (lo, hi) row ranges of the
    dense blocks, and ``sparse``, the positions in ``px`` of the other pixels (in order).
    """
    block = px // rows
    counts = np.bincount(block)
    sizes = np.full(counts.size, rows)
    sizes[-1] = n_rows - rows * (counts.size - 1)
    is_dense = counts >= DENSE_FRACTION * sizes
    starts = np.flatnonzero(is_dense) * rows
    dense = list(zip(starts.tolist(), np.minimum(starts + rows, n_rows).tolist()))
    return dense, np.flatnonzero(~is_dense[block])


def dre_chi_t(xp, data, rms, pixels, models_t, block_rows=None, row_min=None):
    """The original DRE statistic of one object against every model, from the (P, K) matrix.

    Parameters
    ----------
    data, rms : (P,) float32 arrays of the object (its pixels in the rows' order); finite on
        ``pixels``.
    pixels : (S,) int array, the usable pixels (row indices), sorted ascending (any order works,
        gathered, more slowly).
    models_t : (P, K) float32 C-contiguous model matrix, pixel-major (rows in radial order).
    block_rows : int, optional; pixels per block (default: a block of about `BLOCK_BYTES`).
    row_min : (P,) array, optional; ``models_t.min(axis=1)`` (see `model_row_min`), made once per
        matrix by the caller; without it the kernel takes the minimum of the rows it reads.

    Returns
    -------
    chi : (K,) float32 (NaN where no term is finite); scale : (K,) float32 (the s_k).
    """
    n_pix, n_models = int(pixels.shape[0]), int(models_t.shape[1])
    f32, f64 = xp.float32, xp.float64
    if n_pix == 0:
        return xp.full(n_models, xp.nan, dtype=f32), xp.full(n_models, xp.nan, dtype=f32)
    rows = max(1, min(int(block_rows or _block_rows(xp, n_models, n_pix)), n_pix))
    px = to_host(pixels).astype(np.int64, copy=False)
    if n_pix > 1 and not bool(np.all(px[1:] > px[:-1])):
        dense, sparse, n_rows = [], np.arange(n_pix), 0                      # unsorted: gather all
    else:
        n_rows = int(px[-1]) + 1
        dense, sparse = _plan(px, n_rows, rows)
    numpy = xp.__name__ == "numpy"
    take_kw = {"mode": "clip"} if numpy else {}             # NumPy buffers `out` with mode='raise'

    d = data[pixels].astype(f32, copy=False)
    var = rms[pixels].astype(f32, copy=False)
    var = var * var
    if dense:
        d_rows = xp.zeros(n_rows, dtype=f32)                 # data, variance and weight of each
        d_rows[pixels] = d                                   # row of the prefix; rows outside S:
        v_rows = xp.full(n_rows, _FAR, dtype=f32)            # data 0, variance _FAR, weight 0
        v_rows[pixels] = var
        w_rows = xp.zeros(n_rows, dtype=f32)
        w_rows[pixels] = 1
        d_col, v_col = d_rows[:, None], v_rows[:, None]
    n_sparse = int(sparse.size)
    if n_sparse:
        if n_sparse == n_pix:
            sp_pixels, d_sp, v_sp = pixels, d, var
        else:
            sp_index = xp.asarray(sparse)
            sp_pixels, d_sp, v_sp = pixels[sp_index], d[sp_index], var[sp_index]
        d_sp_col, v_sp_col = d_sp[:, None], v_sp[:, None]
    sparse_blocks = [(i, min(i + rows, n_sparse)) for i in range(0, n_sparse, rows)]
    n_blocks = len(dense) + len(sparse_blocks)
    keep = 0 < n_sparse and n_sparse * n_models * 4 <= GATHER_BYTES
    ones = xp.ones(rows, dtype=f32)
    want_min = row_min is None

    with _ufunc_bufsize(UFUNC_BUFSIZE), _errstate(xp):
        u_buf = _workspace(xp, "u", (rows, n_models))
        r_buf = _workspace(xp, "r", (rows, n_models))
        parts = _workspace(xp, "parts", (n_blocks, n_models))
        gathered = _workspace(xp, "gathered", (n_sparse, n_models)) if keep else None
        if keep:
            xp.take(models_t, sp_pixels, axis=0, out=gathered, **take_kw)
        if want_min:
            mins = []                                        # (pixels' positions, row minima)

        def sparse_block(i, j):
            if keep:
                return gathered[i:j]
            g = u_buf[: j - i]
            xp.take(models_t, sp_pixels[i:j], axis=0, out=g, **take_kw)
            return g

        # -- pass 1: sum_S m_k --------------------------------------------------------------------
        b = 0
        for lo, hi in dense:
            block = models_t[lo:hi]
            xp.dot(w_rows[lo:hi], block, out=parts[b])
            if want_min:
                mins.append((lo, hi, xp.min(block, axis=1)))
            b += 1
        for i, j in sparse_blocks:
            block = sparse_block(i, j)
            xp.dot(ones[: j - i], block, out=parts[b])
            if want_min:
                mins.append((i, j, xp.min(block, axis=1)))
            b += 1
        total = parts.astype(f64).sum(axis=0)
        scale = (d.astype(f64).sum() / total).astype(f32)

        # -- pass 2: sum_S (d - s m)^2 / (s m + rms^2) --------------------------------------------
        fused = _compiled_terms() if use_compiled(xp) else None

        def block_terms(m, d_c, v_c, weight, u, out):
            """sum over the block's rows of weight * (d - s m)^2 / (s m + rms^2), into `out`."""
            if fused is not None:
                fused(m, scale, d_c[:, 0], v_c[:, 0], weight, out)
                return
            r = r_buf[: m.shape[0]]
            xp.multiply(m, scale[None, :], out=u)                  # u = s m
            xp.subtract(d_c, u, out=r)                             # d - u
            xp.add(u, v_c, out=u)                                  # u + rms^2
            xp.multiply(r, r, out=r)
            xp.divide(r, u, out=r)
            xp.dot(weight, r, out=out)

        b = 0
        for lo, hi in dense:
            block_terms(models_t[lo:hi], d_col[lo:hi], v_col[lo:hi], w_rows[lo:hi], u_buf[: hi - lo],
                        parts[b])
            b += 1
        for i, j in sparse_blocks:
            block = sparse_block(i, j)                             # (gathered rows: used up)
            block_terms(block, d_sp_col[i:j], v_sp_col[i:j], ones[: j - i], block, parts[b])
            b += 1
        chi = parts.astype(f64).sum(axis=0) / n_pix

        # -- exact re-do of the non-finite and the ill-conditioned models -------------------------
        if want_min:
            row_min_s = _row_min_of_pixels(xp, mins, dense, n_rows, pixels, sparse, n_sparse, n_pix)
        else:
            row_min_s = row_min[pixels].astype(f32, copy=False)
        redo = _ill_conditioned(xp, models_t, pixels, var, scale, row_min_s)
        redo |= ~xp.isfinite(chi)
        bad = xp.flatnonzero(redo)
        if bad.size:
            chi_bad, scale_bad = _exact_columns(xp, data, rms, pixels, models_t, bad)
            chi[bad] = chi_bad
            scale[bad] = scale_bad.astype(f32)
        return chi.astype(f32), scale                       # (beyond float32: inf, no warning)


def _terms(m, scale, d, var, weight, out):
    """``out[k] = sum_i weight_i (d_i - s_k m_ik)^2 / (s_k m_ik + var_i)``: pass 2 of a block in one
    sweep, compiled by Numba (`_compiled_terms`); float32 like the NumPy passes, term for term."""
    rows, n = m.shape
    for k in range(n):
        out[k] = 0.0
    for i in range(rows):
        w_i, d_i, v_i = weight[i], d[i], var[i]
        if w_i == 0:
            continue
        for k in range(n):
            u = m[i, k] * scale[k]
            r = d_i - u
            out[k] += w_i * (r * r / (u + v_i))


@lru_cache(maxsize=None)
def _compiled_terms():
    """`_terms` compiled by Numba for the NumPy backend (about 0.5 s on first use), or None without
    Numba. The five NumPy passes per term become one vectorised sweep: pass 2 about 7x faster
    (`benchmarks/bench_dre_kernel.py`)."""
    return njit(_terms)


def _row_min_of_pixels(xp, mins, dense, n_rows, pixels, sparse, n_sparse, n_pix):
    """(S,) row minima of the models at the pixels, from the minima taken in pass 1."""
    f32 = xp.float32
    out = xp.empty(n_pix, dtype=f32)
    if dense:
        prefix = xp.zeros(n_rows, dtype=f32)
        for lo, hi, m in mins[: len(dense)]:
            prefix[lo:hi] = m
        out[...] = prefix[pixels]
    if n_sparse:
        sp = xp.concatenate([m for _, _, m in mins[len(dense):]])
        if n_sparse == n_pix:
            out[...] = sp
        else:
            out[xp.asarray(sparse)] = sp
    return out


def _ill_conditioned(xp, models_t, pixels, var, scale, row_min_s):
    """(K,) bool: models with ``s m < -ILL_CONDITIONED rms^2`` on a pixel of S, or a negative scale.

    A pixel can have such a model only if its most negative model value times the largest finite
    scale is below the bound; only those pixels (usually none) are checked model by model.
    """
    negative = scale < 0
    if float(xp.min(row_min_s)) >= 0:
        return negative
    s_max = float(xp.max(xp.where(xp.isfinite(scale), scale, 0)))
    limit = -ILL_CONDITIONED * var
    rows = xp.flatnonzero(s_max * row_min_s < limit)
    if rows.size == 0:
        return negative
    u = models_t[pixels[rows]] * scale[None, :]
    return negative | (u < limit[rows][:, None]).any(axis=0)


def _exact_columns(xp, data, rms, pixels, models_t, cols):
    """float64 chi and scale of the models ``cols``: the mean over the finite terms; NaN if none.

    The scale is summed in float64 too. The models' values on S are gathered once (float32, at
    most `REDO_BYTES` at a time: models in chunks), reading each row of S once per chunk.
    """
    f32, f64 = xp.float32, xp.float64
    d = data[pixels].astype(f64)
    var = rms[pixels].astype(f64) ** 2
    d_sum = d.sum()
    n_pix, n_cols = int(pixels.shape[0]), int(cols.shape[0])
    chunk = max(1, min(n_cols, REDO_BYTES // (4 * n_pix)))
    step = 256
    chi = xp.empty(n_cols, dtype=f64)
    scale = xp.empty(n_cols, dtype=f64)
    for c0 in range(0, n_cols, chunk):
        c = cols[c0:c0 + chunk]
        width = int(c.shape[0])
        g = xp.empty((n_pix, width), dtype=f32)
        for i in range(0, n_pix, 64):
            g[i:i + 64] = xp.take(models_t[pixels[i:i + 64]], c, axis=1)
        total = xp.zeros(width, dtype=f64)
        for i in range(0, n_pix, step):
            total += g[i:i + step].astype(f64).sum(axis=0)
        s = d_sum / total
        acc = xp.zeros(width, dtype=f64)
        for i in range(0, n_pix, step):
            acc += _terms64(xp, g[i:i + step], s, d[i:i + step], var[i:i + step]).sum(axis=0)
        count = xp.full(width, float(n_pix))
        redo = xp.flatnonzero(~xp.isfinite(acc))
        if redo.size:                                        # skip the non-finite terms
            s_redo = s[redo]
            acc[redo] = 0
            count[redo] = 0
            for i in range(0, n_pix, step):
                terms = _terms64(xp, g[i:i + step][:, redo], s_redo, d[i:i + step], var[i:i + step])
                finite = xp.isfinite(terms)
                acc[redo] += xp.where(finite, terms, 0).sum(axis=0)
                count[redo] += finite.sum(axis=0)
        chi[c0:c0 + chunk] = xp.where(count > 0, acc / xp.maximum(count, 1), xp.nan)
        scale[c0:c0 + chunk] = s
    return chi, scale


def _terms64(xp, m, s, d, var):
    """(rows, n) float64 terms (d - s m)^2 / (s m + rms^2) from float32 model values ``m``."""
    u = m.astype(xp.float64)
    u *= s[None, :]
    r = d[:, None] - u
    u += var[:, None]
    r *= r
    r /= u
    return r
