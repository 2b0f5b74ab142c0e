"""The information limit of the accuracy benchmark: Cramer-Rao bounds from the truth.

For each scored galaxy, the Fisher matrix of its noiseless true image (GalSim, the simulation's own
rendering: ``accuracy_sim``'s PSF and conventions) over the pixels of its cutout,

    F_ij = sum_p (dm/dtheta_i)(dm/dtheta_j) / var_p,    var_p = (sky + m_p) / gain,

with theta = (ln F, log10 r_e, b/a, log10 n, angle, x, y) and the sky level known, gives the
smallest covariance ``F^-1`` that an unbiased estimator can reach from those pixels (central
differences of renders; the flux derivative is the image itself). Three cases: the fit mask that
both fitters get (``mask``); the whole 128 x 128 stamp with the neighbours left out (``stamp``: what
a fitter that modelled every neighbour exactly could use); the fit mask with a constant sky level
fitted as well, without prior (``mask, sky free``: a fitter that learns the sky from the cutout
alone; dre fits it with a prior from the background map's error, ``BACK_ERR``).

`bound_estimates` turns the bounds into a "fitter" for ``accuracy_scoring.score_fitter``: each
object's error drawn from N(0, sigma_CR) in the parameter's fitting space, ``DRAWS`` times
(pooled), so its dispersion and outlier fraction per S/N bin are those of an efficient unbiased
fitter with Gaussian errors on the same objects. A biased estimator (a prior, a grid posterior) can
go below it at low S/N; a fitter above it has room to improve.
"""

from __future__ import annotations

import math

import numpy as np

import accuracy_scoring as sc
from accuracy_sim import make_psf

#: theta: name, central-difference step (in its own unit).
STEPS = (("log10 r", 0.01), ("b/a", 0.01), ("log10 n", 0.01), ("angle", 1.0), ("x", 0.05), ("y", 0.05))
PARAMS = ("ln F",) + tuple(name for name, _ in STEPS)
#: GalSim limits of the Sersic index.
N_RANGE = (0.3, 6.2)
DRAWS = 40


def render(galsim, psf, shape, origin, x, y, n, q, angle, logr):
    """Unit-flux PSF-convolved Sersic on the cutout's pixels: ``origin`` = (X0, Y0), the 0-based
    tile offset of the cutout (its pixel [0, 0] is tile pixel X0 + 1, Y0 + 1 in FITS numbering)."""
    gsp = galsim.GSParams(maximum_fft_size=16384)
    gal = galsim.Sersic(n=n, half_light_radius=10 ** logr * math.sqrt(q), gsparams=gsp)
    prof = galsim.Convolve(gal.shear(q=q, beta=angle * galsim.degrees), psf, gsparams=gsp)
    x0, y0 = int(origin[0]), int(origin[1])
    img = galsim.ImageD(galsim.BoundsI(x0 + 1, x0 + shape[1], y0 + 1, y0 + shape[0]), scale=1.0)
    prof.drawImage(img, center=galsim.PositionD(x, y))
    return img.array


def derivatives(galsim, psf, shape, origin, truth: dict) -> tuple:
    """The unit-flux image and its derivatives along PARAMS[1:] (central differences; one-sided where
    a step would leave b/a <= 1 or GalSim's index range)."""
    theta = {"log10 r": truth["LOGR"], "b/a": truth["AX_RATIO"], "log10 n": math.log10(truth["INDEX"]),
             "angle": truth["ANGLE"], "x": truth["X"], "y": truth["Y"]}

    def image(t):
        return render(galsim, psf, shape, origin, t["x"], t["y"], 10 ** t["log10 n"], t["b/a"], t["angle"],
                      t["log10 r"])

    def valid(t):
        return 0.0 < t["b/a"] <= 1.0 and N_RANGE[0] <= 10 ** t["log10 n"] <= N_RANGE[1]

    centre = image(theta)
    out = []
    for name, h in STEPS:
        up, down = dict(theta, **{name: theta[name] + h}), dict(theta, **{name: theta[name] - h})
        if valid(up) and valid(down):
            out.append((image(up) - image(down)) / (2 * h))
        elif valid(down):
            out.append((centre - image(down)) / h)
        else:
            out.append((image(up) - centre) / h)
    return centre, out


def fisher_sigmas(unit, derivs, flux, weights_of: dict, sky: float, gain: float, sky_free=()) -> dict:
    """{pixel set: 1-sigma Cramer-Rao bounds}, an array: ln F, then the parameters of ``derivs`` in
    their order; ``weights_of`` maps a set's name to its boolean pixels. The sets named in
    ``sky_free`` also fit a constant sky level (no prior), whose bound is left out. NaN where the
    Fisher matrix is singular."""
    model = flux * unit
    var = (sky + np.maximum(model, 0.0)) / gain
    jac = np.stack([model] + [flux * d for d in derivs] + [np.ones_like(model)]).reshape(2 + len(derivs), -1)
    out = {}
    for name, use in weights_of.items():
        j = jac if name in sky_free else jac[:-1]
        w = (np.asarray(use, bool).ravel() / var.ravel())
        fisher = (j * w) @ j.T
        try:
            with np.errstate(invalid="ignore"):
                sig = np.sqrt(np.diag(np.linalg.inv(fisher)))
        except np.linalg.LinAlgError:
            sig = np.full(len(j), np.nan)
        out[name] = sig[:len(jac) - 1]
    return out


def bound_task(task):
    """One galaxy: (index, {pixel set: sigmas}). ``task`` = (index, truth row dict, cutout origin,
    fit mask, population)."""
    import galsim
    index, truth, origin, mask, pop = task
    psf = make_psf(galsim, pop)
    unit, derivs = derivatives(galsim, psf, mask.shape, origin, truth)
    sets = {"mask": mask, "stamp": np.ones_like(mask, bool), "mask, sky free": mask}
    sigmas = fisher_sigmas(unit, derivs, truth["FLUX"], sets, pop.sky_level, pop.gain, sky_free=("mask, sky free",))
    return index, {name: dict(zip(PARAMS, map(float, sig))) for name, sig in sigmas.items()}


def bound_estimates(sigmas: list, truth: dict, seed: int = 0) -> tuple:
    """An efficient unbiased fitter's `Estimate`s for `score_fitter`: ``sigmas`` (one dict of PARAMS per
    present object, or None) drawn DRAWS times; returns (estimates, truth, fitted) over the pooled
    draws. Errors: log10 r and log10 n as drawn, flux ``exp(ln F error) - 1``, b/a and angle linear."""
    n = len(truth["snr"])
    sig = {p: np.array([np.nan if s is None else s[p] for s in sigmas], float) for p in PARAMS}
    rng = np.random.default_rng(seed)
    z = {p: rng.standard_normal((DRAWS, n)) for p in ("ln F", "log10 r", "b/a", "log10 n", "angle")}
    tile = {k: np.tile(np.asarray(v, float), DRAWS) for k, v in truth.items()}
    est = {"radius": sc.Estimate((truth["radius"] * 10 ** (sig["log10 r"] * z["log10 r"])).ravel()),
           "flux": sc.Estimate((truth["flux"] * np.exp(sig["ln F"] * z["ln F"])).ravel()),
           "b/a": sc.Estimate((truth["b/a"] + sig["b/a"] * z["b/a"]).ravel()),
           "n": sc.Estimate((truth["n"] * 10 ** (sig["log10 n"] * z["log10 n"])).ravel()),
           "angle": sc.Estimate((truth["angle"] + sig["angle"] * z["angle"]).ravel())}
    fitted = np.tile(np.isfinite(sig["log10 r"]) & np.isfinite(sig["ln F"]), DRAWS)
    return est, tile, fitted
