"""PSF convolution of a model cube.

The convolution is *linear* (no wrap-around): stamps and PSF are zero padded to an FFT length of
at least ``B + p // 2`` per axis (rounded up with :func:`scipy.fft.next_fast_len`), which is the
least length for which no circular alias reaches the kept ``B x B`` window, then cropped back.
The PSF centre (pixel ``(p // 2)`` per axis, see :mod:`dre_hpc.models.psf`) is rolled to index 0,
so a model centred on stamp pixel ``[B // 2, B // 2]`` stays centred there.

The convolved models are held, laid out for the fit and cached on disk by
:class:`dre_hpc.fit.model_matrix.NodeModels`.
"""

from __future__ import annotations

import hashlib
import logging

import numpy as np
import scipy.fft

log = logging.getLogger(__name__)

#: Stamps per FFT block: bounds the temporary complex arrays (about 80 kB per 128x128 stamp);
#: small blocks stay in the CPU caches (16 measured fastest on 2 cores).
DEFAULT_BLOCK = 16
#: Bumped whenever the convolution changes, so that stale disk caches are not reused.
ALGORITHM_VERSION = "linear-fft-v1"


def _axis_window(stamp_side: int, psf_side: int) -> tuple:
    """(first, stop, centre) of the PSF pixels along one axis that can reach a kept stamp pixel.

    Offsets from the PSF centre ``psf_side // 2`` beyond ``stamp_side - 1`` never connect two
    pixels of one stamp, so they are dropped (this matters only for PSFs larger than the stamp);
    `centre` is the PSF centre's index inside the window.
    """
    centre = psf_side // 2
    first = max(0, centre - (stamp_side - 1))
    stop = min(psf_side, centre + stamp_side)
    return first, stop, centre - first


def fft_shape(stamp_shape, psf_shape) -> tuple:
    """FFT size per axis that makes the cropped circular convolution equal the linear one.

    With PSF offsets ``-c .. p-1-c`` no alias reaches stamp pixels ``0 .. B-1`` when the length
    is at least ``B + max(c, p-1-c)`` (``B + p // 2`` for a PSF centred on ``p // 2``).
    """
    shape = []
    for b, p in zip(stamp_shape, psf_shape):
        first, stop, c = _axis_window(int(b), int(p))
        shape.append(scipy.fft.next_fast_len(int(b) + max(c, stop - first - 1 - c), real=True))
    return tuple(shape)


def psf_transform(psf, stamp_shape, workers=None, dtype=np.float32) -> np.ndarray:
    """rfft2 of the PSF zero padded to :func:`fft_shape`, its centre pixel rolled to index 0."""
    psf = np.asarray(psf, dtype=np.float64)
    if psf.ndim != 2:
        raise ValueError(f"PSF must be 2-D, got shape {psf.shape}")
    if not np.isfinite(psf).all():
        raise ValueError("PSF has non-finite values")
    shape = fft_shape(stamp_shape, psf.shape)
    (y0, y1, cy), (x0, x1, cx) = (_axis_window(int(b), p) for b, p in zip(stamp_shape, psf.shape))
    padded = np.zeros(shape, dtype=np.float64)
    padded[: y1 - y0, : x1 - x0] = psf[y0:y1, x0:x1]
    padded = np.roll(padded, (-cy, -cx), axis=(0, 1))
    return scipy.fft.rfft2(padded.astype(dtype), workers=workers)


def convolve_cube(stamps, psf, workers=None, block: int = DEFAULT_BLOCK, out=None, order=None) -> np.ndarray:
    """Linearly convolve every stamp of a cube with one PSF, keeping the model centres in place.

    Parameters
    ----------
    stamps : array_like, shape (K, By, Bx)
        Model stamps (any float dtype; computed in float32). A single 2-D stamp is accepted too.
    psf : array_like, shape (py, px)
        PSF centred on pixel ``(py // 2, px // 2)``; used as given (not renormalised).
    workers : int or None
        Passed to :mod:`scipy.fft` (None: scipy's default of 1 thread; -1: all cores).
    block : int
        Stamps transformed per batch (bounds temporary memory).
    out : ndarray, optional
        float32 C-contiguous array of the result's shape to write into.
    order : array_like of int, optional
        Flat stamp indices (``y * Bx + x``): each convolved stamp's pixels in this order, gathered
        straight from the transform's output (``(K, len(order))``; the fit's radial layout).

    Returns
    -------
    ndarray of float32, shape (K, By, Bx) (or (K, len(order))), C-contiguous
    """
    stamps = np.asarray(stamps)
    if stamps.ndim == 2:
        return convolve_cube(stamps[None], psf, workers, block)[0]
    if stamps.ndim != 3:
        raise ValueError(f"stamps must be (K, B, B), got shape {stamps.shape}")
    k, by, bx = stamps.shape
    shape = fft_shape((by, bx), np.shape(psf))
    kernel = psf_transform(psf, (by, bx), workers)
    result = (k, by, bx) if order is None else (k, len(order))
    if out is None:
        out = np.empty(result, dtype=np.float32)
    elif out.shape != result or out.dtype != np.float32:
        raise ValueError(f"out must be float32 of shape {result}, got {out.dtype} {out.shape}")
    if order is not None:       # the kept window's pixels inside the padded transform
        order = np.asarray(order, dtype=np.int64)
        taps = (order // bx) * shape[1] + order % bx
    block = max(1, int(block))
    for start in range(0, k, block):
        chunk = np.asarray(stamps[start:start + block], dtype=np.float32)
        spec = scipy.fft.rfft2(chunk, s=shape, workers=workers)  # zero pads to `shape`
        spec *= kernel
        full = scipy.fft.irfft2(spec, s=shape, workers=workers, overwrite_x=True)
        if order is None:
            out[start:start + block] = full[:, :by, :bx]
        else:           # mode "clip" (valid indices): no buffered copy
            np.take(full.reshape(len(full), -1), taps, axis=1, out=out[start:start + block], mode="clip")
    return out


def psf_digest(psf) -> str:
    """SHA-256 (hex) of a PSF's float64 values and shape."""
    psf = np.ascontiguousarray(psf, dtype=np.float64)
    digest = hashlib.sha256(repr(psf.shape).encode())
    digest.update(psf.tobytes())
    return digest.hexdigest()


def remove_pixel_response(psf, pad: int = 4) -> np.ndarray:
    """Divide the pixel's box response out of a pixel-integrated ("effective") PSF.

    PSFEx fits pixelated stars, so its PSF already contains one pixel box; the model stamps are
    pixel-integrated too, and convolving the two would count the pixel twice (a blur of 1/12 px^2
    per axis that biases radii low by about 0.02 dex and fluxes by about 2 % for compact galaxies).
    In Fourier space the box is sinc(kx) sinc(ky), which stays above 2/pi inside the band of a
    sampled image, so the division is stable. The result is renormalised to unit sum.
    """
    psf = np.asarray(psf, dtype=np.float64)
    ny, nx = psf.shape
    size = pad * max(ny, nx) + 1
    big = np.zeros((size, size))
    c = size // 2
    big[c - ny // 2:c - ny // 2 + ny, c - nx // 2:c - nx // 2 + nx] = psf
    freq = np.fft.fftfreq(size)
    box = np.sinc(freq)[:, None] * np.sinc(freq)[None, :]
    sharp = np.fft.fftshift(np.fft.ifft2(np.fft.fft2(np.fft.ifftshift(big)) / box).real)
    sharp = sharp[c - ny // 2:c - ny // 2 + ny, c - nx // 2:c - nx // 2 + nx]
    return sharp / sharp.sum()
