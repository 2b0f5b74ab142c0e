"""Unfittable objects get failure flags, fill values and no edge bits, with both statistics."""

from __future__ import annotations

import numpy as np
import pytest

from dre_hpc.fit.engine import FitOptions, fit_cutouts
from dre_hpc.flags import FitFlag

EDGES = FitFlag.EDGE_LOGR_MIN | FitFlag.EDGE_LOGR_MAX | FitFlag.EDGE_AX_RATIO_MIN | FitFlag.EDGE_INDEX


@pytest.mark.parametrize("statistic", ["wls", "dre"])
def test_empty_mask_and_zero_data(default_models, sim_galaxies, statistic):
    cuts, _, psf = sim_galaxies
    sub = cuts.subset(np.arange(4))      # fancy index: a copy, the session fixture stays intact
    sub.mask[0] = False
    sub.data[1] = 0.0
    res = fit_cutouts(default_models.for_psf(psf), sub, FitOptions(statistic=statistic))
    flags = res["FLAGS"]
    assert flags[0] & FitFlag.EMPTY_MASK and flags[0] & FitFlag.FIT_FAILED
    assert flags[1] & FitFlag.NONPOSITIVE_FLUX
    for i in (0, 1):
        assert not flags[i] & EDGES, (i, FitFlag(int(flags[i])))
        assert np.all(res["MODEL_IDX"][i] == -1) and np.isnan(res["AX_RATIO"][i]) and np.isnan(res["FLUX"][i])
    assert np.all(flags[2:] & ~EDGES == 0) and np.all(res["MODEL_IDX"][2:] >= 0)
