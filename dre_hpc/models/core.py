"""The convolved models' cores, computed without aliasing.

A model is the Sersic profile S convolved with the PSF and the pixel, sampled at the pixel centres.
The cube holds S integrated over each pixel, and `convolve_cube` convolves those samples with the
PSF whose pixel response was divided out (`remove_pixel_response`). In Fourier space the samples
hold S's spectrum *aliased*: its power beyond the sampling band folds back into it. A profile
with a cusp (n >= 2) or one smaller than a pixel has much of that power, and the sum then
misses the effective PSF's blur of it: the central pixel comes out 2-4 % too bright for n = 2.5-6
and up to 9 % for a sub-pixel model (measured against GalSim's Fourier-space rendering of the
same profile and PSFEx PSF). Fitted to galaxies drawn by GalSim exactly on the grid's nodes, the
aliased models biased n by -0.022 dex (n >= 2.5) and put the radius off by 0.012 dex.

The error lives where the aliased power is: around the centre. So each model's core, the profile
inside `CORE_RADIUS` pixels (a cosine taper to zero over `TAPER` pixels), is rendered again on a
grid `OVERSAMPLE` times finer, convolved there with the effective PSF interpolated to that grid
(band-limited: zero-padded in Fourier space) and sampled at the pixel centres; what the coarse
pipeline makes of the same core is taken off, and the difference is added to the model. Both
steps are linear in the core, so for one PSF they are one matrix `correction_matrix` (pixels of
the core's fine rendering -> pixels of the correction), applied to all models as one matrix
product. Against GalSim the corrected models agree to 2e-3 of their peak (before: 2-9e-2).

Only for the cubes that dre_hpc rendered (the ``RENDERV`` header card: their parameters say what
the stamps are) and a PSF that includes the pixel response (``psf_has_pixel``, PSFEx's); with
``--psf-pixel excluded`` the models stay the original's.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .grid import UNIQUE_ORDER
from .sersic import render_models

#: Fine pixels per pixel (odd, so that a pixel's centre is a fine pixel's centre).
OVERSAMPLE = 5
#: Radius (pixels) of the corrected core, and the width of the taper at its edge.
CORE_RADIUS = 4
TAPER = 2.0
#: Version of the corrected models: part of the convolved-model caches' identity.
CORE_VERSION = f"core-{OVERSAMPLE}-{CORE_RADIUS}-{TAPER:g}"


def fine_side() -> int:
    """Side of a core's fine rendering (fine pixels)."""
    return (2 * CORE_RADIUS + 1) * OVERSAMPLE


def core_window() -> np.ndarray:
    """(F, F) taper at the fine pixels' centres: 1 inside ``CORE_RADIUS - TAPER``, 0 beyond
    ``CORE_RADIUS`` pixels from the model centre, a half cosine between."""
    side = fine_side()
    x = (np.arange(side) - side // 2) / OVERSAMPLE
    r = np.hypot(x[:, None], x[None, :])
    t = np.clip((r - (CORE_RADIUS - TAPER)) / TAPER, 0.0, 1.0)
    return 0.5 * (1.0 + np.cos(np.pi * t))


def render_cores(n, ax_ratio, angle_deg, r_e) -> np.ndarray:
    """(K, F * F) float64: each model's profile rendered `OVERSAMPLE` times finer (unit total
    flux, centred on the fine pixel at the model's centre) times `core_window`."""
    fine = render_models(n, ax_ratio, angle_deg, np.asarray(r_e, dtype=np.float64) * OVERSAMPLE,
                         fine_side(), dtype=np.float64)
    return (fine * core_window()).reshape(len(fine), -1)


def upsampled_psf(psf, factor: int) -> tuple:
    """The effective PSF interpolated to a grid `factor` times finer (band-limited: its spectrum
    zero-padded), in the PSF's units per pixel; returns it and the fine index of its centre."""
    psf = np.asarray(psf, dtype=np.float64)
    p0, p1 = psf.shape
    side = max(p0, p1) + 8
    side += 1 - side % 2                              # odd: no Nyquist row to split
    big = np.zeros((side, side))
    c = side // 2
    big[c - p0 // 2:c - p0 // 2 + p0, c - p1 // 2:c - p1 // 2 + p1] = psf
    spectrum = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(big)))
    fine = np.zeros((factor * side, factor * side), dtype=complex)
    o = factor * side // 2 - side // 2
    fine[o:o + side, o:o + side] = spectrum
    return np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(fine))).real * factor ** 2, factor * side // 2


def correction_matrix(effective_psf, used_psf) -> tuple:
    """``(D, h)``: ``D`` (P_c, F * F) maps a core's fine rendering (`render_cores`, window
    included) to the correction of the model's central (2h + 1)^2 pixels (row-major, centred on
    the model centre): the core convolved with `effective_psf` at the fine scale and sampled,
    minus the core binned to pixels and convolved with `used_psf` (what `convolve_cube` does).
    Both PSFs are centred on their pixel ``(p // 2, p // 2)`` and normalised here to unit sum."""
    eff = np.asarray(effective_psf, dtype=np.float64)
    used = np.asarray(used_psf, dtype=np.float64)
    eff, used = eff / eff.sum(), used / used.sum()
    m, side, c = OVERSAMPLE, fine_side(), CORE_RADIUS
    h = c + max(used.shape) // 2
    d = np.arange(-h, h + 1)
    f = np.arange(side) - side // 2                   # fine offsets of the core's fine pixels
    # exact part: sum_f core[f] * eff(x_d - x_f), eff interpolated to the fine grid
    fine, centre = upsampled_psf(eff, m)
    iy = m * d[:, None] - f[None, :] + centre         # (2h+1, F): fine index of x_d - x_f per axis
    inside = (iy >= 0) & (iy < len(fine))
    iy = np.clip(iy, 0, len(fine) - 1)
    exact = fine[iy[:, None, :, None], iy[None, :, None, :]]                  # (dy, dx, fy, fx)
    exact *= (inside[:, None, :, None] & inside[None, :, None, :])
    # coarse part: the core binned to its pixels, convolved with the used PSF
    pixel = (f + side // 2) // m - c                  # the pixel of each fine pixel (offset)
    u0, u1 = used.shape
    jy = d[:, None] - pixel[None, :] + u0 // 2        # (2h+1, F)
    jx = d[:, None] - pixel[None, :] + u1 // 2
    oky, okx = (jy >= 0) & (jy < u0), (jx >= 0) & (jx < u1)
    coarse = used[np.clip(jy, 0, u0 - 1)[:, None, :, None], np.clip(jx, 0, u1 - 1)[None, :, None, :]]
    coarse *= (oky[:, None, :, None] & okx[None, :, None, :])
    return (exact - coarse).reshape((2 * h + 1) ** 2, side * side), h


def cores_file(grid):
    """Where the fine cores of a cube that dre_hpc generated into its cache are kept (beside the
    cube: they depend on its stamps' parameters only, not on the PSF); None for any other cube."""
    from ..paths import cache_dir
    if not grid.renderer or not grid.source:
        return None
    cube = Path(grid.source)
    try:
        inside = cube.is_file() and cube.resolve().parent == cache_dir().resolve()
    except OSError:
        return None
    # rows in the order of the unique models: that order is part of the name
    return cube.with_name(f"{cube.stem}.cores-{CORE_VERSION}-{UNIQUE_ORDER}.npy") if inside else None


class CoreStore:
    """The fine cores (`render_cores`) of a grid's unique models: read (mapped) from
    `cores_file` when it is there, else rendered on demand; once every model's core has been
    rendered (one process convolving the whole cube), `save` keeps them for the next PSF and
    writes them there."""

    def __init__(self, grid):
        self.grid, self.path = grid, cores_file(grid)
        self.representatives = grid.unique_models()[0]
        self.cores = None
        if self.path is not None and self.path.is_file():
            try:
                cores = np.load(self.path, mmap_mode="r", allow_pickle=False)
                if cores.shape == (self.representatives.size, fine_side() ** 2):
                    self.cores = cores
            except (OSError, ValueError):
                self.cores = None
        self._rendered = None if self.cores is not None else {}

    def get(self, start: int, stop: int) -> np.ndarray:
        """Cores of the unique models ``start:stop`` (float32)."""
        if self.cores is not None:
            return np.asarray(self.cores[start:stop])
        kept = self._rendered.get(start)          # this slice for an earlier PSF (MPI ranks' slices)
        if kept is not None and len(kept) == stop - start:
            return kept
        cores = self._rendered[start] = self.take(np.arange(start, stop))
        return cores

    def take(self, unique_indices) -> np.ndarray:
        """Cores of any unique models (float32): from `cores_file` when it is there, else rendered."""
        unique_indices = np.asarray(unique_indices, dtype=np.int64)
        if self.cores is not None:
            return np.asarray(self.cores[unique_indices])
        par = self.grid.parameters(self.representatives[unique_indices])
        return render_cores(par["INDEX"], par["AX_RATIO"], par["ANGLE"], 10.0 ** par["LOGR"]).astype(np.float32)

    def save(self) -> None:
        """When the rendered cores cover every model: keep them (the next PSF's convolution
        reads them) and write them to `cores_file` (temporary name, then renamed; a failure only
        costs the next process the rendering)."""
        if not self._rendered:
            return
        starts = sorted(self._rendered)
        parts = [self._rendered[s] for s in starts]
        if starts[0] != 0 or sum(len(p) for p in parts) != self.representatives.size:
            return
        self.cores, self._rendered = np.concatenate(parts), None
        if self.path is None:
            return
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as handle:
                np.save(handle, self.cores)
            os.replace(tmp, self.path)
        except OSError:
            tmp.unlink(missing_ok=True)


def core_pixels(h: int, boxsize: int) -> tuple:
    """``(pixels, inside)``: flat stamp indices of those of the (2h + 1)^2 pixels around the model
    centre (row-major) that lie in the stamp, and which of the (2h + 1)^2 they are."""
    c = boxsize // 2
    y, x = (a.ravel() for a in np.mgrid[c - h:c + h + 1, c - h:c + h + 1])
    inside = (y >= 0) & (y < boxsize) & (x >= 0) & (x < boxsize)
    return (y * boxsize + x)[inside], inside
