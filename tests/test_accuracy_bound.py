"""The accuracy benchmark's Cramer-Rao bounds (benchmarks/accuracy_bound.py) against known answers.

The Fisher algebra on an analytic Gaussian (flux and position bounds in closed form), the GalSim
derivatives against the simulation's own S/N definition, and the pooled draws' dispersion.
"""

from __future__ import annotations

import importlib
import math
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def bound():
    sys.path.insert(0, str(BENCH))
    try:
        yield importlib.import_module("accuracy_bound")
    finally:
        sys.path.remove(str(BENCH))


def test_fisher_bounds_of_a_gaussian_are_the_closed_forms(bound):
    """Sky-limited circular Gaussian of width s: sigma(ln F) = 1 / SNR and sigma(x) = sqrt(2) s / SNR
    (flux and position are orthogonal); a mask that keeps half the light widens the flux bound."""
    s, sigma, flux = 3.0, 5.0, 2000.0
    y, x = np.mgrid[0:128, 0:128] - 63.7
    unit = np.exp(-(x ** 2 + y ** 2) / (2 * s ** 2)) / (2 * math.pi * s ** 2)
    d_dx = unit * x / s ** 2                     # d unit / d x_centre
    snr = flux * math.sqrt(np.square(unit).sum()) / sigma
    gain = 1e12                                   # variance sky / gain = sigma^2, the object's Poisson term negligible
    every = np.ones_like(unit, bool)
    out = bound.fisher_sigmas(unit, [d_dx], flux, {"all": every, "half": x < 0, "sky": every},
                              sigma ** 2 * gain, gain, sky_free=("sky",))
    assert out["all"][0] == pytest.approx(1 / snr, rel=1e-6)
    assert out["all"][1] == pytest.approx(math.sqrt(2) * s / snr, rel=1e-3)
    assert out["half"][0] > 1.3 * out["all"][0]
    # a free sky level b: the flux's bound grows by 1 / sqrt(1 - rho^2), rho the correlation of d/dF and d/db
    rho2 = unit.sum() ** 2 / (unit.size * np.square(unit).sum())
    assert len(out["sky"]) == 2 and out["sky"][0] == pytest.approx(1 / snr / math.sqrt(1 - rho2), rel=1e-6)
    assert out["sky"][1] == pytest.approx(out["all"][1], rel=1e-6)        # the centre is odd, the sky even


def test_galsim_bounds_respect_the_simulation_s_n(bound):
    """On a simulated galaxy, the flux-only bound is 1 / SNR as `accuracy_sim` defines S/N (sky noise,
    whole stamp); with its shape and position free it is larger, and larger again on a mask."""
    import galsim
    from accuracy_sim import Population
    pop = Population(psf="moffat")
    psf = bound.make_psf(galsim, pop)
    truth = {"X": 1000.3, "Y": 1000.7, "LOGR": math.log10(4.0), "AX_RATIO": 0.5, "INDEX": 1.5, "ANGLE": 30.0}
    origin = (936, 936)
    unit, derivs = bound.derivatives(galsim, psf, (128, 128), origin, truth)
    snr = 40.0
    truth["FLUX"] = snr * pop.sky_level ** 0.5 / pop.gain ** 0.5 / math.sqrt(np.square(unit).sum())
    sky_only = {"stamp": np.ones((128, 128), bool)}
    flux_only = bound.fisher_sigmas(unit, [], truth["FLUX"], sky_only, pop.sky_level * 1e6, pop.gain * 1e6)
    assert flux_only["stamp"][0] == pytest.approx(1 / snr, rel=1e-3)
    y, x = np.mgrid[0:128, 0:128]
    mask = (x - (truth["X"] - origin[0] - 1)) ** 2 + (y - (truth["Y"] - origin[1] - 1)) ** 2 < 8 ** 2
    _, full = bound.bound_task((0, truth, origin, mask, pop))
    assert full["stamp"]["ln F"] > 1.2 / snr
    for p in bound.PARAMS:
        assert np.isfinite(full["stamp"][p]) and full["mask"][p] > full["stamp"][p]
        assert full["mask, sky free"][p] >= full["mask"][p]
    assert full["mask, sky free"]["log10 r"] > 1.05 * full["mask"]["log10 r"]
    # a radius bound that the centre's does not dwarf: derivatives along each axis, not copies
    assert 0.005 < full["stamp"]["log10 r"] < 0.05 and 0.02 < full["stamp"]["x"] < 0.2


def test_pooled_draws_have_the_bounds_dispersion(bound):
    """An efficient fitter's errors: dispersion 0.994 sigma (68th percentile of |N(0, 1)|) per bin."""
    n = 500
    truth = {"radius": np.full(n, 5.0), "flux": np.full(n, 1e4), "b/a": np.full(n, 0.5), "n": np.full(n, 2.0),
             "angle": np.full(n, 10.0), "snr": np.where(np.arange(n) < n // 2, 30.0, 300.0)}
    sig = [{"ln F": 0.02, "log10 r": 0.01, "b/a": 0.03, "log10 n": 0.05, "angle": 2.0, "x": 0.1, "y": 0.1}
           if k < n // 2 else {p: v / 10 for p, v in
                               {"ln F": 0.02, "log10 r": 0.01, "b/a": 0.03, "log10 n": 0.05, "angle": 2.0,
                                "x": 0.1, "y": 0.1}.items()} for k in range(n)]
    est, pooled, fitted = bound.bound_estimates(sig, truth)
    scores = bound.sc.score_fitter(est, pooled, fitted)
    low, high = scores["20-50"], scores["100-1000"]
    assert low["n"]["dispersion"] == pytest.approx(0.994 * 0.05, rel=0.05)
    assert high["n"]["dispersion"] == pytest.approx(0.994 * 0.005, rel=0.05)
    assert low["b/a"]["dispersion"] == pytest.approx(0.994 * 0.03, rel=0.05)
    assert low["angle"]["dispersion"] == pytest.approx(0.994 * 2.0, rel=0.05)
    assert low["radius"]["dispersion"] == pytest.approx(0.994 * 0.01 * math.log(10), rel=0.05)
    assert low["flux"]["dispersion"] == pytest.approx(0.994 * 0.02, rel=0.05)
    assert abs(low["radius"]["bias"]) < 0.003 and low["completeness"] == 1.0
