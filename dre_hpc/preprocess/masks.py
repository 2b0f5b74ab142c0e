"""The object mask of a cutout, built like the original make_cuts (reference section 3)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

CENTRE_BLOCK = 4
GROW_ITERATIONS = 4


def clean_mask(seg_is_object: np.ndarray) -> np.ndarray:
    """From ``seg == NUMBER`` to the fit mask: a 4x4 block forced on at the centre, the connected
    component containing the centre, holes filled, grown by 4 pixels (cross element, 4 iterations)."""
    mask = np.array(seg_is_object, dtype=bool)
    cy, cx = mask.shape[0] // 2, mask.shape[1] // 2
    half = CENTRE_BLOCK // 2
    mask[cy - half:cy + half, cx - half:cx + half] = True
    labels, _ = ndimage.label(mask)
    mask = labels == labels[cy, cx]
    mask = ndimage.binary_fill_holes(mask)
    return ndimage.binary_dilation(mask, iterations=GROW_ITERATIONS)
