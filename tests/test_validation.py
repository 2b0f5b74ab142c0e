"""Validation against truth (dre_hpc.report.validation) on hand-made catalogues with known answers:
the statistics must equal a direct NumPy computation, matching and flag selection must pick the
right objects, angles wrap, and the JSON is strict."""

from __future__ import annotations

import json

import numpy as np
import pytest
from astropy.table import Table

from dre_hpc.models.grid import ModelGrid
from dre_hpc.report.validation import (SNR_EDGES, binned, differences, robust_stats, size_edges,
                                       validate, write_json)

GRID = ModelGrid.default()


def _truth(n, rng):
    return Table({"ID": np.arange(n), "KIND": ["galaxy"] * (n - 2) + ["star"] * 2,
                  "X": rng.uniform(100, 900, n), "Y": rng.uniform(100, 900, n),
                  "INDEX": np.full(n, 4.0), "AX_RATIO": rng.uniform(0.2, 1.0, n),
                  "ANGLE": rng.uniform(0, 180, n), "LOGR": rng.uniform(0.2, 1.1, n),
                  "FLUX": rng.uniform(1e3, 1e4, n), "SNR": rng.uniform(10, 400, n)})


def _fitted(truth, rng, flags=None):
    n = len(truth)
    return Table({"X_IMAGE": truth["X"] + rng.normal(0, 0.3, n), "Y_IMAGE": truth["Y"] + rng.normal(0, 0.3, n),
                  "AX_RATIO": truth["AX_RATIO"] + 0.02 + rng.normal(0, 0.05, n),
                  "ANGLE": np.mod(truth["ANGLE"] + 3 + rng.normal(0, 5, n), 180),
                  "LOGR": truth["LOGR"] - 0.01 + rng.normal(0, 0.04, n), "INDEX": np.full(n, 4.0),
                  "FLUX": truth["FLUX"] * (1.01 + rng.normal(0, 0.03, n)),
                  "CHI2": rng.uniform(900, 1100, n), "DOF": np.full(n, 1000),
                  "FLAGS": np.zeros(n, int) if flags is None else flags})


def _direct(values):
    median = np.median(values)
    return median, 1.4826 * np.median(np.abs(values - median))


def test_statistics_equal_a_direct_computation():
    rng = np.random.default_rng(5)
    truth = _truth(400, rng)
    fitted = _fitted(truth[:-2], rng)                  # the galaxies, in truth order
    flags = np.zeros(len(fitted), int)
    flags[:10] = 4                                     # flagged: left out
    fitted["FLAGS"] = flags
    extra = _fitted(truth[:1], rng)                    # an object far from any galaxy: unmatched
    extra["X_IMAGE"], extra["Y_IMAGE"] = 5.0, 5.0
    from astropy.table import vstack
    result = validate([(vstack([fitted, extra]), truth)], GRID)
    assert (result["truth_galaxies"], result["matched"], result["matched_unflagged"]) == (398, 398, 388)

    f, t = fitted[10:], truth[10:398]
    for name, diff in (("AX_RATIO", f["AX_RATIO"] - t["AX_RATIO"]), ("LOGR", f["LOGR"] - t["LOGR"]),
                       ("FLUX", f["FLUX"] / t["FLUX"] - 1)):
        stats = result["parameters"][name]["all"]
        bias, scatter = _direct(np.asarray(diff))
        assert stats["n"] == 388
        assert stats["bias"] == pytest.approx(bias, abs=1e-12)
        assert stats["scatter"] == pytest.approx(scatter, abs=1e-12)
        assert stats["mean"] == pytest.approx(np.mean(diff), abs=1e-12)
    assert result["parameters"]["AX_RATIO"]["all"]["bias"] == pytest.approx(0.02, abs=0.01)
    assert result["parameters"]["FLUX"]["all"]["bias"] == pytest.approx(0.01, abs=0.006)

    angle = result["parameters"]["ANGLE"]["all"]              # only true b/a <= 0.8
    elongated = np.asarray(t["AX_RATIO"]) <= 0.8
    d = np.mod(np.asarray(f["ANGLE"] - t["ANGLE"]) + 90, 180) - 90
    assert angle["n"] == int(elongated.sum())
    assert angle["bias"] == pytest.approx(_direct(d[elongated])[0], abs=1e-12)
    assert angle["bias"] == pytest.approx(3, abs=1.5)

    by_snr = result["parameters"]["LOGR"]["by_snr"]
    assert [row["lo"] for row in by_snr] == list(SNR_EDGES[:-1]) and by_snr[-1]["hi"] is None
    assert sum(row["n"] for row in by_snr) == 388
    inside = (np.asarray(t["SNR"]) >= 100) & (np.asarray(t["SNR"]) < 200)
    assert by_snr[3]["n"] == int(inside.sum())
    assert by_snr[3]["bias"] == pytest.approx(_direct(np.asarray(f["LOGR"] - t["LOGR"])[inside])[0])
    assert sum(row["n"] for row in result["parameters"]["LOGR"]["by_size"]) == 388


def test_angles_wrap_at_90_degrees():
    truth = Table({"ANGLE": [179.0, 1.0, 90.0], "AX_RATIO": [0.5, 0.5, 0.9]})
    fitted = Table({"ANGLE": [1.0, 179.0, 0.0]})
    for name in ("AX_RATIO", "LOGR", "INDEX", "FLUX"):
        truth[name] = fitted[name] = np.ones(3) if name != "AX_RATIO" else truth["AX_RATIO"]
    diff, use = differences(fitted, truth)["ANGLE"]
    np.testing.assert_allclose(diff, [2.0, -2.0, -90.0])
    assert use.tolist() == [True, True, False]


def test_empty_bins_and_no_objects_give_nulls_that_json_accepts(tmp_path):
    assert robust_stats([np.nan]) == {"n": 0, "bias": None, "scatter": None, "mean": None, "rms": None}
    rows = binned([1.0, 2.0], [5.0, 600.0], SNR_EDGES)
    assert [r["n"] for r in rows] == [1, 0, 0, 0, 0, 1]
    edges = size_edges(GRID)
    assert edges[0] == -np.inf and edges[-1] == np.inf and len(edges) == 5
    rng = np.random.default_rng(1)
    truth = _truth(20, rng)
    nothing = _fitted(truth[:0], rng)
    result = validate([(nothing, truth)], GRID)
    assert result["matched"] == 0 and result["headline"] == {}
    path = write_json(tmp_path / "validation.json", result)
    assert json.loads(path.read_text())["truth_galaxies"] == 18


def test_truth_read_back_from_fits_matches(tmp_path):
    """Truth catalogues come from FITS files, where KIND is a bytes column."""
    rng = np.random.default_rng(9)
    truth = _truth(50, rng)
    truth.write(tmp_path / "truth.fits")
    from dre_hpc.sim.tile import read_truth
    result = validate([(_fitted(truth[:-2], rng), read_truth(tmp_path / "truth.fits"))], GRID)
    assert (result["truth_galaxies"], result["matched_unflagged"]) == (48, 48)


def test_refined_estimates_get_their_coverage():
    """<P>_FIT with errors that are right cover the truth for ~68 %; errors half as large, ~38 %;
    a one-value n axis (NaN errors) is left out."""
    rng = np.random.default_rng(8)
    truth = _truth(4002, rng)
    fitted = _fitted(truth[:-2], rng)
    galaxies = truth[:-2]
    sigma = rng.uniform(0.01, 0.05, len(galaxies))
    fitted["LOGR_FIT"] = galaxies["LOGR"] + rng.normal(0, sigma)
    fitted["LOGR_FIT_ERR"] = sigma
    fitted["AX_RATIO_FIT"] = galaxies["AX_RATIO"] + rng.normal(0, sigma)
    fitted["AX_RATIO_FIT_ERR"] = sigma / 2
    fitted["INDEX_FIT"], fitted["INDEX_FIT_ERR"] = 4.0, np.nan
    result = validate([(fitted, truth)], GRID)["refined"]
    assert set(result) == {"LOGR", "AX_RATIO"}
    assert result["LOGR"]["all"]["coverage"] == pytest.approx(0.683, abs=0.03)
    assert result["AX_RATIO"]["all"]["coverage"] == pytest.approx(0.383, abs=0.03)
    assert result["LOGR"]["all"]["scatter"] == pytest.approx(np.median(sigma), rel=0.15)
    for row in result["LOGR"]["by_snr"]:
        if row["n"] > 300:
            assert row["coverage"] == pytest.approx(0.683, abs=0.08)
    json.dumps(result, allow_nan=False)
