"""PSF convolution of a model cube, and a cache of convolved cubes.

The convolution is *linear* (no wrap-around): stamps and PSF are zero padded to an FFT length of
at least ``B + p // 2`` per axis (rounded up with :func:`scipy.fft.next_fast_len`), which is the
least length for which no circular alias reaches the kept ``B x B`` window, then cropped back.
The PSF centre (pixel ``(p // 2)`` per axis, see :mod:`dre_hpc.models.psf`) is rolled to index 0,
so a model centred on stamp pixel ``[B // 2, B // 2]`` stays centred there.

Cache: :class:`ConvolvedCubeCache` keeps the last few results in memory, keyed by a caller-given
cube identity string and the SHA-256 of the PSF, and optionally on disk as ``.npy`` files (written
atomically, read back memory-mapped) so that another process with the same cube and PSF does not
convolve again. :func:`get_convolved` uses one module-wide cache.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np
import scipy.fft

log = logging.getLogger(__name__)

#: Stamps per FFT block: bounds the temporary complex arrays (about 80 kB per 128x128 stamp);
#: small blocks stay in the CPU caches (16 measured fastest on 2 cores).
DEFAULT_BLOCK = 16
_UNSET = object()
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


def convolve_cube(stamps, psf, workers=None, block: int = DEFAULT_BLOCK, out=None) -> np.ndarray:
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
        float32 C-contiguous array of the stamps' shape to write into.

    Returns
    -------
    ndarray of float32, shape (K, By, Bx), C-contiguous
    """
    stamps = np.asarray(stamps)
    if stamps.ndim == 2:
        return convolve_cube(stamps[None], psf, workers, block)[0]
    if stamps.ndim != 3:
        raise ValueError(f"stamps must be (K, B, B), got shape {stamps.shape}")
    k, by, bx = stamps.shape
    shape = fft_shape((by, bx), np.shape(psf))
    kernel = psf_transform(psf, (by, bx), workers)
    if out is None:
        out = np.empty((k, by, bx), dtype=np.float32)
    elif out.shape != stamps.shape or out.dtype != np.float32:
        raise ValueError(f"out must be float32 of shape {stamps.shape}, got {out.dtype} {out.shape}")
    block = max(1, int(block))
    for start in range(0, k, block):
        chunk = np.asarray(stamps[start:start + block], dtype=np.float32)
        spec = scipy.fft.rfft2(chunk, s=shape, workers=workers)  # zero pads to `shape`
        spec *= kernel
        full = scipy.fft.irfft2(spec, s=shape, workers=workers, overwrite_x=True)
        out[start:start + block] = full[:, :by, :bx]
    return out


def psf_digest(psf) -> str:
    """SHA-256 (hex) of a PSF's float64 values and shape."""
    psf = np.ascontiguousarray(psf, dtype=np.float64)
    digest = hashlib.sha256(repr(psf.shape).encode())
    digest.update(psf.tobytes())
    return digest.hexdigest()


class ConvolvedCubeCache:
    """PSF-convolved cubes kept in a small in-memory LRU and optionally on disk.

    Parameters
    ----------
    max_entries : int
        Convolved cubes kept in memory (each is as large as the cube: 150 MB by default).
    cache_dir : str, Path, bool or None
        Directory of the on-disk cache; True means ``paths.cache_dir() / "convolved"``; None or
        False keep the cache in memory only. Disk files are never deleted by this class.

    Attributes
    ----------
    n_computed : int
        Convolutions actually run (memory and disk hits do not count).
    """

    def __init__(self, max_entries: int = 2, cache_dir=None):
        self.max_entries = max(1, int(max_entries))
        self.cache_dir = _resolve_cache_dir(cache_dir)
        self._memory = OrderedDict()
        self._lock = threading.Lock()
        self.n_computed = 0

    def key(self, cube_key: str, stamps, psf) -> str:
        """Cache key: hash of the cube key, the stamps' shape, the PSF and the algorithm version."""
        text = f"{ALGORITHM_VERSION}|{cube_key}|{tuple(np.shape(stamps))}|{psf_digest(psf)}"
        return hashlib.sha256(text.encode()).hexdigest()

    def get(self, cube_key: str, stamps, psf, workers=None, cache_dir=_UNSET) -> np.ndarray:
        """The convolved cube (read-only float32, C-contiguous): from memory, disk, or computed.

        `cube_key` must identify the stamps' content (e.g. cube path + size + mtime, or a
        content hash); the cache never looks at the stamps' values. `cache_dir`, when given,
        replaces the instance's disk directory for this call.
        """
        disk_dir = self.cache_dir if cache_dir is _UNSET else _resolve_cache_dir(cache_dir)
        key = self.key(cube_key, stamps, psf)
        expected = tuple(np.shape(stamps))
        with self._lock:
            if key in self._memory:
                self._memory.move_to_end(key)
                return self._memory[key]
            result = self._load(disk_dir, key, expected)
            if result is None:
                result = convolve_cube(stamps, psf, workers=workers)
                self.n_computed += 1
                self._save(disk_dir, key, result)
            result.flags.writeable = False
            self._memory[key] = result
            while len(self._memory) > self.max_entries:
                self._memory.popitem(last=False)
            return result

    def clear(self) -> None:
        """Forget the in-memory entries (disk files stay)."""
        with self._lock:
            self._memory.clear()

    def disk_path(self, key: str, cache_dir=_UNSET):
        """Path of the ``.npy`` file of `key`, or None without a disk cache."""
        disk_dir = self.cache_dir if cache_dir is _UNSET else _resolve_cache_dir(cache_dir)
        return None if disk_dir is None else disk_dir / f"{key}.npy"

    def _load(self, disk_dir, key: str, expected: tuple):
        path = self.disk_path(key, disk_dir)
        if path is None or not path.is_file():
            return None
        try:
            arr = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable convolved-cube cache file %s (%s)", path, exc)
            return None
        if arr.shape != expected or arr.dtype != np.float32 or not arr.flags.c_contiguous:
            log.warning("ignoring convolved-cube cache file %s: shape %s dtype %s, expected %s "
                        "float32", path, arr.shape, arr.dtype, expected)
            return None
        log.debug("convolved cube loaded from %s", path)
        return arr

    def _save(self, disk_dir, key: str, arr: np.ndarray) -> None:
        path = self.disk_path(key, disk_dir)
        if path is None:
            return
        tmp = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{key[:16]}.", suffix=".tmp")
            with os.fdopen(fd, "wb") as fh:
                np.save(fh, arr)
            os.replace(tmp, path)
        except OSError as exc:
            log.warning("could not write convolved-cube cache file %s (%s); continuing", path, exc)
            if tmp is not None and os.path.exists(tmp):
                os.unlink(tmp)


def _resolve_cache_dir(cache_dir):
    if cache_dir is None or cache_dir is False:
        return None
    if cache_dir is True:
        from ..paths import cache_dir as user_cache_dir

        return user_cache_dir() / "convolved"
    return Path(cache_dir)


#: The module-wide cache behind :func:`get_convolved` (memory LRU of 2 cubes).
DEFAULT_CACHE = ConvolvedCubeCache(max_entries=2)


def get_convolved(cube_key: str, stamps, psf, cache_dir=None, workers=None) -> np.ndarray:
    """Convolved cube through the module-wide :data:`DEFAULT_CACHE`.

    See :meth:`ConvolvedCubeCache.get`. `cache_dir`: a directory for the on-disk cache, True for
    ``paths.cache_dir() / "convolved"``, None (default) for memory only.
    """
    return DEFAULT_CACHE.get(cube_key, stamps, psf, workers=workers, cache_dir=cache_dir)


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
