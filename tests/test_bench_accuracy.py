"""The accuracy benchmark's scoring (benchmarks/accuracy_scoring.py) on arrays with known answers.

Pure NumPy: no simulation, no fit. The benchmark itself (benchmarks/bench_accuracy.py) runs the
tools and takes minutes; these check that its numbers mean what the Euclid Morphology Challenge's
definitions say.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "accuracy_scoring.py"


@pytest.fixture(scope="module")
def sc():
    spec = importlib.util.spec_from_file_location("accuracy_scoring", PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module            # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_bias_is_the_median(sc):
    assert sc.bias([0.1, -0.2, 0.3, 5.0, 0.0]) == pytest.approx(0.1)
    assert np.isnan(sc.bias([]))


def test_dispersion_is_the_68th_percentile_of_the_absolute_deviation_from_the_median(sc):
    err = np.array([-3.0, -1.0, 0.0, 1.0, 3.0]) + 10.0        # |err - median| = 3, 1, 0, 1, 3
    assert sc.dispersion(err) == pytest.approx(np.percentile([0, 1, 1, 3, 3], 68))
    rng = np.random.default_rng(0)
    gauss = rng.normal(0.5, 0.2, 200_000)
    assert sc.dispersion(gauss) == pytest.approx(0.2 * 0.994, rel=0.01)   # 68th pct of |N(0,1)| = 0.994
    assert sc.bias(gauss) == pytest.approx(0.5, abs=0.003)


def test_outliers_are_errors_beyond_the_limit(sc):
    assert sc.outlier_fraction([0.1, -0.6, 0.5, 0.51, -0.2], 0.5) == pytest.approx(0.4)
    assert sc.outlier_fraction([10.0, -50.0, 44.0], sc.OUTLIER_LIMITS["angle"]) == pytest.approx(1 / 3)


def test_error_definitions(sc):
    assert sc.errors("radius", [2.0, 3.0], [2.0, 2.0]) == pytest.approx([0.0, 0.5])
    assert sc.errors("flux", [90.0], [100.0]) == pytest.approx([-0.1])
    assert sc.errors("n", [4.0, 1.0], [1.0, 10.0]) == pytest.approx([np.log10(4.0), -1.0])
    assert sc.errors("b/a", [0.3], [0.5]) == pytest.approx([-0.2])
    with pytest.raises(ValueError):
        sc.errors("size", [1.0], [1.0])


def test_angle_errors_wrap_with_period_180(sc):
    assert sc.errors("angle", [179.0, 1.0, 95.0, 10.0, 0.0], [1.0, 179.0, 5.0, 100.0, 90.0]) == \
        pytest.approx([-2.0, 2.0, 90.0 - 180.0, -90.0, -90.0])
    assert sc.wrap_angle([360.0 + 30.0, -200.0]) == pytest.approx([30.0, -20.0])


def test_coverage_counts_truths_inside_the_interval(sc):
    true = np.array([1.0, 2.0, 3.0, 4.0])
    centre = np.array([1.05, 2.5, 3.0, np.nan])
    err = np.array([0.1, 0.1, 0.0, 1.0])
    assert sc.covered(true, centre, err).tolist() == [True, False, True, False]
    assert sc.coverage(true, centre, err) == pytest.approx(0.5)
    # log10 space: the truth is converted, the interval is the fitter's
    assert sc.coverage([10.0, 100.0], [1.02, 2.2], [0.05, 0.05], space="log10") == pytest.approx(0.5)
    # the angle is compared modulo 180: 179 is 2 degrees from 1
    assert sc.covered([179.0, 179.0], [1.0, 1.0], [2.5, 1.5], period=180.0).tolist() == [True, False]
    # Gaussian errors with the right sigma cover 68.3 %
    rng = np.random.default_rng(1)
    t = rng.normal(0, 1, 100_000)
    assert sc.coverage(t, np.zeros_like(t), np.ones_like(t)) == pytest.approx(0.683, abs=0.005)


def test_catastrophic_is_radius_beyond_0p3_dex_or_flux_beyond_50_percent(sc):
    cat = sc.catastrophic([1.0, 2.1, 1.0, 1.0, np.nan], [1.0, 1.0, 1.0, 1.0, 1.0],
                          [1.0, 1.0, 1.6, 0.6, 1.0], [1.0, 1.0, 1.0, 1.0, 1.0])
    assert cat.tolist() == [False, True, True, False, True]


def test_snr_bins_are_half_open_except_the_last(sc):
    bins = dict(sc.snr_bins([10.0, 19.99, 20.0, 99.0, 100.0, 1000.0, 5.0]))
    assert bins["10-20"].tolist() == [True, True, False, False, False, False, False]
    assert bins["20-50"].sum() == 1 and bins["50-100"].sum() == 1
    assert bins["100-1000"].tolist() == [False] * 4 + [True, True, False]
    assert bins["all"].sum() == 6


def test_score_fitter_on_a_known_case(sc):
    n = 8
    truth = {"radius": np.full(n, 2.0), "flux": np.full(n, 100.0), "b/a": np.full(n, 0.5),
             "n": np.full(n, 1.0), "angle": np.full(n, 10.0),
             "snr": np.array([15.0] * 4 + [500.0] * 4)}
    radius = np.array([2.2, 2.2, 2.2, np.nan, 2.0, 2.0, 4.0, 2.0])     # one not fitted
    est = {"radius": sc.Estimate(radius, np.log10(radius), np.full(n, 0.03), "log10"),
           "flux": sc.Estimate(np.full(n, 100.0)),                     # no errors: coverage n/a
           "angle": sc.Estimate(np.array([12.0, 8.0, 190.0, 0, 10, 10, 10, 100.0]),
                                np.full(n, 10.0), np.full(n, 1.0))}
    fitted = np.isfinite(radius)
    out = sc.score_fitter(est, truth, fitted)
    low, high = out["10-20"], out["100-1000"]
    assert low["completeness"] == pytest.approx(0.75) and high["completeness"] == 1.0
    assert low["radius"]["N"] == 3 and low["radius"]["bias"] == pytest.approx(0.1)
    assert low["radius"]["dispersion"] == pytest.approx(0.0)
    assert low["radius"]["coverage"] == 0.0                  # log10(2.2 / 2) = 0.041 > 0.03
    assert high["radius"]["coverage"] == pytest.approx(0.75)
    assert high["radius"]["outliers"] == pytest.approx(0.25)  # 4.0 vs 2.0: +100 %
    assert high["catastrophic"] == pytest.approx(0.25) and low["catastrophic"] == 0.0
    assert low["flux"]["coverage"] is None
    assert low["angle"]["bias"] == pytest.approx(0.0) and low["angle"]["N"] == 3      # 190 -> +0 after wrap
    assert high["angle"]["outliers"] == pytest.approx(0.25)                          # 100 vs 10: 90 deg
    assert out["all"]["radius"]["N"] == 7


def test_angle_scored_only_for_elongated_objects(sc):
    truth_q = np.array([0.3, 0.69, 0.7, 0.95])
    s = sc.score_parameter("angle", sc.Estimate(np.array([10.0, 10.0, 80.0, 80.0])), np.full(4, 10.0), truth_q)
    assert s["N"] == 2 and s["outliers"] == 0.0


def test_tables_print_every_fitter(sc):
    truth = {"radius": np.full(4, 2.0), "flux": np.full(4, 100.0), "b/a": np.full(4, 0.5),
             "n": np.full(4, 1.0), "angle": np.full(4, 10.0), "snr": np.array([15.0, 30.0, 60.0, 200.0])}
    est = {p: sc.Estimate(truth[p] * 1.01, truth[p], truth[p] * 0.1) for p in sc.PARAMETERS}
    scores = {name: {"bins": sc.score_fitter(est, truth, np.ones(4, bool)), "speed": 12.5}
              for name in ("dre sersic", "pyimfit")}
    text = sc.format_tables(scores, ["dre sersic", "pyimfit"])
    assert text.count("dre sersic") >= 6 and "pyimfit" in text and "12.5" in text and "n/a" in text
