"""Compare fits with a simulated truth: match positions, and the recovery criteria of the tests."""

from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree

#: Objects rounder than this have no measurable angle and are left out of the angle criterion.
ELONGATED_BELOW = 0.8
FLUX_TOLERANCE = 0.05


def match_positions(x, y, truth_x, truth_y, radius: float = 2.0) -> np.ndarray:
    """For each measured (x, y), the index of the nearest truth position within ``radius`` pixels,
    or -1. A truth object claimed by several measurements keeps only the nearest one."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    found = np.full(len(x), -1, dtype=np.int64)
    if len(x) == 0 or len(truth_x) == 0:
        return found
    tree = cKDTree(np.column_stack([truth_x, truth_y]))
    dist, idx = tree.query(np.column_stack([x, y]), distance_upper_bound=radius)
    ok = np.isfinite(dist)
    order = np.argsort(np.where(ok, dist, np.inf))
    claimed = set()
    for i in order[: int(ok.sum())]:
        if idx[i] not in claimed:
            claimed.add(int(idx[i]))
            found[i] = idx[i]
    return found


def angle_distance(a, b):
    """Distance between position angles of period 180 degrees."""
    d = np.mod(np.asarray(a) - np.asarray(b), 180.0)
    return np.minimum(d, 180.0 - d)


def recovered(fitted, truth, grid) -> dict:
    """Per-object booleans of the recovery criteria: b/a, angle (objects with b/a <= 0.8 only) and
    log r within one step of ``grid``, FLUX within 5 % of the truth."""
    q_true = np.asarray(truth["AX_RATIO"])
    elongated = q_true <= ELONGATED_BELOW
    return {
        "b/a": np.abs(np.asarray(fitted["AX_RATIO"]) - q_true) <= grid.ax_ratio.step + 1e-9,
        "angle": angle_distance(fitted["ANGLE"], truth["ANGLE"])[elongated] <= grid.angle.step + 1e-9,
        "log r": np.abs(np.asarray(fitted["LOGR"]) - truth["LOGR"]) <= grid.logr.step + 1e-9,
        "flux": np.abs(np.asarray(fitted["FLUX"]) / truth["FLUX"] - 1) <= FLUX_TOLERANCE,
    }
