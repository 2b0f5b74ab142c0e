"""Match measured positions to a simulated truth catalogue (nearest neighbour within a radius)."""

from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree


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
