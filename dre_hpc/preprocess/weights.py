"""Weight and flag maps in the cuts: the pixels they rule out, and the noise a weight map gives.

A pixel is unusable where the weight map's value is not a positive finite number or the flag map's
is not 0; the cuts leave it out of every object's mask, so no fit sees it.

With a weight map, the fit's per-pixel noise comes from the map rather than from SExtractor's
BACKGROUND_RMS check image: the map follows depth changes on the scale of a pixel (dithers, chip
gaps, stacked exposures), while the background mesh is smoothed over BACK_SIZE pixels. MAP_RMS
holds the noise itself, MAP_VAR its square; MAP_WEIGHT is taken as relative (1/variance up to a
factor, as SExtractor does): ``rms = s / sqrt(w)`` with ``s`` the median of
``BACKGROUND_RMS * sqrt(w)`` over the tile's usable pixels.
"""

from __future__ import annotations

import numpy as np

WEIGHT_TYPES = ("MAP_WEIGHT", "MAP_RMS", "MAP_VAR")
SAMPLE_STEP = 4           # the MAP_WEIGHT scale is a median over every 4th pixel in each direction


def usable_weight(weight: np.ndarray) -> np.ndarray:
    """True where a weight-map value is a positive finite number."""
    return np.isfinite(weight) & (weight > 0)


def weight_scale(weight_plane, rms_plane, weight_type: str) -> float:
    """``s`` of ``rms = s / sqrt(w)`` for MAP_WEIGHT (1 for MAP_RMS and MAP_VAR)."""
    if weight_type != "MAP_WEIGHT":
        return 1.0
    w = np.asarray(weight_plane[::SAMPLE_STEP, ::SAMPLE_STEP], np.float64)
    rms = np.asarray(rms_plane[::SAMPLE_STEP, ::SAMPLE_STEP], np.float64)
    ok = usable_weight(w) & np.isfinite(rms) & (rms > 0)
    return float(np.median(rms[ok] * np.sqrt(w[ok]))) if ok.any() else 1.0


def noise_from_weight(weight: np.ndarray, weight_type: str, scale: float = 1.0) -> np.ndarray:
    """Per-pixel noise from weight-map values (NaN where the value is unusable)."""
    w = np.where(usable_weight(weight), weight, np.nan)
    if weight_type == "MAP_RMS":
        return w
    if weight_type == "MAP_VAR":
        return np.sqrt(w)
    return scale / np.sqrt(w)
