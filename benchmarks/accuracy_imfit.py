"""PyImfit as the reference fitter of the accuracy benchmark: one PSF-convolved Sersic per cutout.

Each galaxy is fitted on the very cutout dre fitted (data, mask and rms from the make_cuts file),
with the tile's PSFEx PSF as dre uses it (``read_psf``, then the pixel response divided out like
``dre --psf-pixel included``: Imfit's models are pixel-integrated by subsampling, as dre's stamps
are); Levenberg-Marquardt, the rms as error image, pixels outside the mask (or with rms <= 0, or
not finite) masked. Starting values come from the SExtractor catalogue columns that dre's summary
carries (position, THETA_IMAGE, ELONGATION, FLUX_RADIUS, FLUX_AUTO) and n = 2, never from the
truth. Errors: Imfit's L-M parameter errors; the flux error from the full covariance (the inverse
of J^T W J with J by finite differences of the model image), because flux, r_e, n and I_e are
strongly correlated.

Conventions: Imfit's r_e is the major-axis half-light radius (= 10**LOGR), PA is counter-clockwise
from +y, so ANGLE = PA + 90; ell = 1 - b/a; pixel centres at integer 1-based coordinates.
"""

from __future__ import annotations

import math
import time

import numpy as np
from scipy.special import gamma, gammaincinv

PARAMS = ("X0", "Y0", "PA", "ell", "n", "I_e", "r_e")


def import_pyimfit():
    """The pyimfit module, or None with the reason."""
    try:
        import pyimfit
    except ImportError as exc:
        return None, (f"PyImfit is not installed ({exc}): pip install -e '.[bench]' (builds from its "
                      "sdist; needs g++ with OpenMP)")
    return pyimfit, ""


def sersic_total_flux(i_e, r_e, n, q):
    """Total flux of an untruncated elliptical Sersic: 2 pi n e^b b^(-2n) Gamma(2n) I_e r_e^2 q."""
    b = gammaincinv(2.0 * n, 0.5)
    return 2.0 * math.pi * n * np.exp(b) * b ** (-2.0 * n) * gamma(2.0 * n) * i_e * r_e ** 2 * q


def initial_guess(row, x0_cut):
    """Start values from SExtractor columns (cutout 1-based coordinates of the centre in x0_cut)."""
    q = float(np.clip(1.0 / max(float(row["ELONGATION"]), 1.0), 0.1, 1.0))
    r_e = float(np.clip(row["FLUX_RADIUS"], 0.5, 60.0))
    flux = float(row["FLUX_AUTO"]) if float(row["FLUX_AUTO"]) > 0 else 1.0
    n = 2.0
    i_e = flux / sersic_total_flux(1.0, r_e, n, q)
    pa = float(np.mod(float(row["THETA_IMAGE"]) - 90.0, 180.0))
    return {"X0": x0_cut[0], "Y0": x0_cut[1], "PA": pa, "ell": 1.0 - q, "n": n, "I_e": i_e, "r_e": r_e}


def model_description(pyimfit, guess):
    g = guess
    model = pyimfit.SimpleModelDescription()
    model.x0.setValue(g["X0"], [g["X0"] - 3, g["X0"] + 3])
    model.y0.setValue(g["Y0"], [g["Y0"] - 3, g["Y0"] + 3])
    sersic = pyimfit.make_imfit_function("Sersic")
    sersic.PA.setValue(g["PA"], [g["PA"] - 360.0, g["PA"] + 360.0])
    sersic.ell.setValue(min(g["ell"], 0.85), [0.0, 0.95])
    sersic.n.setValue(g["n"], [0.3, 8.0])
    sersic.I_e.setValue(g["I_e"], [g["I_e"] * 1e-4, g["I_e"] * 1e4])
    sersic.r_e.setValue(g["r_e"], [0.1, 200.0])
    model.addFunction(sersic)
    return model


def flux_error(fitter, params, mask_good, rms, step=1e-4):
    """Flux error from the full covariance (J^T W J)^-1, J by central differences of the model."""
    base = np.asarray(params, float)
    w = (mask_good / np.where(rms > 0, rms, 1.0))[mask_good]
    cols = []
    for k in range(len(base)):
        h = step * max(abs(base[k]), 1e-2)
        up, dn = base.copy(), base.copy()
        up[k] += h
        dn[k] -= h
        diff = fitter.getModelImage(newParameters=up) - fitter.getModelImage(newParameters=dn)
        cols.append(diff[mask_good] * w / (2 * h))
    jac = np.stack(cols, axis=1)
    try:
        cov = np.linalg.inv(jac.T @ jac)
    except np.linalg.LinAlgError:
        return float("nan")
    p = dict(zip(PARAMS, base))
    grad = np.zeros(len(base))
    for k, name in enumerate(PARAMS):
        if name in ("ell", "n", "I_e", "r_e"):
            h = step * max(abs(base[k]), 1e-2)
            hi, lo = dict(p), dict(p)
            hi[name] += h
            lo[name] -= h
            grad[k] = (_flux(hi) - _flux(lo)) / (2 * h)
    var = float(grad @ cov @ grad)
    return math.sqrt(var) if var >= 0 else float("nan")


def _flux(p):
    return float(sersic_total_flux(p["I_e"], p["r_e"], p["n"], 1.0 - p["ell"]))


def crop_box(good, pad: int = 2):
    """(row slice, column slice) of the bounding box of the usable pixels, ``pad`` pixels wider:
    the fit sees the same pixels, and Imfit computes its model (with the PSF margin it adds itself)
    on far fewer (a 128x128 model costs about 30 ms, a 30x30 one a tenth of it)."""
    rows, cols = np.nonzero(good)
    if rows.size == 0:
        return None
    ny, nx = good.shape
    return (slice(max(rows.min() - pad, 0), min(rows.max() + pad + 1, ny)),
            slice(max(cols.min() - pad, 0), min(cols.max() + pad + 1, nx)))


def fit_one(pyimfit, data, mask, rms, psf, guess):
    """Fit one cutout (``guess`` in 1-based cutout coordinates). Returns the canonical values and
    errors (NaN on failure; X, Y in 1-based cutout coordinates) and the seconds of the L-M fit."""
    good = mask & (rms > 0) & np.isfinite(data) & np.isfinite(rms)
    out = {k: float("nan") for k in ("r", "r_err", "flux", "flux_err", "q", "q_err", "n", "n_err",
                                     "angle", "angle_err", "x", "y")}
    box = crop_box(good)
    if box is None:
        return out, 0.0
    ys, xs = box
    data, rms, good = data[box].astype(np.float64), rms[box].astype(np.float64), good[box]
    guess = dict(guess, X0=guess["X0"] - xs.start, Y0=guess["Y0"] - ys.start)
    seconds = 0.0
    try:
        fitter = pyimfit.Imfit(model_description(pyimfit, guess), psf=psf, maxThreads=1)
        start = time.perf_counter()
        fitter.fit(np.where(good, data, 0.0), error=np.where(good, rms, 1.0),
                   mask=(~good).astype(np.float64), solver="LM")
        seconds = time.perf_counter() - start
        if fitter.fitError or not fitter.fitConverged:
            out["error"] = "L-M did not converge"
            return out, seconds
        values, errs = fitter.getRawParameters(), fitter.getParameterErrors()
        p, e = dict(zip(PARAMS, values)), dict(zip(PARAMS, errs))
        out.update(r=p["r_e"], r_err=e["r_e"], flux=_flux(p), q=1.0 - p["ell"], q_err=e["ell"],
                   n=p["n"], n_err=e["n"], angle=float(np.mod(p["PA"] + 90.0, 180.0)), angle_err=e["PA"],
                   x=p["X0"] + xs.start, y=p["Y0"] + ys.start)
        out["flux_err"] = flux_error(fitter, values, good, rms)
    except Exception as exc:                      # a failed fit is a NaN row, like dre's flags
        out["error"] = f"{type(exc).__name__}: {exc}"
    return out, seconds
