"""Sub-pixel centring: move each cutout so that its catalogue centre lands on the model centre.

We shift the *data* (not the models): the convolved cube is shared by all objects and cannot
be re-rendered per object. Each cutout is resampled with a separable Lanczos-3 kernel by its
own offset; the variance follows with the squared kernel (so the rms stays that of each
resampled pixel: interpolation averages noise down) and the mask follows with the nearest pixel.
Pixels whose interpolation touched a bad (non-finite) input pixel are marked bad.

``offsets[:, 0]`` is dy and ``offsets[:, 1]`` is dx: the object centre minus the model centre,
in cutout pixels. After the shift, the object centre is exactly on the model centre.
"""

from __future__ import annotations

LANCZOS_ORDER = 3


def _lanczos_taps(xp, frac, order=LANCZOS_ORDER):
    """Normalised weights (N, 2*order) for sampling at ``floor + frac`` from taps floor-order+1..floor+order."""
    t = xp.arange(-order + 1, order + 1, dtype=xp.float64)
    z = frac[:, None] - t[None, :]
    w = xp.sinc(z) * xp.sinc(z / order)
    return w / w.sum(axis=1, keepdims=True), t.astype(xp.int64)


def _gather(xp, images, index, axis):
    """images[n, ..., index[n, i], ...] along ``axis`` (1 = rows, 2 = columns), edge-clamped."""
    size = images.shape[axis]
    index = xp.clip(index, 0, size - 1)
    shape = (index.shape[0], size, 1) if axis == 1 else (index.shape[0], 1, size)
    return xp.take_along_axis(images, index.reshape(shape), axis=axis)


def _shift_axis(xp, images, delta, axis, squared=False):
    """Resample every image so that out[x] = in[x + delta] along one axis (Lanczos-3).

    With ``squared`` the kernel weights are squared: the propagation of a variance map.
    """
    base = xp.floor(delta)
    weights, taps = _lanczos_taps(xp, delta - base)
    if squared:
        weights = weights * weights
    coords = xp.arange(images.shape[axis], dtype=xp.int64)
    start = coords[None, :] + base.astype(xp.int64)[:, None]
    out = xp.zeros_like(images)
    for k in range(taps.shape[0]):
        w = weights[:, k].astype(images.dtype)
        w = w[:, None, None]
        out += w * _gather(xp, images, start + int(taps[k]), axis)
    return out


def _shift_nearest(xp, images, delta, axis):
    """out[x] = in[x + round(delta)] along one axis, edge-clamped (for masks)."""
    coords = xp.arange(images.shape[axis], dtype=xp.int64)
    index = coords[None, :] + xp.rint(delta).astype(xp.int64)[:, None]
    return _gather(xp, images, index, axis)


def centre_cutouts(xp, data, rms, mask, bad, offsets):
    """Shift data, rms, mask and the bad-pixel map of a batch by their offsets.

    Parameters
    ----------
    data, rms : (N, H, W) float arrays, non-finite values already replaced by 0 (see ``bad``).
    mask : (N, H, W) bool, the object's mask.
    bad : (N, H, W) bool, pixels that must not be used (non-finite or non-positive rms).
    offsets : (N, 2) float array (dy, dx); rows with zero offset are left untouched in effect.

    Returns
    -------
    data, rms, mask, bad : shifted arrays of the same shapes and dtypes.
    """
    dy, dx = offsets[:, 0], offsets[:, 1]
    badf = bad.astype(data.dtype)
    var = rms * rms
    for delta, axis in ((dy, 1), (dx, 2)):
        data = _shift_axis(xp, data, delta, axis)
        var = _shift_axis(xp, var, delta, axis, squared=True)
        badf = _shift_axis(xp, badf, delta, axis)
        mask = _shift_nearest(xp, mask, delta, axis)
    return data, xp.sqrt(var), mask, xp.abs(badf) > 1e-3
