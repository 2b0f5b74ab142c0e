"""A group's pixels as the fit uses them, centred and in radial order: one compiled pass per object.

`engine.prepare_group` cuts a window out of each stamp, shifts it (`centering.centre_cutouts`:
Lanczos-3 along y, then x, for the data, the variance and the bad-pixel map; the nearest pixel
for the mask), gathers the first n radial pixels and forms the weights: a dozen array passes over
the whole window per group, each a few microseconds of NumPy overhead. On the NumPy backend
`centred_rows` does it per object over the box that holds those n pixels, with the same float32
operations in the same order, so that its values are the array code's to the bit (tested), and
`mask_extent` finds each centred mask's radial extent inside the mask's bounding box.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from .centering import LANCZOS_ORDER, _lanczos_taps
from .compiled import compile_in

TAPS = 2 * LANCZOS_ORDER


def _taps_y(src, w, dst):
    """``dst[y, x] = sum_k w[k] src[y + k, x]``, the taps in order (float32, as the array code)."""
    rows, cols = dst.shape
    for y in range(rows):
        for x in range(cols):
            acc = src[y, x] * w[0]
            for k in range(1, TAPS):
                acc += src[y + k, x] * w[k]
            dst[y, x] = acc


def _taps_x(src, w, dst):
    """``dst[y, x] = sum_k w[k] src[y, x + k]``, the taps in order (`_taps_y` along x: a loop of
    its own, so that both read contiguous rows)."""
    rows, cols = dst.shape
    for y in range(rows):
        for x in range(cols):
            acc = src[y, x] * w[0]
            for k in range(1, TAPS):
                acc += src[y, x + k] * w[k]
            dst[y, x] = acc


def _patch(plane, o, y0, x0, out):
    """``out``: the edge-clamped patch of ``plane[o]`` whose corner is (y0, x0); returns whether
    any value is nonzero. Unsigned indices: Numba then adds no negative-index branch, which would
    stop the vectorisation (4-7x slower)."""
    rows, cols = out.shape
    size = plane.shape[1]
    c0, c1 = max(-x0, 0), min(size - x0, cols)              # columns inside the stamp
    o, u0, edge = np.uint64(o), np.uint64(x0 + c0), np.uint64(size - 1)
    hit = False
    for t in range(rows):
        sy = np.uint64(min(max(y0 + t, 0), size - 1))
        for c in range(c1 - c0):
            v = plane[o, sy, u0 + np.uint64(c)]
            out[t, c0 + c] = v
            hit |= v != 0
        for c in range(c0):
            out[t, c] = plane[o, sy, np.uint64(0)]
        for c in range(c1, cols):
            out[t, c] = plane[o, sy, edge]
    return hit


def _centred_rows(data, rms, mask, bad, index, wy, wy2, wx, wx2, by, bx, ry, rx, rank, n, lo, box,
                  centre, min_pixels, d_out, r_out, u_out, w_out, npix_out):
    """Fill ``d_out, r_out, u_out, w_out`` (g, n) and ``npix_out`` (g,); see `centred_rows`. The
    pixels of rank < n lie in the box of side ``box`` at (lo, lo); they are visited in stamp order
    and written to their rank (reads in order: 2x faster than reading in radial order)."""
    g, size = index.shape[0], data.shape[1]
    span = box + TAPS - 1
    patch = np.empty((span, span), np.float32)
    half = np.empty((box, span), np.float32)                   # along y
    out_d = np.empty((box, box), np.float32)
    out_v = np.empty((box, box), np.float32)
    out_b = np.empty((box, box), np.float32)
    out_w = np.empty((box, box), np.float32)
    one, zero, tiny = np.float32(1.0), np.float32(0.0), np.float32(1e-3)
    badf = bad.view(np.uint8)
    for i in range(g):
        o = index[i]
        count = 0
        if not centre:
            uo = np.uint64(o)
            for y in range(lo, lo + box):
                for x in range(lo, lo + box):
                    k = rank[y, x]
                    if k < n:
                        uy, ux, uk = np.uint64(y), np.uint64(x), np.uint64(k)
                        r = rms[uo, uy, ux]
                        use = mask[uo, uy, ux] and not bad[uo, uy, ux]
                        d_out[i, uk], r_out[i, uk], u_out[i, uk] = data[uo, uy, ux], r, use
                        w_out[i, uk] = one / (r * r) if use else zero
                        count += use
        else:
            # the edge-clamped patch the taps read; along y, then x (the array code's float32 sums)
            y0, x0 = lo + by[i] - (LANCZOS_ORDER - 1), lo + bx[i] - (LANCZOS_ORDER - 1)
            _patch(data, o, y0, x0, patch)
            _taps_y(patch, wy[i], half)
            _taps_x(half, wx[i], out_d)
            _patch(rms, o, y0, x0, patch)
            for t in range(span):
                for c in range(span):
                    patch[t, c] = patch[t, c] * patch[t, c]
            _taps_y(patch, wy2[i], half)
            _taps_x(half, wx2[i], out_v)
            any_bad = _patch(badf, o, y0, x0, patch)         # 0 and 1, the array code's bad map
            if any_bad:
                _taps_y(patch, wy[i], half)
                _taps_x(half, wx[i], out_b)
            for yy in range(box):                               # rms and 1/rms^2, vectorised
                for xx in range(box):
                    r = np.sqrt(out_v[yy, xx])
                    out_v[yy, xx] = r
                    out_w[yy, xx] = one / (r * r)
            uo = np.uint64(o)
            for yy in range(box):
                my = np.uint64(min(max(lo + yy + ry[i], 0), size - 1))
                for xx in range(box):
                    k = rank[lo + yy, lo + xx]
                    if k < n:
                        uy, ux, uk = np.uint64(yy), np.uint64(xx), np.uint64(k)
                        use = mask[uo, my, np.uint64(min(max(lo + xx + rx[i], 0), size - 1))]
                        use = use and not (any_bad and abs(out_b[uy, ux]) > tiny)
                        d_out[i, uk], r_out[i, uk], u_out[i, uk] = out_d[uy, ux], out_v[uy, ux], use
                        w_out[i, uk] = out_w[uy, ux] if use else zero
                        count += use
        npix_out[i] = count
        if count < min_pixels:
            for j in range(n):
                w_out[i, j] = zero


def _mask_extent(mask, ry, rx, rank1, out):
    """``out[i]``: the largest ``rank1`` over the pixels of mask i moved by (ry, rx), 0 if none."""
    size = mask.shape[1]
    for i in range(mask.shape[0]):
        r0, r1, c0, c1 = size, -1, size, -1
        for y in range(size):
            hit = 0
            for x in range(size):
                hit |= mask[i, y, x]
            if hit:
                r0, r1 = min(r0, y), y
                for x in range(size):
                    if mask[i, y, x]:
                        c0 = min(c0, x)
                        break
                for x in range(size - 1, -1, -1):
                    if mask[i, y, x]:
                        c1 = max(c1, x)
                        break
        best = 0
        if r1 >= 0:
            # the output pixels whose (edge-clamped) source lies in the bounding box
            ya = 0 if r0 == 0 else max(r0 - ry[i], 0)
            yb = size - 1 if r1 == size - 1 else min(r1 - ry[i], size - 1)
            xa = 0 if c0 == 0 else max(c0 - rx[i], 0)
            xb = size - 1 if c1 == size - 1 else min(c1 - rx[i], size - 1)
            for y in range(ya, yb + 1):
                sy = min(max(y + ry[i], 0), size - 1)
                for x in range(xa, xb + 1):
                    if mask[i, sy, min(max(x + rx[i], 0), size - 1)] and rank1[y, x] > best:
                        best = rank1[y, x]
        out[i] = best


@lru_cache(maxsize=None)
def _kernels():
    """(`_centred_rows`, `_mask_extent`) compiled by Numba (a dependency), with their helpers."""
    return compile_in(globals(), "_taps_y", "_taps_x", "_patch", "_centred_rows", "_mask_extent")[3:]


def _shift_weights(delta):
    """float32 Lanczos weights (g, TAPS), their squares and the integer bases of shifts ``delta``."""
    base = np.floor(delta)
    w, _ = _lanczos_taps(np, delta - base)
    return w.astype(np.float32), (w * w).astype(np.float32), base.astype(np.int64)


def centred_rows(data, rms, mask, bad, offsets, index, pixels, boxsize, centre: bool, min_pixels: int):
    """Data, rms, usable map and weights (g, n) of the objects ``index`` of a cleaned batch at
    the stamp pixels ``pixels`` (flat, radial order), centred by ``offsets`` (N, 2) when
    ``centre``, and the (g,) usable pixel counts: `engine.prepare_group`'s values, compiled.
    Weights are 1/rms^2 on usable pixels, 0 elsewhere and for objects under ``min_pixels``."""
    index = np.ascontiguousarray(index, dtype=np.int64)
    pixels = np.asarray(pixels, dtype=np.int64)
    py, px = np.divmod(pixels, boxsize)
    lo = int(min(py.min(), px.min()))
    box = int(max(py.max(), px.max())) - lo + 1
    rank = np.full(boxsize * boxsize, len(pixels), np.int64)
    rank[pixels] = np.arange(len(pixels))
    off = offsets[index]
    wy, wy2, by = _shift_weights(off[:, 0])
    wx, wx2, bx = _shift_weights(off[:, 1])
    ry, rx = np.rint(off[:, 0]).astype(np.int64), np.rint(off[:, 1]).astype(np.int64)
    g, n = len(index), len(py)
    d, r, w = (np.empty((g, n), np.float32) for _ in range(3))
    usable, npix = np.empty((g, n), bool), np.empty(g, np.int64)
    _kernels()[0](data, rms, mask, np.ascontiguousarray(bad), index, wy, wy2, wx, wx2, by, bx, ry, rx,
                  rank.reshape(boxsize, boxsize), n, lo, box, centre, min_pixels, d, r, usable, w, npix)
    return d, r, usable, w, npix


def mask_extent(mask, offsets, rank, centre: bool):
    """(N,) number of radial rows that reach every pixel of each mask once centred (moved by the
    rounded offsets, edge-clamped, as `centering.shift_nearest` moves it); 0 for an empty mask."""
    size = mask.shape[1]
    shift = np.rint(offsets).astype(np.int64) if centre else np.zeros((len(mask), 2), np.int64)
    out = np.empty(len(mask), np.int64)
    _kernels()[1](np.ascontiguousarray(mask).view(np.uint8), shift[:, 0].copy(), shift[:, 1].copy(),
                  (rank + 1).reshape(size, size).astype(np.int64), out)
    return out
