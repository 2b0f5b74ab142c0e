"""Fits against simulated truth: position matching, bias and scatter per parameter, headline numbers.

For each tile the fitted objects are matched to the truth galaxies by position (`sim.match`);
unflagged matches are compared parameter by parameter:

=============  ===========================================  ==============================
parameter      difference                                   objects
=============  ===========================================  ==============================
``AX_RATIO``   fitted - true                                all
``ANGLE``      fitted - true, wrapped to [-90, 90) degrees  true b/a <= 0.8 (others have none)
``LOGR``       fitted - true (log10 pixels)                 all
``INDEX``      fitted - true                                all
``FLUX``       fitted / true - 1                            all
=============  ===========================================  ==============================

The sub-grid estimates ``<P>_FIT`` (when the fit wrote them) get the same statistics under
``refined`` and their ``coverage``: the fraction of objects whose truth lies within
``<P>_FIT +- <P>_FIT_ERR`` (68 % for honest 1-sigma errors), overall and per S/N bin.

``bias`` is the median difference and ``scatter`` 1.4826 x the median absolute deviation (a robust
sigma); ``mean``, ``rms`` and ``n`` come with them, in the unit that ``units`` gives per parameter
(`DIFFERENCE_UNITS`, astropy strings; empty: dimensionless). The same statistics are given in bins of the
true S/N (`SNR_EDGES`) and of the true size (four equal bins over the grid's log r range; an open
bin edge is null). Every number is a plain float, int or null, so `validate` returns what
``validation.json`` holds.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..sim.match import ELONGATED_BELOW, match_positions, recovered

SNR_EDGES = (0.0, 20.0, 50.0, 100.0, 200.0, 500.0, np.inf)
MATCH_RADIUS = 2.0               # pixels
PARAMETERS = ("AX_RATIO", "ANGLE", "LOGR", "INDEX", "FLUX")
#: Unit of each parameter's differences, bias and scatter (LOGR: log10 pixels; FLUX: a fraction).
DIFFERENCE_UNITS = {"AX_RATIO": "", "ANGLE": "deg", "LOGR": "dex", "INDEX": "", "FLUX": ""}


def differences(fitted, truth) -> dict:
    """``{parameter: (difference per object, which objects count)}`` of matched pairs."""
    return {name: difference(name, fitted[name], truth) for name in PARAMETERS}


def difference(name, fit, truth) -> tuple:
    """One parameter's (difference per object, which objects count); see the module's table."""
    fit, true = np.asarray(fit, float), np.asarray(truth[name], float)
    if name == "FLUX":
        return fit / true - 1.0, np.ones(len(fit), bool)
    if name == "ANGLE":
        return np.mod(fit - true + 90.0, 180.0) - 90.0, np.asarray(truth["AX_RATIO"]) <= ELONGATED_BELOW
    return fit - true, np.ones(len(fit), bool)


def robust_stats(values) -> dict:
    """``n, bias (median), scatter (1.4826 MAD), mean, rms`` of the finite `values`."""
    values = np.asarray(values, float)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return {"n": 0, "bias": None, "scatter": None, "mean": None, "rms": None}
    median = float(np.median(values))
    return {"n": int(values.size), "bias": median,
            "scatter": float(1.4826 * np.median(np.abs(values - median))),
            "mean": float(values.mean()), "rms": float(np.sqrt(np.mean(values ** 2)))}


def binned(values, key, edges) -> list:
    """`robust_stats` of `values` in bins ``[edges[i], edges[i+1])`` of `key`."""
    values, key = np.asarray(values, float), np.asarray(key, float)
    rows = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (key >= lo) & (key < hi)
        rows.append({"lo": None if np.isinf(lo) else float(lo), "hi": None if np.isinf(hi) else float(hi),
                     **robust_stats(values[inside])})
    return rows


def size_edges(grid) -> tuple:
    """Four equal bins of true log r over the grid's range, open at both ends."""
    inner = np.linspace(grid.logr.start, grid.logr.start + grid.logr.step * (grid.logr.count - 1), 5)[1:-1]
    return (-np.inf, *map(float, inner), np.inf)


def match_tile(fitted, truth) -> tuple:
    """``(matched fitted rows, their truth rows, number of truth galaxies)`` of one tile."""
    galaxies = truth[truth["KIND"] == "galaxy"]          # astropy compares bytes and str columns
    index = match_positions(fitted["X_IMAGE"], fitted["Y_IMAGE"], galaxies["X"], galaxies["Y"],
                            MATCH_RADIUS)
    return fitted[index >= 0], galaxies[index[index >= 0]], len(galaxies)


def validate(pairs, grid) -> dict:
    """Validation of ``pairs = [(fitted table, truth table), ...]`` (one per tile) against the
    model `grid`: counts, headline recovery fractions, per-parameter statistics overall and
    binned by true S/N and size."""
    from astropy.table import vstack
    matched = [match_tile(f, t) for f, t in pairs]
    n_truth = sum(m[2] for m in matched)
    fitted = vstack([m[0] for m in matched], metadata_conflicts="silent")
    truth = vstack([m[1] for m in matched], metadata_conflicts="silent")
    clean = np.asarray(fitted["FLAGS"]) == 0 if len(fitted) else np.zeros(0, bool)
    f, t = fitted[clean], truth[clean]
    result = {"truth_galaxies": n_truth, "matched": len(fitted), "matched_unflagged": int(clean.sum()),
              "headline": headline(f, t, grid), "units": dict(DIFFERENCE_UNITS), "parameters": {}}
    result["refined"] = refined(f, t)
    edges = size_edges(grid)
    for name, (diff, use) in differences(f, t).items():
        snr, size = np.asarray(t["SNR"], float)[use], np.asarray(t["LOGR"], float)[use]
        result["parameters"][name] = {"all": robust_stats(diff[use]),
                                      "by_snr": binned(diff[use], snr, SNR_EDGES),
                                      "by_size": binned(diff[use], size, edges)}
    return result


def refined(fitted, truth) -> dict:
    """``{parameter: {"all", "by_snr"}}``: `robust_stats` of the ``<P>_FIT`` differences (defined as
    in `differences`) with the ``coverage`` of ``<P>_FIT +- <P>_FIT_ERR``; parameters without
    those columns or without a finite error (n with a one-value index axis) are left out."""
    out = {}
    for name in PARAMETERS:
        if f"{name}_FIT" not in fitted.colnames or f"{name}_FIT_ERR" not in fitted.colnames:
            continue
        fit, err = np.asarray(fitted[f"{name}_FIT"], float), np.asarray(fitted[f"{name}_FIT_ERR"], float)
        diff, use = difference(name, fit, truth)
        miss = np.abs(fit - np.asarray(truth[name], float)) if name == "FLUX" else np.abs(diff)
        use = use & np.isfinite(err) & np.isfinite(diff)
        if not use.any():
            continue
        inside, snr = (miss <= err)[use], np.asarray(truth["SNR"], float)[use]
        rows = binned(diff[use], snr, SNR_EDGES)
        for row in rows:
            sel = (snr >= (row["lo"] if row["lo"] is not None else -np.inf)) & \
                  (snr < (row["hi"] if row["hi"] is not None else np.inf))
            row["coverage"] = float(np.mean(inside[sel])) if sel.any() else None
        out[name] = {"all": {**robust_stats(diff[use]), "coverage": float(np.mean(inside))}, "by_snr": rows}
    return out


def headline(fitted, truth, grid) -> dict:
    """Recovery fractions of unflagged matched galaxies: shapes within one grid step, fluxes within
    5 % and 10 %, and the median chi-square per degree of freedom."""
    if len(fitted) == 0:
        return {}
    ok = recovered(fitted, truth, grid)
    ratio = np.asarray(fitted["FLUX"], float) / np.asarray(truth["FLUX"], float)
    return {f"b/a within {grid.ax_ratio.step:g}": float(np.mean(ok["b/a"])),
            f"angle within {grid.angle.step:g} deg (b/a <= {ELONGATED_BELOW:g})": float(np.mean(ok["angle"])),
            f"log r within {grid.logr.step:g}": float(np.mean(ok["log r"])),
            "flux within 5 %": float(np.mean(ok["flux"])),
            "flux within 10 %": float(np.mean(np.abs(ratio - 1) <= 0.10)),
            "median chi2/dof": float(np.median(np.asarray(fitted["CHI2"]) / np.asarray(fitted["DOF"])))}


def write_json(path, result: dict) -> Path:
    """Write `result` as indented JSON (strict: no NaN or infinity)."""
    path = Path(path)
    path.write_text(json.dumps(result, indent=1, allow_nan=False) + "\n")
    return path
