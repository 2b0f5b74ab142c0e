"""Simulated survey tiles with known truth (GalSim): whole images for SExtractor, PSFEx and the fit.

A tile is sky + galaxies + stars + noise, in ADU, float32. Galaxies are Sersic profiles (same
conventions as :mod:`dre_hpc.sim.cutouts`: ``half_light_radius = r_e * sqrt(q)`` then sheared to
b/a = q at ANGLE degrees counter-clockwise from +x; LOGR = log10 of the major-axis r_e in pixels)
convolved with a Moffat PSF; stars are the PSF. Every object is drawn pixel-integrated into its own
stamp and added to the image. Its flux is set so that its optimal S/N, ``sqrt(sum I^2) / sigma_sky``
over its stamp with ``sigma_sky = sqrt(sky_level / gain)``, is the value drawn uniformly from the
range. Noise is Gaussian with variance ``(sky_level + signal) / gain`` ADU^2 (Poisson in electrons).

Positions are uniform, at least ``margin`` pixels from the edges and ``min_separation`` apart, in
FITS 1-based pixel coordinates like SExtractor's X_IMAGE, Y_IMAGE: an object centred on numpy pixel
``[j, i]`` has ``X = i + 1``, ``Y = j + 1``. Sersic n is drawn uniformly and rounded to a multiple of
0.05 (GalSim sets up each distinct n once, about 60 ms); the truth holds the n drawn into the image.

Truth table (FITS, header = the spec's keys): ID (1..N, galaxies first), KIND ('galaxy'/'star'),
X, Y, INDEX, AX_RATIO, ANGLE, LOGR (NaN for stars), FLUX (total flux of the untruncated profile, ADU;
each stamp, `stamp_size`, holds 99.8 % of it where 256 px suffice, and always the 128 px around
the centre that the fit's cutouts see), MAG
(``zero_point - 2.5 log10 FLUX``), SNR (optimal S/N against the sky noise, over the stamp).

Three random streams are spawned from ``numpy.random.SeedSequence(seed)``: positions, parameters,
noise. The same spec gives byte-identical files.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.table import Table
from scipy.special import gammaincinv

from .. import __version__
from ..errors import InputError
from ..io.columns import TRUTH_INFO, describe, write_fits_table
from ..models.sersic import sersic_bn
from .cutouts import _galsim

#: Header keys of the scalar spec fields (image and truth headers) and of the (low, high) ranges.
SCALAR_KEYS = {"size": "SIZE", "n_galaxies": "NGAL", "n_stars": "NSTAR", "seed": "SEED",
               "psf_fwhm": "PSF_FWHM", "psf_beta": "PSF_BETA", "gain": "GAIN", "exptime": "EXPTIME",
               "sky_level": "SKYLEVEL", "zero_point": "MAGZERO", "margin": "MARGIN",
               "min_separation": "MINSEP"}
RANGE_KEYS = {"index": "INDEX", "ax_ratio": "AXRAT", "logr": "LOGR", "snr": "SNR", "star_snr": "SSNR"}
#: Accepted values of the ranges (inclusive); GalSim's Sersic needs 0.3 <= n <= 6.2.
RANGE_LIMITS = {"index": (0.3, 6.2), "ax_ratio": (1e-3, 1.0), "logr": (-1.0, 2.5),
                "snr": (1e-3, 1e7), "star_snr": (1e-3, 1e7)}
TRUTH_COLUMNS = ("ID", "KIND", "X", "Y", "INDEX", "AX_RATIO", "ANGLE", "LOGR", "FLUX", "MAG", "SNR")
INDEX_STEP = 0.05
STAMP_RANGE = (64, 256)
#: The flux a galaxy's stamp may leave out (`stamp_size`).
WING_FRACTION = 0.002
RSA_COVERAGE = 0.547          # random sequential adsorption of disks jams at this covered fraction


@dataclass(frozen=True)
class TileSpec:
    """What to simulate. Ranges are (low, high), drawn uniformly; see the module docstring."""

    size: int = 4096
    n_galaxies: int = 1000
    n_stars: int = 60
    seed: int = 2026
    psf_fwhm: float = 2.5
    psf_beta: float = 3.5
    gain: float = 4.0
    exptime: float = 100.0
    sky_level: float = 100.0
    zero_point: float = 30.0
    index: tuple = (4.0, 4.0)
    ax_ratio: tuple = (0.15, 1.0)
    logr: tuple = (0.2, 1.1)
    snr: tuple = (20.0, 300.0)
    star_snr: tuple = (100.0, 1000.0)
    margin: int = 16
    min_separation: float = 40

    @property
    def sky_sigma(self) -> float:
        """Sky noise per pixel in ADU: sqrt(sky_level / gain)."""
        return math.sqrt(self.sky_level / self.gain)


def check_spec(spec: TileSpec, names: dict | None = None) -> None:
    """Raise `InputError` for an impossible spec; ``names`` maps fields to the labels used in messages."""
    label = (lambda field: (names or {}).get(field, field))
    for field in ("size", "n_galaxies", "n_stars", "margin", "seed"):
        if not isinstance(getattr(spec, field), (int, np.integer)) or getattr(spec, field) < 0:
            raise InputError(f"{label(field)} must be a whole number >= 0, got {getattr(spec, field)!r}")
    if spec.size <= 2 * spec.margin:
        raise InputError(f"{label('size')} must be > 2 x {label('margin')} ({2 * spec.margin}), got {spec.size}")
    for field in ("psf_fwhm", "gain", "exptime", "sky_level"):
        if not (math.isfinite(getattr(spec, field)) and getattr(spec, field) > 0):
            raise InputError(f"{label(field)} must be a finite number > 0, got {getattr(spec, field)!r}")
    if not (math.isfinite(spec.psf_beta) and spec.psf_beta > 1.1):
        raise InputError(f"{label('psf_beta')} must be > 1.1 (Moffat), got {spec.psf_beta!r}")
    if not (math.isfinite(spec.min_separation) and spec.min_separation >= 0):
        raise InputError(f"{label('min_separation')} must be >= 0, got {spec.min_separation!r}")
    if not math.isfinite(spec.zero_point):
        raise InputError(f"{label('zero_point')} must be finite, got {spec.zero_point!r}")
    for field, (low, high) in RANGE_LIMITS.items():
        lo, hi = getattr(spec, field)
        if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
            raise InputError(f"{label(field)}: MIN must be <= MAX (both finite), got {lo:g} {hi:g}")
        if lo < low or hi > high:
            raise InputError(f"{label(field)} must lie in [{low:g}, {high:g}], got {lo:g} {hi:g}")


def draw_positions(spec: TileSpec, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` (X, Y) 1-based positions, ``margin`` from the edges, ``min_separation`` apart."""
    lo, hi = 0.5 + spec.margin, spec.size + 0.5 - spec.margin
    sep = float(spec.min_separation)
    if sep <= 0 or count == 0:
        return rng.uniform(lo, hi, (count, 2))
    coverage = count * math.pi * sep ** 2 / 4 / (hi - lo + sep) ** 2
    points, cells, tries = [], {}, 0
    while coverage < RSA_COVERAGE and len(points) < count and tries < 100 * count + 1000:
        for x, y in rng.uniform(lo, hi, (count - len(points), 2)):
            tries += 1
            cx, cy = int(x // sep), int(y // sep)
            near = (k for dx in (-1, 0, 1) for dy in (-1, 0, 1) for k in cells.get((cx + dx, cy + dy), ()))
            if all((x - points[k][0]) ** 2 + (y - points[k][1]) ** 2 >= sep ** 2 for k in near):
                cells.setdefault((cx, cy), []).append(len(points))
                points.append((x, y))
    if len(points) < count:
        raise InputError(f"cannot place {count} objects at least {sep:g} px apart and {spec.margin} px from "
                         f"the edges of a {spec.size}x{spec.size} tile: lower min_separation or the counts")
    return np.array(points)


def draw_truth(spec: TileSpec) -> Table:
    """The truth table without fluxes: ID, KIND, X, Y, shape parameters (NaN for stars), target SNR."""
    check_spec(spec)
    rng_pos, rng_par, _ = (np.random.default_rng(s) for s in np.random.SeedSequence(spec.seed).spawn(3))
    ng, ns = spec.n_galaxies, spec.n_stars
    xy = draw_positions(spec, ng + ns, rng_pos)
    nan = np.full(ns, np.nan)
    index = np.clip(np.round(rng_par.uniform(*spec.index, ng) / INDEX_STEP) * INDEX_STEP, *spec.index)
    return Table({
        "ID": np.arange(1, ng + ns + 1), "KIND": np.array(["galaxy"] * ng + ["star"] * ns),
        "X": xy[:, 0], "Y": xy[:, 1],
        "INDEX": np.concatenate([index, nan]),
        "AX_RATIO": np.concatenate([rng_par.uniform(*spec.ax_ratio, ng), nan]),
        "ANGLE": np.concatenate([rng_par.uniform(0.0, 180.0, ng), nan]),
        "LOGR": np.concatenate([rng_par.uniform(*spec.logr, ng), nan]),
        "FLUX": np.zeros(ng + ns), "MAG": np.zeros(ng + ns),
        "SNR": np.concatenate([rng_par.uniform(*spec.snr, ng), rng_par.uniform(*spec.star_snr, ns)]),
    })


def _profile(galsim, psf, index, q, angle, logr):
    """Unit-flux PSF (index NaN: a star) or PSF-convolved sheared Sersic."""
    if math.isnan(index):
        return psf
    r_e = 10.0 ** logr
    gal = galsim.Sersic(n=index, half_light_radius=r_e * math.sqrt(q)).shear(q=q, beta=angle * galsim.degrees)
    return galsim.Convolve(gal, psf)


def stamp_size(spec: TileSpec, logr: float, index: float = 4.0) -> int:
    """Side of the stamp of one object: 2 x (r + 3 FWHM), r the larger of 10 r_e and the radius that
    holds all but `WING_FRACTION` of the Sersic profile's flux (stars: 2 x 12 FWHM), within
    STAMP_RANGE. Wings cut closer than the fit's 128 px cutouts would bias every fitter low in flux,
    radius and n (3 % in flux for n > 3 on the accuracy benchmark, with 2 x (10 r_e + 3 FWHM))."""
    if math.isnan(logr):
        half = 12 * spec.psf_fwhm
    else:
        r_e = 10.0 ** logr
        wings = r_e * (float(gammaincinv(2.0 * index, 1.0 - WING_FRACTION)) / float(sersic_bn(index))) ** index
        half = max(10 * r_e, wings) + 3 * spec.psf_fwhm
    return int(np.clip(2 * math.ceil(half), *STAMP_RANGE))


def render_tile(spec: TileSpec) -> tuple[np.ndarray, Table]:
    """The noiseless objects (float64, no sky) and the complete truth table (FLUX, MAG filled)."""
    galsim = _galsim()
    truth = draw_truth(spec)
    image = galsim.ImageD(spec.size, spec.size, scale=1.0)         # bounds 1..size: FITS pixels
    psf = galsim.Moffat(beta=spec.psf_beta, fwhm=spec.psf_fwhm)
    cols = [truth[c] for c in ("X", "Y", "INDEX", "AX_RATIO", "ANGLE", "LOGR", "SNR")]
    flux = truth["FLUX"]
    for k, (x, y, index, q, angle, logr, snr) in enumerate(zip(*cols)):
        half = stamp_size(spec, logr, index) // 2
        ix, iy = int(math.floor(x + 0.5)), int(math.floor(y + 0.5))
        stamp = galsim.ImageD(galsim.BoundsI(ix - half, ix + half - 1, iy - half, iy + half - 1), scale=1.0)
        _profile(galsim, psf, index, q, angle, logr).drawImage(stamp, center=galsim.PositionD(x, y))
        flux[k] = snr * spec.sky_sigma / math.sqrt(np.square(stamp.array).sum())
        overlap = stamp.bounds & image.bounds
        image[overlap] += stamp[overlap] * flux[k]
    truth["MAG"] = spec.zero_point - 2.5 * np.log10(flux)
    return image.array, truth


def add_noise(spec: TileSpec, clean: np.ndarray) -> np.ndarray:
    """sky + clean + Gaussian noise of variance (sky + clean) / gain, as float32 ADU."""
    rng = np.random.default_rng(np.random.SeedSequence(spec.seed).spawn(3)[2])
    signal = spec.sky_level + clean
    sigma = np.sqrt(np.maximum(signal, 0.0) / spec.gain)
    return (signal + sigma * rng.standard_normal(clean.shape)).astype(np.float32)


def spec_cards(spec: TileSpec) -> list:
    """Header cards of the spec (scalars, then ranges as <KEY>_LO, <KEY>_HI)."""
    values = asdict(spec)
    cards = [(key, values[field]) for field, key in SCALAR_KEYS.items()]
    for field, key in RANGE_KEYS.items():
        cards += [(f"{key}_LO", float(values[field][0])), (f"{key}_HI", float(values[field][1]))]
    return cards + [("SKYSIG", spec.sky_sigma, "sky noise per pixel, ADU"),
                    ("CREATOR", f"dre_hpc {__version__}", "simulated by dre_hpc.sim.tile")]


def _atomic_write(path: Path, write) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    tmp.replace(path)
    return path


def simulate_tile(spec: TileSpec, image_path, truth_path) -> tuple[Path, Path]:
    """Simulate a tile; write the image and the truth table (FITS, overwritten). Returns both paths."""
    image_path, truth_path = Path(image_path), Path(truth_path)
    clean, truth = render_tile(spec)
    header = fits.Header(spec_cards(spec))
    header["BUNIT"] = "ADU"
    header["COMMENT"] = f"Simulated survey tile written by dre_hpc {__version__} (dre_hpc.sim.tile)."
    data = add_noise(spec, clean)
    _atomic_write(image_path, lambda tmp: fits.PrimaryHDU(data, header).writeto(tmp, overwrite=True))
    truth.meta.update({key: value for key, value, *_ in spec_cards(spec)})
    truth.meta["IMAGE"] = image_path.name
    describe(truth, bunit=header["BUNIT"], overrides=TRUTH_INFO)         # TUNITn, TCOMMn
    _atomic_write(truth_path, lambda tmp: write_fits_table(tmp, truth))
    return image_path, truth_path


def read_truth(truth_path) -> Table:
    """The truth table of a simulated tile (its header keys in ``meta``; NaN stay NaN, not masked)."""
    path = Path(truth_path)
    if not path.is_file():
        raise InputError(f"truth table {path} does not exist")
    try:
        return Table.read(path, format="fits", mask_invalid=False)
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read truth table {path}: {exc}") from None
