"""dre-sim: simulate survey tiles (GalSim) with their truth tables.

Writes ``<output>/<name>.fits`` (the image, in ADU, sky included) and ``<truth-dir>/<name>_truth.fits``
(the truth table; kept out of the tiles directory because sex_dre processes every .fits there).
With ``--tiles K`` > 1 the tiles are ``<name>_000`` .. ``<name>_<K-1>`` with seeds SEED, SEED+1, ...,
so tile k is reproduced alone with ``--seed SEED+k`` (its header keeps its SEED).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from pathlib import Path

from ..errors import InputError
from ..sim.tile import TileSpec, check_spec, simulate_tile
from .common import run_main

#: Option -> (TileSpec field, parser of one value); ranges take MIN MAX.
SCALARS = {"size": ("size", int), "galaxies": ("n_galaxies", int), "stars": ("n_stars", int),
           "seed": ("seed", int), "psf-fwhm": ("psf_fwhm", float), "psf-beta": ("psf_beta", float),
           "gain": ("gain", float), "exptime": ("exptime", float), "sky": ("sky_level", float),
           "zero-point": ("zero_point", float), "margin": ("margin", int),
           "min-separation": ("min_separation", float)}
RANGES = {"index": "index", "ax-ratio": "ax_ratio", "logr": "logr", "snr": "snr", "star-snr": "star_snr"}
HELP = {"size": "image side in pixels", "galaxies": "number of galaxies", "stars": "number of stars",
        "seed": "random seed of the first tile", "psf-fwhm": "Moffat PSF FWHM in pixels",
        "psf-beta": "Moffat PSF beta", "gain": "e-/ADU (header GAIN)", "exptime": "seconds (header EXPTIME)",
        "sky": "sky level in ADU per pixel", "zero-point": "magnitude zero point (header MAGZERO)",
        "margin": "minimum distance of object centres from the edges, pixels",
        "min-separation": "minimum distance between object centres, pixels",
        "index": "Sersic index n", "ax-ratio": "axis ratio b/a",
        "logr": "log10 major-axis half-light radius in pixels", "snr": "galaxies' optimal S/N",
        "star-snr": "stars' optimal S/N"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dre-sim", description=__doc__.split("\n\n")[0])
    default = TileSpec()
    parser.add_argument("-o", "--output", default="Tiles", help="directory of the images (default: Tiles)")
    parser.add_argument("--truth-dir", default="Truth", help="directory of the truth tables (default: Truth)")
    parser.add_argument("--name", default="simtile", help="image name without .fits (default: simtile)")
    parser.add_argument("--tiles", default="1", help="number of tiles (default: 1)")
    for option, (field, _) in SCALARS.items():
        parser.add_argument(f"--{option}", default=str(getattr(default, field)),
                            help=f"{HELP[option]} (default: {getattr(default, field)})")
    for option, field in RANGES.items():
        low, high = getattr(default, field)
        parser.add_argument(f"--{option}", nargs=2, metavar=("MIN", "MAX"), default=[str(low), str(high)],
                            help=f"{HELP[option]}, drawn uniformly (default: {low:g} {high:g})")
    return parser


def _value(option: str, text: str, kind):
    try:
        value = kind(text)
    except ValueError:
        what = "a whole number" if kind is int else "a number"
        raise InputError(f"--{option} must be {what}, got {text!r}") from None
    if not math.isfinite(value):
        raise InputError(f"--{option} must be finite, got {text!r}")
    return value


def spec_from_args(args) -> TileSpec:
    """The `TileSpec` the options describe (checked, errors naming the option)."""
    values = {field: _value(option, getattr(args, option.replace("-", "_")), kind)
              for option, (field, kind) in SCALARS.items()}
    for option, field in RANGES.items():
        values[field] = tuple(_value(option, text, float) for text in getattr(args, option.replace("-", "_")))
    spec = TileSpec(**values)
    names = {field: f"--{option}" for option, (field, _) in SCALARS.items()}
    names.update({field: f"--{option}" for option, field in RANGES.items()})
    check_spec(spec, names)
    return spec


def driver(argv=None) -> int:
    args = build_parser().parse_args(argv)
    spec = spec_from_args(args)
    count = _value("tiles", args.tiles, int)
    if count < 1:
        raise InputError(f"--tiles must be >= 1, got {count}")
    if not args.name or "/" in args.name:
        raise InputError(f"--name must be a plain file name, got {args.name!r}")
    for k in range(count):
        name = args.name if count == 1 else f"{args.name}_{k:03d}"
        start = time.perf_counter()
        image, truth = simulate_tile(dataclasses.replace(spec, seed=spec.seed + k),
                                     Path(args.output) / f"{name}.fits",
                                     Path(args.truth_dir) / f"{name}_truth.fits")
        print(f"{image}: {spec.n_galaxies + spec.n_stars} objects ({spec.n_galaxies} galaxies, "
              f"{spec.n_stars} stars), truth {truth}, {time.perf_counter() - start:.1f} s", flush=True)
    return 0


def main(argv=None) -> int:
    return run_main("dre-sim", driver, argv)


if __name__ == "__main__":
    raise SystemExit(main())
