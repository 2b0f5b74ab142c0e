"""Simulated cutouts with known truth (GalSim): for tests, benchmarks and the demo.

Galaxies are Sersic profiles with parameters drawn inside a model grid, convolved with a Moffat
PSF, drawn pixel-integrated at a random sub-pixel position around the cut centre, with Gaussian
sky noise scaled to a target S/N. S/N is GalSim's optimal definition: sqrt(sum I^2) / sigma.
The PSF handed to the fit is the same Moffat drawn pixel-integrated (what PSFEx measures).
The mask is ``noiseless image > 1 sigma`` cleaned like make_cuts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..io.cuts import CutoutSet, empty_objects
from ..preprocess.masks import clean_mask


@dataclass(frozen=True)
class SimSpec:
    """What to simulate. Ranges are (low, high), drawn uniformly."""

    n_objects: int = 100
    seed: int = 12345
    boxsize: int = 128
    index: tuple = (4.0, 4.0)
    ax_ratio: tuple = (0.1, 1.0)
    logr: tuple = (0.2, 1.3)
    snr: tuple = (50.0, 200.0)
    flux: tuple = (1e3, 1e5)
    psf_fwhm: float = 2.5
    psf_beta: float = 3.5
    psf_size: int = 25
    max_offset: float = 0.5
    sky_sigma: float | None = None     # if given, noise is fixed and the flux follows the S/N


def _galsim():
    try:
        import galsim
    except ImportError:
        from ..errors import DreError
        raise DreError("simulations need GalSim: pip install 'dre_hpc[sim]'") from None
    return galsim


def draw_psf(spec: SimSpec) -> np.ndarray:
    """The PSF image (pixel-integrated, unit sum) on a psf_size grid centred on pixel [size//2]."""
    galsim = _galsim()
    psf = galsim.Moffat(beta=spec.psf_beta, fwhm=spec.psf_fwhm)
    img = psf.drawImage(nx=spec.psf_size, ny=spec.psf_size, scale=1.0, use_true_center=False)
    arr = img.array.astype(np.float64)
    return arr / arr.sum()


def draw_truth(spec: SimSpec) -> np.ndarray:
    """The truth table: INDEX, AX_RATIO, ANGLE, LOGR, FLUX, SNR, DX, DY per object."""
    rng = np.random.default_rng(spec.seed)
    n = spec.n_objects
    truth = np.zeros(n, dtype=[("NUMBER", "i8"), ("INDEX", "f8"), ("AX_RATIO", "f8"), ("ANGLE", "f8"),
                               ("LOGR", "f8"), ("FLUX", "f8"), ("SNR", "f8"), ("DX", "f8"), ("DY", "f8")])
    truth["NUMBER"] = np.arange(1, n + 1)
    truth["INDEX"] = rng.uniform(*spec.index, n)
    truth["AX_RATIO"] = rng.uniform(*spec.ax_ratio, n)
    truth["ANGLE"] = rng.uniform(0.0, 180.0, n)
    truth["LOGR"] = rng.uniform(*spec.logr, n)
    truth["FLUX"] = np.exp(rng.uniform(*np.log(spec.flux), n))
    truth["SNR"] = rng.uniform(*spec.snr, n)
    truth["DX"] = rng.uniform(-spec.max_offset, spec.max_offset, n)
    truth["DY"] = rng.uniform(-spec.max_offset, spec.max_offset, n)
    return truth


def draw_galaxy(spec: SimSpec, row, psf_profile) -> np.ndarray:
    """Noiseless pixel-integrated image of one galaxy centred at [B//2 + DY, B//2 + DX]."""
    galsim = _galsim()
    q, r_e = row["AX_RATIO"], 10.0 ** row["LOGR"]
    gal = galsim.Sersic(n=row["INDEX"], half_light_radius=r_e * np.sqrt(q), flux=row["FLUX"])
    gal = gal.shear(q=q, beta=row["ANGLE"] * galsim.degrees)
    obj = galsim.Convolve(gal, psf_profile)
    b = spec.boxsize
    img = obj.drawImage(nx=b, ny=b, scale=1.0, use_true_center=False,
                        offset=(row["DX"], row["DY"]))
    return img.array.astype(np.float64)


def simulate_cutouts(spec: SimSpec) -> tuple:
    """Simulate cutouts. Returns (CutoutSet with DX/DY in its table, truth table, PSF image)."""
    galsim = _galsim()
    rng = np.random.default_rng(spec.seed + 1)
    truth = draw_truth(spec)
    psf_profile = galsim.Moffat(beta=spec.psf_beta, fwhm=spec.psf_fwhm)
    b, n = spec.boxsize, spec.n_objects
    data = np.empty((n, b, b), np.float32)
    rms = np.empty((n, b, b), np.float32)
    mask = np.empty((n, b, b), bool)
    for i, row in enumerate(truth):
        clean = draw_galaxy(spec, row, psf_profile)
        sigma = spec.sky_sigma or np.sqrt((clean ** 2).sum()) / row["SNR"]
        if spec.sky_sigma:
            truth["SNR"][i] = np.sqrt((clean ** 2).sum()) / sigma
        data[i] = clean + rng.normal(0.0, sigma, clean.shape)
        rms[i] = sigma
        mask[i] = clean_mask(clean > sigma)
    objects = empty_objects(n)
    objects["NUMBER"] = truth["NUMBER"]
    objects["DX"], objects["DY"] = truth["DX"], truth["DY"]
    objects["X_IMAGE"] = b // 2 + 1 + truth["DX"]
    objects["Y_IMAGE"] = b // 2 + 1 + truth["DY"]
    cuts = CutoutSet(data, mask, rms, objects, "simulated")
    cuts.names = [f"00_{k:04d}" for k in truth["NUMBER"]]
    return cuts, truth, draw_psf(spec)
