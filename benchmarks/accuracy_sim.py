"""Simulated tiles for the accuracy benchmark: the Morphology Challenge's kind of population.

``dre_hpc.sim.tile.TileSpec`` draws n uniformly, a Moffat PSF only and its own ranges, so the
population is drawn here and rendered with GalSim in the same conventions as ``dre_hpc.sim.tile``
(whose position drawing, stamp sizes, noise and header cards are reused):

- target galaxies: Sersic n log-uniform in [0.5, 6] (rounded to 0.05: GalSim sets up each n
  once; the truth holds the rounded n), b/a uniform in [0.1, 1], angle uniform, major-axis
  half-light radius log-uniform in [1.5, 20] px, optimal S/N (against the sky noise) log-uniform in
  [10, 1000], sub-pixel positions uniform;
- neighbours: as many again of faint galaxies (S/N 3-10, the same shapes) at random positions, so
  that cutouts hold detected and undetected neighbours at a density of a deep survey; they are in the
  truth (POP = 'faint') but not scored;
- stars (POP = 'star') for PSFEx; the PSF is a Moffat (beta 3.5) or a Kolmogorov profile;
- noise: sky-dominated (sky 10,000 ADU, gain 400: sigma 5 ADU), so that the S/N against the sky is
  the object's real S/N and an rms-only weight is right for both fitters.

Conventions: LOGR = log10 of the major-axis r_e in px (GalSim ``half_light_radius = r_e sqrt(q)``
then sheared to b/a = q), ANGLE degrees counter-clockwise from +x, X/Y FITS 1-based, FLUX the total
flux of the untruncated profile.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.table import Table

from dre_hpc.sim.tile import TileSpec, add_noise, draw_positions, spec_cards, stamp_size

INDEX_STEP = 0.05


@dataclass(frozen=True)
class Population:
    """What one benchmark tile holds. Ranges are (low, high), log-uniform unless noted."""

    size: int = 1400
    n_targets: int = 200
    n_faint: int = 200
    n_stars: int = 50
    seed: int = 16
    psf: str = "moffat"                 # or 'kolmogorov'
    psf_fwhm: float = 2.5
    psf_beta: float = 3.5
    index: tuple = (0.5, 6.0)
    ax_ratio: tuple = (0.1, 1.0)        # uniform
    radius: tuple = (1.5, 20.0)         # major-axis r_e, px
    snr: tuple = (10.0, 1000.0)
    faint_snr: tuple = (3.0, 10.0)
    star_snr: tuple = (100.0, 1000.0)
    sky_level: float = 10000.0
    gain: float = 400.0
    min_separation: float = 5.0

    def tile_spec(self) -> TileSpec:
        """The TileSpec used for positions, noise and the header (its ranges describe the targets)."""
        return TileSpec(size=self.size, n_galaxies=self.n_targets + self.n_faint, n_stars=self.n_stars,
                        seed=self.seed, psf_fwhm=self.psf_fwhm, psf_beta=self.psf_beta, gain=self.gain,
                        sky_level=self.sky_level, index=self.index, ax_ratio=self.ax_ratio,
                        logr=tuple(math.log10(r) for r in self.radius), snr=self.snr,
                        star_snr=self.star_snr, margin=16, min_separation=self.min_separation)


def _loguniform(rng, lohi, n):
    return 10.0 ** rng.uniform(math.log10(lohi[0]), math.log10(lohi[1]), n)


def draw_truth(pop: Population) -> Table:
    """ID, KIND, POP, X, Y, INDEX, AX_RATIO, ANGLE, LOGR, SNR (FLUX, MAG filled by `render`)."""
    rng_pos, rng_par = (np.random.default_rng(s) for s in np.random.SeedSequence(pop.seed).spawn(3)[:2])
    ng, ns = pop.n_targets + pop.n_faint, pop.n_stars
    xy = draw_positions(pop.tile_spec(), ng + ns, rng_pos)
    nan = np.full(ns, np.nan)
    index = np.clip(np.round(_loguniform(rng_par, pop.index, ng) / INDEX_STEP) * INDEX_STEP, *pop.index)
    snr = np.concatenate([_loguniform(rng_par, pop.snr, pop.n_targets),
                          _loguniform(rng_par, pop.faint_snr, pop.n_faint),
                          _loguniform(rng_par, pop.star_snr, ns)])
    return Table({
        "ID": np.arange(1, ng + ns + 1), "KIND": np.array(["galaxy"] * ng + ["star"] * ns),
        "POP": np.array(["target"] * pop.n_targets + ["faint"] * pop.n_faint + ["star"] * ns),
        "X": xy[:, 0], "Y": xy[:, 1],
        "INDEX": np.concatenate([index, nan]),
        "AX_RATIO": np.concatenate([rng_par.uniform(*pop.ax_ratio, ng), nan]),
        "ANGLE": np.concatenate([rng_par.uniform(0.0, 180.0, ng), nan]),
        "LOGR": np.concatenate([np.log10(_loguniform(rng_par, pop.radius, ng)), nan]),
        "FLUX": np.zeros(ng + ns), "MAG": np.zeros(ng + ns), "SNR": snr,
    })


def make_psf(galsim, pop: Population):
    if pop.psf == "moffat":
        return galsim.Moffat(beta=pop.psf_beta, fwhm=pop.psf_fwhm)
    if pop.psf == "kolmogorov":
        return galsim.Kolmogorov(fwhm=pop.psf_fwhm)
    raise ValueError(f"unknown PSF {pop.psf!r}: moffat or kolmogorov")


def render(pop: Population) -> tuple[np.ndarray, Table]:
    """Noiseless objects (float64, no sky) and the truth with FLUX and MAG."""
    import galsim
    spec = pop.tile_spec()
    truth = draw_truth(pop)
    gsp = galsim.GSParams(maximum_fft_size=16384)
    psf = make_psf(galsim, pop)
    image = galsim.ImageD(pop.size, pop.size, scale=1.0)            # bounds 1..size: FITS pixels
    flux = truth["FLUX"]
    for k, row in enumerate(truth):
        x, y, n, q, angle, logr = (float(row[c]) for c in ("X", "Y", "INDEX", "AX_RATIO", "ANGLE", "LOGR"))
        if math.isnan(n):
            prof = psf
        else:
            gal = galsim.Sersic(n=n, half_light_radius=10 ** logr * math.sqrt(q), gsparams=gsp)
            prof = galsim.Convolve(gal.shear(q=q, beta=angle * galsim.degrees), psf, gsparams=gsp)
        half = stamp_size(spec, logr, 4.0 if math.isnan(n) else n) // 2
        ix, iy = int(math.floor(x + 0.5)), int(math.floor(y + 0.5))
        stamp = galsim.ImageD(galsim.BoundsI(ix - half, ix + half - 1, iy - half, iy + half - 1), scale=1.0)
        prof.drawImage(stamp, center=galsim.PositionD(x, y))
        flux[k] = float(row["SNR"]) * spec.sky_sigma / math.sqrt(np.square(stamp.array).sum())
        overlap = stamp.bounds & image.bounds
        image[overlap] += stamp[overlap] * flux[k]
    truth["MAG"] = spec.zero_point - 2.5 * np.log10(flux)
    return image.array, truth


def simulate(pop: Population, image_path: Path, truth_path: Path) -> None:
    """Write the noisy tile (float32 ADU, header with GAIN etc.) and its truth table."""
    spec = pop.tile_spec()
    clean, truth = render(pop)
    header = fits.Header(spec_cards(spec))
    header["BUNIT"] = "ADU"
    header["PSFKIND"] = pop.psf
    header["COMMENT"] = "dre_hpc benchmarks/bench_accuracy.py tile (accuracy_sim.py): n, r, S/N log-uniform"
    image_path.parent.mkdir(parents=True, exist_ok=True)
    truth_path.parent.mkdir(parents=True, exist_ok=True)
    fits.PrimaryHDU(add_noise(spec, clean), header).writeto(image_path, overwrite=True)
    truth.meta.update({"PSFKIND": pop.psf, "PSF_FWHM": pop.psf_fwhm, "SEED": pop.seed, "SIZE": pop.size})
    truth.write(truth_path, overwrite=True)


def tile_populations(quick: bool, seed: int) -> list:
    """The benchmark's tiles: one Moffat, one Kolmogorov (quick: smaller)."""
    base = Population(seed=seed)
    if quick:
        base = replace(base, size=1000, n_targets=110, n_faint=110, n_stars=40)
    return [replace(base, psf="moffat", psf_fwhm=2.5, seed=seed),
            replace(base, psf="kolmogorov", psf_fwhm=3.0, seed=seed + 1)]
