"""Per-object bit flags of the fit (column ``FLAGS``); the README's table is generated from here."""

from __future__ import annotations

import enum


class FitFlag(enum.IntFlag):
    """Why a fit result needs care. Several bits may be set; 0 means a clean fit.

    Descriptions live in ``_DESCRIPTIONS`` (used for the README and ``dre --list-flags``).
    """

    EDGE_LOGR_MIN = 1
    EDGE_LOGR_MAX = 2
    EDGE_AX_RATIO_MIN = 4
    EDGE_INDEX = 8
    NONPOSITIVE_FLUX = 16
    FEW_PIXELS = 32
    NONFINITE_INPUT = 64
    BAD_RMS = 128
    FIT_FAILED = 256
    EMPTY_MASK = 512
    NO_CENTRE = 1024
    CUT_PADDED = 2048
    REFINE_FAILED = 4096
    REFINE_FAR = 8192
    SECOND_MINIMUM = 16384

    @classmethod
    def describe(cls) -> list:
        """(value, name, description) for every flag."""
        return [(int(f), f.name, _DESCRIPTIONS[f.name]) for f in cls]


_DESCRIPTIONS = {
    "EDGE_LOGR_MIN": "best radius is the smallest of the grid (object may be smaller)",
    "EDGE_LOGR_MAX": "best radius is the largest of the grid (object may be larger)",
    "EDGE_AX_RATIO_MIN": "best axis ratio is the smallest of the grid",
    "EDGE_INDEX": "best Sersic index is the smallest or largest of the grid (when it has more than one)",
    "NONPOSITIVE_FLUX": "best-fit flux <= 0 (no positive model fits the data)",
    "FEW_PIXELS": "fewer usable pixels in the mask than --min-pixels",
    "NONFINITE_INPUT": "NaN or infinite data or rms inside the mask (those pixels were ignored)",
    "BAD_RMS": "zero or negative rms inside the mask (those pixels were ignored)",
    "FIT_FAILED": "no finite chi-square for any model; parameters are fill values",
    "EMPTY_MASK": "the object's mask has no pixel",
    "NO_CENTRE": "the object's sub-pixel position is unknown: no sub-pixel centring",
    "CUT_PADDED": "the cutout reached the image edge and was padded (from the cuts file)",
    "REFINE_FAILED": "the sub-grid refinement found no minimum: the *_FIT columns hold the grid's values",
    "REFINE_FAR": "the sub-grid vertex lies more than one grid step from the best cell (extrapolated)",
    "SECOND_MINIMUM": "another local minimum of the grid, away from the best cell, within delta chi2 < 1",
}

class CutFlag(enum.IntFlag):
    """Integrity bits of a cutout, set by make_cuts (table column ``CUT_FLAGS`` of the cuts file)."""

    PADDED = 1
    NONFINITE = 2
    ALL_ZERO = 4
    BAD_RMS = 8
    NO_SEGMENT = 16

    @classmethod
    def describe(cls) -> list:
        """(value, name, description) for every flag."""
        return [(int(f), f.name, _CUT_DESCRIPTIONS[f.name]) for f in cls]


_CUT_DESCRIPTIONS = {
    "PADDED": "the 128x128 cut reaches beyond the image: padded with data 0, rms 0, mask off",
    "NONFINITE": "NaN or infinite pixels in the image, background-subtracted image or rms inside the cut",
    "ALL_ZERO": "every data pixel of the cut inside the image is zero",
    "BAD_RMS": "zero or negative rms inside the object's mask",
    "NO_SEGMENT": "the segmentation map has no pixel of this object in the cut (mask = centre block only)",
}

#: Flags after which the parameters are fill values, not measurements (no positive model fits an
#: object whose best flux is <= 0, so its shape is not measured either).
UNFITTED = FitFlag.FIT_FAILED | FitFlag.EMPTY_MASK | FitFlag.FEW_PIXELS | FitFlag.NONPOSITIVE_FLUX
