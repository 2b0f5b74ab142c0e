"""``sex_dre``: SExtractor on every tile (the original's options, with defaults for all of them).

Writes ``<output>/[<img>/]<img>_cat.fits`` (FITS_LDAC) and the ``_nb``, ``_rms``, ``_seg`` check
images per tile; see :mod:`dre_hpc.preprocess.sextractor`. Exit code 0 when every tile succeeded,
1 when some failed (they are listed), 2 for a usage or setup error.
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings

from ..errors import InputError
from ..preprocess.sextractor import SexOptions, sextract_all
from .common import run_main

log = logging.getLogger("sex_dre")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sex_dre", description="Run SExtractor on every image of a "
                                "directory: FITS_LDAC catalogue, background-subtracted, rms and "
                                "segmentation images per image.")
    p.add_argument("-i", "--input", default="Tiles", help="directory with the images (*.fits, *.fit, "
                   "*.fits.fz; *_flag.fits and *_wht.fits are skipped) (default: Tiles)")
    p.add_argument("-o", "--output", default="Sextracted", help="output directory (default: Sextracted)")
    p.add_argument("-c", "--config", help="SExtractor configuration (default: the shipped dre.sex)")
    p.add_argument("-p", "--param", help="SExtractor parameter file (default: the shipped dre.param, "
                   "which has the columns PSFEx and make_cuts need)")
    p.add_argument("--subdir", action="store_true", help="write each image's files into <output>/<img>/")
    p.add_argument("--flags", metavar="DIR", help="directory with <img>_flag.fits flag maps (adds "
                   "IMAFLAGS_ISO, NIMAFLAGS_ISO to the catalogue)")
    p.add_argument("--weights", metavar="DIR", help="directory with <img>_wht.fits weight maps "
                   "(WEIGHT_TYPE MAP_WEIGHT)")
    p.add_argument("--gain", default="counts", help="counts: header gain (image in ADU, default); "
                   "cps: header gain x EXPTIME (image in ADU/s); or a number in e-/ADU")
    p.add_argument("--gain-key", default="auto", help="header key of the gain; auto: GAIN, else the "
                   "single key containing GAIN (default: auto)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="further SExtractor "
                   "option, e.g. --set DETECT_THRESH=3 (repeatable)")
    p.add_argument("--sextractor", metavar="PATH", help="SExtractor binary (default: $DRE_SEXTRACTOR, "
                   "else source-extractor, sex or sextractor on PATH)")
    p.add_argument("--warn", action="store_true", help="show Python (FITS) warnings")
    return p


def parse_settings(items) -> dict:
    """``['KEY=VALUE', ...]`` -> ``{'KEY': 'VALUE'}``."""
    settings = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise InputError(f"--set {item!r}: expected KEY=VALUE, e.g. DETECT_THRESH=3")
        settings[key.strip().upper()] = value.strip()
    return settings


def drive(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if not args.warn:
        warnings.filterwarnings("ignore")
    options = SexOptions(config=args.config, param=args.param, gain=args.gain, gain_key=args.gain_key,
                         flags_dir=args.flags, weights_dir=args.weights, subdir=args.subdir,
                         extra=parse_settings(args.set), executable=args.sextractor)
    start = time.perf_counter()
    done, failed = sextract_all(args.input, args.output, options)
    objects = sum(out.n_objects for out in done)
    log.info("done: %d of %d image(s), %d objects, %.1f s -> %s", len(done), len(done) + len(failed),
             objects, time.perf_counter() - start, args.output)
    if failed:
        log.error("%d image(s) FAILED: %s", len(failed), ", ".join(str(p) for p, _ in failed))
    return 1 if failed else 0


def main(argv=None) -> int:
    return run_main("sex_dre", drive, argv)


if __name__ == "__main__":
    raise SystemExit(main())
