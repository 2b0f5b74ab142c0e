"""Small helpers shared by the tests."""

import numpy as np


def angle_distance(a, b):
    """Distance between position angles of period 180 degrees."""
    d = np.mod(np.asarray(a) - np.asarray(b), 180.0)
    return np.minimum(d, 180.0 - d)
