"""The neighbours' light out of each cut: the second pass of ``make_cuts --neighbours``.

A first fit (``dre``'s ``Summary/<img>_dre.fits``) gives every object's ``<P>_FIT`` parameters.
Each object's model is rendered at them and convolved with the tile's PSF as the fit's models
are (`fit.model_matrix.convolve_models`), moved to its centre and scaled by ``FLUX_FIT``
(`object_models`). Subtracted from the background-subtracted image, the models leave the sky,
the objects that were not fitted (masked here by their segments), and the fits' residuals.

SExtractor's background map holds part of the galaxies' light (their wings, and neighbours'
wings beyond their segments): on the accuracy benchmark it lies 0.06 sigma above the true sky.
Subtracting the models from an image whose background took that light already would take it
twice, so the background is estimated again on what the models leave (`mesh_background`:
SExtractor's estimator with its default mesh) and its change is subtracted too. Each object's
cut is then the image minus the new background minus every fitted model, with its own model
added back (`NeighbourModels.subtract`); masks and rms are those of the first pass. Their
background is known better than SExtractor's: the cuts say so (``BACK_ERR``, `BACKGROUND_ERROR`)
and the fit's prior on the sky level under each model follows.
"""

from __future__ import annotations

import numpy as np
import scipy.fft
import scipy.interpolate
import scipy.ndimage

from ..errors import InputError
from ..fit.model_matrix import convolve_models
from ..fit.units import psf_index
from ..flags import FitFlag
from ..io.catalog import read_catalog
from ..models.core import render_cores
from ..models.psf import read_psf
from ..models.sersic import render_models
from .cuts import cut_start, cut_stack, ext_numbers

#: The first pass's parameters of each model, and its flux.
PARAMETERS = ("INDEX_FIT", "AX_RATIO_FIT", "ANGLE_FIT", "LOGR_FIT", "FLUX_FIT")
#: Fits whose model is not subtracted.
UNUSABLE = (FitFlag.FIT_FAILED | FitFlag.EMPTY_MASK | FitFlag.NONFINITE_INPUT | FitFlag.NONPOSITIVE_FLUX
            | FitFlag.NO_CENTRE)
#: Uncertainty of the background level of the second pass's cuts in units of their pixels' noise
#: (their ``BACK_ERR``; the fit's prior on a constant sky under the model, `fit.subgrid`): set on
#: the accuracy benchmark's three tiles (seeds 16, 26, 36), where 0.03 gave the smallest
#: dispersions and coverage within 62-76 % in every S/N bin (0.015: flux coverage 57 % at S/N
#: 50-100; 0.05 and SExtractor's 0.09: 80 % at S/N 10-20).
BACKGROUND_ERROR = 0.03
#: SExtractor's defaults (the shipped ``default.sex``): mesh side and median filter, in meshes.
BACK_SIZE = 128
BACK_FILTERSIZE = 3
#: Iterations of the 3-sigma clipping around the median (SExtractor's backguess stops earlier
#: once the dispersion settles).
CLIP_SIGMA = 3.0
CLIP_ITERATIONS = 20
#: Zeros around a stamp while it is shifted (`fourier_shift`): 128 + 16 = 144 = 2^4 x 9 pixels.
SHIFT_PAD = 8
#: Meshes with less than this fraction of unmasked pixels take their neighbours' values.
MIN_MESH_FRACTION = 0.5


def read_fits(path, boxsize: int) -> dict:
    """The usable first-pass fits of a ``_dre.fits`` summary: their keys (EXT_NUMBER, NUMBER),
    parameters and cut frames (first pixel and the centre's offset in it: `_frame`)."""
    try:
        table = read_catalog(path)
    except InputError:
        raise
    except Exception as exc:                        # an unreadable file is the user's to fix
        raise InputError(f"--neighbours: cannot read {path} ({exc}); expected dre's summary of the "
                         "first pass (Summary/<img>_dre.fits)") from None
    missing = [c for c in PARAMETERS + ("NUMBER", "X_IMAGE", "Y_IMAGE", "FLAGS") if c not in table.colnames]
    if missing:
        raise InputError(f"--neighbours: {path} has no column(s) {', '.join(missing)}; expected the summary "
                         "of a dre fit with sub-grid refinement (Summary/<img>_dre.fits)")
    values = {c: np.asarray(table[c], float) for c in PARAMETERS}
    usable = np.all([np.isfinite(v) for v in values.values()], axis=0)
    usable &= (values["FLUX_FIT"] > 0) & (values["AX_RATIO_FIT"] > 0)
    usable &= (np.asarray(table["FLAGS"], np.int64) & int(UNUSABLE)) == 0
    keep = np.flatnonzero(usable)
    frames = [_frame(table, axis, keep, boxsize) for axis in ("X", "Y")]
    return {"ext": ext_numbers(table)[keep], "number": np.asarray(table["NUMBER"], np.int64)[keep],
            **{c: values[c][keep] for c in PARAMETERS},
            "x0": frames[0][0], "y0": frames[1][0], "dx": frames[0][1], "dy": frames[1][1], "rows": len(table)}


def _frame(table, axis: str, keep, boxsize: int) -> tuple:
    """First pixel of each fit's cut and its centre's offset there: from the summary's ``DX``
    (the centre the fit used: ``X_IMAGE``, or ``XWIN_IMAGE`` with ``make_cuts --centroids``),
    which lies within a pixel of the catalogue's ``X_IMAGE``; from ``X_IMAGE`` where it has none."""
    position = np.asarray(table[f"{axis}_IMAGE"], float)[keep]
    offset = np.asarray(table[f"D{axis}"], float)[keep] if f"D{axis}" in table.colnames else np.full(keep.size, np.nan)
    start = np.where(np.isfinite(offset), np.rint(position - 1.0 - boxsize // 2 - np.nan_to_num(offset)),
                     cut_start(position, boxsize)).astype(np.int64)
    return start, np.where(np.isfinite(offset), offset, position - 1.0 - start - boxsize // 2)


def object_models(fits: dict, select, psf, psf_has_pixel: bool, boxsize: int) -> np.ndarray:
    """(N, B, B) float32: the models of the fits `select` (indices into `fits`) in their cut
    frames: rendered at their parameters, convolved with `psf` like the fit's models (the cores
    corrected when the PSF holds the pixel response), shifted by (dx, dy) and scaled by FLUX_FIT."""
    select = np.asarray(select, np.int64)
    if not select.size:
        return np.zeros((0, boxsize, boxsize), np.float32)
    n = np.clip(fits["INDEX_FIT"][select], 0.2, 10.0)
    q = np.clip(fits["AX_RATIO_FIT"][select], 0.02, 1.0)
    angle = fits["ANGLE_FIT"][select]
    r_e = 10.0 ** np.clip(fits["LOGR_FIT"][select], -1.5, np.log10(boxsize))
    stamps = render_models(n, q, angle, r_e, boxsize)
    cores = render_cores(n, q, angle, r_e) if psf_has_pixel else None
    models = convolve_models(stamps, cores, psf, psf_has_pixel)
    shifted = fourier_shift(models, fits["dx"][select], fits["dy"][select])
    return (shifted * fits["FLUX_FIT"][select][:, None, None]).astype(np.float32)


def fourier_shift(stamps, dx, dy) -> np.ndarray:
    """Band-limited shift of each stamp by (dx, dy) pixels (towards +x, +y; less than a pixel or
    so: `SHIFT_PAD` pixels of zeros around each stamp take what wraps around)."""
    stamps = np.asarray(stamps, np.float32)
    b = stamps.shape[-1]
    padded = np.pad(stamps, ((0, 0), (SHIFT_PAD, SHIFT_PAD), (SHIFT_PAD, SHIFT_PAD)))
    side = padded.shape[-1]
    dx, dy = np.asarray(dx, float)[:, None], np.asarray(dy, float)[:, None]
    phase_y = np.exp(-2j * np.pi * np.fft.fftfreq(side)[None, :] * dy).astype(np.complex64)
    phase_x = np.exp(-2j * np.pi * np.fft.rfftfreq(side)[None, :] * dx).astype(np.complex64)
    spec = scipy.fft.rfft2(padded)
    spec *= phase_y[:, :, None]
    spec *= phase_x[:, None, :]
    return scipy.fft.irfft2(spec, s=(side, side))[:, SHIFT_PAD:SHIFT_PAD + b, SHIFT_PAD:SHIFT_PAD + b]


def paste(target, stamp, x0: int, y0: int, tx0: int = 0, ty0: int = 0, sign: float = 1.0) -> None:
    """Add ``sign * stamp`` (its first pixel at image pixel (x0, y0)) into `target` (its first
    pixel at (tx0, ty0)), where they overlap."""
    ty, tx = target.shape
    sy, sx = stamp.shape
    xa, xb = max(x0, tx0), min(x0 + sx, tx0 + tx)
    ya, yb = max(y0, ty0), min(y0 + sy, ty0 + ty)
    if xa < xb and ya < yb:
        target[ya - ty0:yb - ty0, xa - tx0:xb - tx0] += sign * stamp[ya - y0:yb - y0, xa - x0:xb - x0]


def mesh_background(image, masked=None, size: int = BACK_SIZE, filter_size: int = BACK_FILTERSIZE):
    """SExtractor's background estimate of `image` (2-D): per mesh of `size` pixels, the mode
    ``2.5 median - 1.5 mean`` of the pixels left by a 3-sigma clipping about the median (the
    median where the two differ by more than 0.3 sigma: a crowded mesh), median-filtered over
    `filter_size` meshes and interpolated by a bicubic spline through the meshes' centres (held
    constant beyond the outermost centres).
    `masked` pixels (True) are left out; meshes with too few left take their neighbours' values."""
    image = np.asarray(image, np.float64)
    ny, nx = image.shape
    my, mx = -(-ny // size), -(-nx // size)
    values = np.full((my, mx), np.nan)
    for j in range(my):
        for i in range(mx):
            block = image[j * size:(j + 1) * size, i * size:(i + 1) * size]
            keep = np.isfinite(block)
            if masked is not None:
                keep &= ~masked[j * size:(j + 1) * size, i * size:(i + 1) * size]
            if keep.sum() >= MIN_MESH_FRACTION * block.size:
                values[j, i] = _mesh_mode(block[keep])
    values = _fill_missing(values)
    values = scipy.ndimage.median_filter(values, size=min(filter_size, my, mx) or 1, mode="nearest")
    cy = np.minimum((np.arange(my) + 0.5) * size, (np.arange(my) * size + ny) / 2.0) - 0.5
    cx = np.minimum((np.arange(mx) + 0.5) * size, (np.arange(mx) * size + nx) / 2.0) - 0.5
    if my == 1 and mx == 1:
        return np.full((ny, nx), values[0, 0])
    if my == 1 or mx == 1:                      # one row or column of meshes: linear along it
        along, centres = (cx, np.arange(nx)) if my == 1 else (cy, np.arange(ny))
        line = np.interp(centres, along, values.ravel())
        return np.broadcast_to(line[None, :] if my == 1 else line[:, None], (ny, nx)).copy()
    spline = scipy.interpolate.RectBivariateSpline(cy, cx, values, kx=min(3, mx - 1), ky=min(3, my - 1))
    # beyond the outermost meshes' centres the value is held, not extrapolated
    return spline(np.clip(np.arange(ny), cy[0], cy[-1]), np.clip(np.arange(nx), cx[0], cx[-1]))


def _mesh_mode(pixels) -> float:
    low, high = -np.inf, np.inf
    kept = pixels
    for _ in range(CLIP_ITERATIONS):
        kept = pixels[(pixels >= low) & (pixels <= high)]
        if kept.size < 3:
            return float(np.median(pixels))
        median, sigma = np.median(kept), kept.std()
        new = (median - CLIP_SIGMA * sigma, median + CLIP_SIGMA * sigma)
        if new == (low, high):
            break
        low, high = new
    mean = kept.mean()
    if sigma > 0 and abs(mean - median) / sigma >= 0.3:
        return float(median)
    return float(2.5 * median - 1.5 * mean)


def _fill_missing(values):
    """Meshes without a value take the mean of their valid neighbours, growing outwards."""
    values = values.copy()
    if np.isnan(values).all():
        return np.zeros_like(values)
    while np.isnan(values).any():
        filled = values.copy()
        for j, i in zip(*np.nonzero(np.isnan(values))):
            near = values[max(j - 1, 0):j + 2, max(i - 1, 0):i + 2]
            if np.isfinite(near).any():
                filled[j, i] = np.nanmean(near)
        values = filled
    return values


class NeighbourModels:
    """One extension's first-pass models: the image they make (`painted`), the change of the
    background once they are out of the image, and each object's own model to add back."""

    def __init__(self, fits: dict, select, models, shape, segmentation):
        self.fits, self.select, self.models = fits, np.asarray(select, np.int64), models
        self.painted = np.zeros(shape, np.float64)
        for k, i in enumerate(self.select):
            paste(self.painted, models[k], int(fits["x0"][i]), int(fits["y0"][i]))
        fitted = np.isin(segmentation, fits["number"][self.select])
        self.masked = (segmentation > 0) & ~fitted            # objects whose light stays in the image
        self.own = {int(fits["number"][i]): k for k, i in enumerate(self.select)}

    def background_change(self, nb) -> np.ndarray:
        """The background of what the models leave of the background-subtracted image `nb`."""
        return mesh_background(np.asarray(nb, np.float64) - self.painted, self.masked)

    def subtract(self, data, numbers, x0, y0, cleaned) -> None:
        """Replace each cut ``data[k]`` (object `numbers[k]`, first pixel (x0, y0)) by the cut of
        `cleaned` (image minus background change minus every model; `cut_stack`, padded with 0
        as the first cuts are) plus its own model."""
        stamps = cut_stack(cleaned, x0, y0, data.shape[-1])[0]
        for k, number in enumerate(numbers):
            stamp = stamps[k]
            own = self.own.get(int(number))
            if own is not None:
                i = self.select[own]
                paste(stamp, self.models[own], int(self.fits["x0"][i]), int(self.fits["y0"][i]),
                      int(x0[k]), int(y0[k]))
            data[k] = stamp


def subtract_neighbours(cuts, images, summary_path, psf_file, psf_has_pixel: bool) -> dict:
    """Replace the data of `cuts` (a `CutoutSet` of the tile `images`) by cuts with every first-pass
    model but the object's own subtracted, and the background estimated again; returns what was
    done (the cuts report's ``neighbours``)."""
    b = cuts.data.shape[-1]
    fits = read_fits(summary_path, b)
    report = {"summary": str(summary_path), "psf": str(psf_file), "psf_pixel": bool(psf_has_pixel),
              "first_pass_rows": fits["rows"], "models_subtracted": 0, "background_change": {}}
    for ext in np.unique(cuts.objects["EXT_NUMBER"]):
        idx = np.flatnonzero(cuts.objects["EXT_NUMBER"] == ext)
        select = np.flatnonzero(fits["ext"] == ext)
        psf = read_psf(psf_file, ext_number=psf_index(ext))
        nb = np.asarray(images.plane("nb", ext), np.float64)
        models = NeighbourModels(fits, select, object_models(fits, select, psf, psf_has_pixel, b),
                                 nb.shape, np.asarray(images.plane("seg", ext)))
        change = models.background_change(nb)
        data = cuts.data[idx]
        models.subtract(data, cuts.objects["NUMBER"][idx], cuts.objects["X0"][idx], cuts.objects["Y0"][idx],
                        nb - change - models.painted)
        cuts.data[idx] = data
        cuts.objects["BACK_ERR"][idx] = BACKGROUND_ERROR
        report["models_subtracted"] += int(select.size)
        report["background_change"][int(ext)] = {"median": float(np.median(change)),
                                                 "min": float(change.min()), "max": float(change.max())}
    return report
