"""Scoring of fitted galaxy parameters against a truth, with the Euclid Morphology Challenge's metrics.

Pure NumPy, no I/O: used by ``bench_accuracy.py`` and tested by ``tests/test_bench_accuracy.py``.

Errors per object (Merlin et al. 2023, Bretonniere et al. 2023, the Challenge's papers):

- ``radius``: relative, ``r_fit / r_true - 1`` (r = major-axis half-light radius);
- ``flux``: relative, ``F_fit / F_true - 1``;
- ``n``: ``log10(n_fit / n_true)``;
- ``b/a``: absolute, ``q_fit - q_true``;
- ``angle``: degrees, ``fit - true`` wrapped into [-90, 90), only for objects with true b/a < 0.7.

Per bin: bias = median error; dispersion = 68th percentile of ``|error - median|``; outliers =
fraction with ``|error| > 0.5`` (for the angle, whose errors are degrees, ``> 45``: half of the
largest possible error, our choice: the Challenge did not score the angle); coverage = fraction of
objects whose truth lies inside the fitter's reported 1-sigma interval (``None`` where the fitter
reports no error); catastrophic = fraction with ``|log10 r_fit/r_true| > 0.3`` or
``|F_fit/F_true - 1| > 0.5``; completeness = fitted / present.

A fitter's numbers come in as `Estimate` arrays in the *canonical* units of the truth table
(radius in px, flux, b/a, n, angle in degrees) with an optional interval (centre, half-width) in the
space where the fitter reports it (``log10`` for a log-radius, linear otherwise; the angle's interval
is compared modulo 180).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PARAMETERS = ("radius", "flux", "b/a", "n", "angle")
#: |error| above which an object is an outlier (angle: degrees).
OUTLIER_LIMITS = {"radius": 0.5, "flux": 0.5, "b/a": 0.5, "n": 0.5, "angle": 45.0}
#: Objects rounder than this have no measurable angle and are left out of its scores.
ANGLE_BELOW_Q = 0.7
CATASTROPHIC_DEX = 0.3
CATASTROPHIC_FLUX = 0.5
SNR_BINS = ((10.0, 20.0), (20.0, 50.0), (50.0, 100.0), (100.0, 1000.0))


@dataclass
class Estimate:
    """One parameter of one fitter for N objects: ``value`` in canonical units; the 1-sigma interval
    ``centre +- err`` in ``space`` ('linear' or 'log10' of the canonical value); ``err`` None: no error."""

    value: np.ndarray
    centre: np.ndarray | None = None
    err: np.ndarray | None = None
    space: str = "linear"


def wrap_angle(delta):
    """Angle differences in degrees wrapped into [-90, 90) (position angles have period 180)."""
    return np.mod(np.asarray(delta, float) + 90.0, 180.0) - 90.0


def errors(param: str, fit, true):
    """Per-object error of ``param`` with the Challenge's definition (see the module docstring)."""
    fit, true = np.asarray(fit, float), np.asarray(true, float)
    with np.errstate(divide="ignore", invalid="ignore"):
        if param in ("radius", "flux"):
            return fit / true - 1.0
        if param == "n":
            return np.log10(fit / true)
        if param == "b/a":
            return fit - true
        if param == "angle":
            return wrap_angle(fit - true)
    raise ValueError(f"unknown parameter {param!r}; expected one of {PARAMETERS}")


def bias(err) -> float:
    """Median error (NaN for no objects)."""
    err = np.asarray(err, float)
    return float(np.median(err)) if err.size else float("nan")


def dispersion(err) -> float:
    """68th percentile of ``|error - median|``."""
    err = np.asarray(err, float)
    return float(np.percentile(np.abs(err - np.median(err)), 68.0)) if err.size else float("nan")


def outlier_fraction(err, limit: float = 0.5) -> float:
    """Fraction of objects with ``|error| > limit``."""
    err = np.asarray(err, float)
    return float(np.mean(np.abs(err) > limit)) if err.size else float("nan")


def covered(true, centre, err, space: str = "linear", period: float | None = None):
    """Booleans: the truth lies within ``centre +- err`` (in ``space``; modulo ``period`` if given).
    A missing (non-finite) error or centre counts as not covered."""
    true = np.asarray(true, float)
    t = np.log10(true) if space == "log10" else true
    with np.errstate(invalid="ignore"):
        d = np.asarray(centre, float) - t
        if period is not None:
            d = np.mod(d + period / 2, period) - period / 2
        ok = np.abs(d) <= np.asarray(err, float)
    return ok & np.isfinite(d) & np.isfinite(np.asarray(err, float))


def coverage(true, centre, err, space: str = "linear", period: float | None = None) -> float:
    """Fraction of objects whose truth lies in the reported 1-sigma interval (0.683 if Gaussian and right)."""
    c = covered(true, centre, err, space, period)
    return float(np.mean(c)) if c.size else float("nan")


def catastrophic(r_fit, r_true, f_fit, f_true):
    """Booleans: radius off by more than 0.3 dex or flux by more than 50 % (NaN fits count)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        dex = np.abs(np.log10(np.asarray(r_fit, float) / np.asarray(r_true, float)))
        rel = np.abs(np.asarray(f_fit, float) / np.asarray(f_true, float) - 1.0)
    return ~((dex <= CATASTROPHIC_DEX) & (rel <= CATASTROPHIC_FLUX))


def score_parameter(param: str, est: Estimate, true, q_true) -> dict:
    """N, bias, dispersion, outliers and coverage of one parameter over the objects given.
    Objects whose fitted value is not finite are left out (they count in completeness instead)."""
    true, value = np.asarray(true, float), np.asarray(est.value, float)
    use = np.isfinite(value) & np.isfinite(true)
    if param == "angle":
        use &= np.asarray(q_true, float) < ANGLE_BELOW_Q
    err = errors(param, value[use], true[use])
    out = {"N": int(use.sum()), "bias": bias(err), "dispersion": dispersion(err),
           "outliers": outlier_fraction(err, OUTLIER_LIMITS[param]), "coverage": None}
    if est.err is not None and est.centre is not None:
        out["coverage"] = coverage(true[use], np.asarray(est.centre, float)[use], np.asarray(est.err, float)[use],
                                   est.space, 180.0 if param == "angle" else None)
    return out


def snr_bins(snr, bins=SNR_BINS) -> list:
    """``[(label, booleans)]`` per S/N bin (low <= S/N < high; the last bin includes its top), then 'all'."""
    snr = np.asarray(snr, float)
    out = []
    for k, (lo, hi) in enumerate(bins):
        top = snr <= hi if k == len(bins) - 1 else snr < hi
        out.append((f"{lo:g}-{hi:g}", (snr >= lo) & top))
    out.append(("all", (snr >= bins[0][0]) & (snr <= bins[-1][1])))
    return out


def score_fitter(estimates: dict, truth: dict, fitted, bins=SNR_BINS) -> dict:
    """Scores of one fitter per S/N bin.

    Parameters
    ----------
    estimates : dict
        parameter name -> `Estimate` over the *present* objects (NaN where not fitted).
    truth : dict of arrays over the present objects
        ``radius, flux, b/a, n, angle, snr``.
    fitted : bool array over the present objects
        True where the fitter produced a result (detected, cut and fitted).
    """
    fitted = np.asarray(fitted, bool)
    result = {}
    for label, sel in snr_bins(truth["snr"], bins):
        row = {"present": int(sel.sum()), "fitted": int((sel & fitted).sum()),
               "completeness": float(np.mean(fitted[sel])) if sel.any() else float("nan")}
        use = sel & fitted
        if "radius" in estimates and "flux" in estimates:
            cat = catastrophic(estimates["radius"].value, truth["radius"], estimates["flux"].value, truth["flux"])
            row["catastrophic"] = float(np.mean(cat[use])) if use.any() else float("nan")
        for param, est in estimates.items():
            sub = Estimate(_take(est.value, use), _take(est.centre, use), _take(est.err, use), est.space)
            row[param] = score_parameter(param, sub, truth[param][use], truth["b/a"][use])
        result[label] = row
    return result


def _take(a, sel):
    return None if a is None else np.asarray(a, float)[sel]


# ---------------------------------------------------------------------------------------------------
# Printing

METRICS = (("bias", "bias", "{:+.3f}"), ("disp", "dispersion", "{:.3f}"), ("outl", "outliers", "{:.3f}"),
           ("cov", "coverage", "{:.2f}"))
GROUP = 5 + 7 * len(METRICS)


def _cell(x, width=7, fmt="{:+.3f}"):
    if x is None:
        return "n/a".rjust(width)
    if isinstance(x, float) and not np.isfinite(x):
        return "-".rjust(width)
    return fmt.format(x).rjust(width)


def _group(s, param):
    """One fitter's cells of one row: N and the metrics."""
    if s is None:
        return " " * GROUP
    cells = f"{s['N']:>5d}"
    for _, key, fmt in METRICS:
        if param == "angle" and key in ("bias", "dispersion"):
            fmt = fmt.replace(".3f", ".2f")
        cells += _cell(s[key], fmt=fmt)
    return cells


def format_tables(scores: dict, names: list, units: dict | None = None) -> str:
    """Text tables, one per parameter, the fitters ``names`` side by side; then completeness,
    catastrophic fraction and speed. ``scores[name]`` holds ``"bins"`` (`score_fitter`'s result)
    and optionally ``"speed"`` and ``"speed_command"`` (objects/s per core: fit; whole run)."""
    units = units or {}
    labels = list(scores[names[0]]["bins"].keys())
    head = f"{'S/N':>9s} |" + " |".join(f"{n[:GROUP]:>{GROUP}s}" for n in names)
    sub = f"{'':>9s} |" + " |".join(f"{'N':>5s}" + "".join(f"{m:>7s}" for m, _, _ in METRICS) for _ in names)
    lines = []
    for param in PARAMETERS:
        if not any(param in scores[n]["bins"][labels[0]] for n in names):
            continue
        lines += ["", f"{param}: {units.get(param, '')}", head, sub]
        for label in labels:
            lines.append(f"{label:>9s} |" + " |".join(_group(scores[n]["bins"][label].get(param), param)
                                                      for n in names))
    lines += ["", "completeness (fitted / present) and catastrophic fraction (|dlog r| > 0.3 dex or |dF/F| > 0.5)",
              f"{'S/N':>9s} {'true':>5s} |" + " |".join(f"{n[:22]:>22s}" for n in names),
              f"{'':>9s} {'':>5s} |" + " |".join(f"{'compl':>11s}{'catastr':>11s}" for _ in names)]
    for label in labels:
        row = scores[names[0]]["bins"][label]
        cells = [_cell(scores[n]["bins"][label]["completeness"], 11, "{:.3f}")
                 + _cell(scores[n]["bins"][label].get("catastrophic", float("nan")), 11, "{:.3f}") for n in names]
        lines.append(f"{label:>9s} {row['present']:>5d} |" + " |".join(cells))
    for key, label in (("speed", "obj/s/core fit"), ("speed_command", "obj/s/core all")):
        lines.append(f"{label:>15s} |" + " |".join(_cell(scores[n].get(key), 22, "{:.1f}") for n in names))
    return "\n".join(lines)
