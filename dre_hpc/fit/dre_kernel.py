"""Fast kernel of the original DRE statistic (``--statistic dre``), written against ``xp``.

The statistic has a model-dependent denominator, so it cannot be reduced to matrix products: every
(pixel, model) term must be computed. What costs time is *reaching* the mask's pixels of every model:
gathering ``models[:, pixels]`` from the (K, P) matrix touches a few cache lines in each of K rows of
64 kB (about 5 ns per element, cache and TLB misses). The kernel therefore works on the transposed
matrix (P, K), where the mask's pixels are S contiguous rows of K values (about 50x faster to
gather), and works through them in blocks of rows that stay in the L2 cache, with in-place ufuncs
into preallocated buffers:

1. gather the S rows (all at once when they fit in `GATHER_BYTES`, else block by block, twice);
   column sums of the models over the mask (float32 within a block, float64 across blocks);
2. per block: ``u = s m``; ``r = (d - u)^2``; ``u += rms^2``; ``r /= u``; sum over the block's rows
   (float32 within the block, float64 across blocks).

No ``isfinite``/``where`` pass is made: a model whose total is finite had only finite terms (a
non-finite term makes the sum non-finite), and the rare models with a non-finite total are
recomputed exactly, in float64, skipping the non-finite terms.

The transposed copy (as large as the model matrix) is made once per model matrix and cached
(:func:`transposed_models`); a caller that owns the matrix can pass it in instead.
"""

from __future__ import annotations

import threading
import weakref

#: Target size in bytes of one (rows, K) float32 work buffer on NumPy: two such buffers in L2.
BLOCK_BYTES = 256 * 1024
#: Largest (S, K) float32 gather kept whole (the mask's pixels of all models gathered once); larger
#: masks are gathered block by block, twice (once for the model sums, once for the terms).
GATHER_BYTES = 24 * 1024 * 1024
#: Pixels per block on other backends (GPU): float32 partial sums over at most this many terms.
GPU_BLOCK_ROWS = 1024

_lock = threading.RLock()                 # re-entrant: a finalizer may run inside
_cache = {"ref": None, "strong": None, "key": None, "value": None}


def _identity(models):
    """(owner, key): the array that owns the memory of ``models`` and its layout (NumPy or CuPy).

    Views of one buffer with the same layout share a key, so every `ModelMatrix` built on the same
    convolved cube (one per `for_psf` call) reuses one transposed copy.
    """
    owner = models
    while isinstance(getattr(owner, "base", None), type(models)):
        owner = owner.base
    ptr = getattr(getattr(models, "data", None), "ptr", None)      # CuPy
    if ptr is None:
        ptr = models.__array_interface__["data"][0]                # NumPy
    return owner, (tuple(models.shape), tuple(models.strides), str(models.dtype), int(ptr))


def transposed_models(xp, models):
    """The (P, K) C-contiguous copy of a (K, P) model matrix, cached for the last matrix seen.

    The cache holds a weak reference to the array that owns the memory of ``models`` where the
    array type allows it (a strong one otherwise) and compares the layout and data address, so
    a copy is reused only while that memory is alive and never served for another matrix. The
    model matrix must not be modified in place once it has been seen here.
    """
    owner, key = _identity(models)
    with _lock:
        ref, strong = _cache["ref"], _cache["strong"]
        cached = strong if strong is not None else (ref() if ref is not None else None)
        if cached is owner and _cache["key"] == key:
            return _cache["value"]
        _cache.update(ref=None, strong=None, key=None, value=None)    # free the old copy first
        value = xp.ascontiguousarray(models.T)
        try:
            _cache.update(ref=weakref.ref(owner), strong=None)
            weakref.finalize(owner, _forget, key)               # free the copy with the models
        except TypeError:
            _cache.update(ref=None, strong=owner)
        _cache.update(key=key, value=value)
        return value


def _forget(key):
    with _lock:
        if _cache["key"] == key:
            _cache.update(ref=None, strong=None, key=None, value=None)


def clear_cache():
    """Drop the cached transposed matrix."""
    with _lock:
        _cache.update(ref=None, strong=None, key=None, value=None)


def _block_rows(xp, n_models, n_pixels):
    if xp.__name__ != "numpy":                              # GPU: few, large kernels
        return GPU_BLOCK_ROWS
    return max(8, BLOCK_BYTES // (4 * max(n_models, 1)))


def _exact_columns(xp, d, var, m, scale):
    """float64 chi of a few models (m: (S, n)), the mean over the finite terms; NaN if none."""
    d = d.astype(xp.float64)[:, None]
    u = m.astype(xp.float64) * scale.astype(xp.float64)[None, :]
    with _errstate(xp):
        terms = (d - u) ** 2 / (u + var.astype(xp.float64)[:, None])
    finite = xp.isfinite(terms)
    count = finite.sum(axis=0)
    total = xp.where(finite, terms, 0).sum(axis=0)
    return xp.where(count > 0, total / xp.maximum(count, 1), xp.nan)


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


def dre_chi_t(xp, data, rms, pixels, models_t, block_rows=None):
    """The original DRE statistic of one object against every model, from the (P, K) matrix.

    Parameters
    ----------
    data, rms : (P,) float32 arrays of the object (flattened cutout); finite on ``pixels``.
    pixels : (S,) int array, flat indices of the mask's usable pixels.
    models_t : (P, K) float32 C-contiguous, the transposed convolved models.
    block_rows : int, optional; pixels per block (default: a block of about `BLOCK_BYTES`).

    Returns
    -------
    chi : (K,) float32 (NaN where no term is finite); scale : (K,) float32 (the s_k).
    """
    n_pix, n_models = int(pixels.shape[0]), int(models_t.shape[1])
    f32, f64 = xp.float32, xp.float64
    d = data[pixels].astype(f32, copy=False)
    var = rms[pixels].astype(f32, copy=False)
    var = var * var
    if n_pix == 0:
        return xp.full(n_models, xp.nan, dtype=f32), xp.full(n_models, xp.nan, dtype=f32)
    rows = min(block_rows or _block_rows(xp, n_models, n_pix), n_pix)
    numpy = xp.__name__ == "numpy"
    take_kw = {"mode": "clip"} if numpy else {}             # NumPy buffers `out` with mode='raise'
    whole = n_pix * n_models * 4 <= GATHER_BYTES           # gather once, else twice per block
    gathered = xp.empty((n_pix if whole else rows, n_models), dtype=f32)
    res = xp.empty((rows, n_models), dtype=f32)
    part = xp.empty(n_models, dtype=f32)
    acc = xp.zeros(n_models, dtype=f64)
    starts = range(0, n_pix, rows)
    if whole:
        xp.take(models_t, pixels, axis=0, out=gathered, **take_kw)

    def block(i, j):
        if whole:
            return gathered[i:j]
        g = gathered[: j - i]
        xp.take(models_t, pixels[i:j], axis=0, out=g, **take_kw)
        return g

    with _errstate(xp):
        for i in starts:                                      # pass 1: sum_S m_k
            j = min(i + rows, n_pix)
            block(i, j).sum(axis=0, out=part)
            acc += part
        scale = (d.sum(dtype=f64) / acc).astype(f32)
        acc[...] = 0
        for i in starts:                                      # pass 2: sum_S (d - s m)^2 / (s m + v)
            j = min(i + rows, n_pix)
            g, r = block(i, j), res[: j - i]
            xp.multiply(g, scale[None, :], out=g)             # u = s m (in place)
            xp.subtract(d[i:j, None], g, out=r)               # d - u
            xp.multiply(r, r, out=r)
            xp.add(g, var[i:j, None], out=g)                  # u + rms^2
            xp.divide(r, g, out=r)
            r.sum(axis=0, out=part)
            acc += part
        chi = acc / n_pix
        bad = xp.flatnonzero(~xp.isfinite(chi))
        if bad.size:                                          # rare: a term was not finite
            m = models_t[pixels[:, None], bad[None, :]]
            chi[bad] = _exact_columns(xp, d, var, m, scale[bad])
    return chi.astype(f32), scale
