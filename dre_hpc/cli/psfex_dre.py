"""``psfex_dre``: PSFEx on every SExtractor catalogue, one ``<img>.psf`` per tile.

Reads ``<input>/<img>_cat.fits`` and ``<input>/<img>/<img>_cat.fits`` (``sex_dre --subdir``) and
writes ``<output>/<img>.psf``, sampled at the image pixel scale; see
:mod:`dre_hpc.preprocess.psfex`. Exit code 0 when every catalogue succeeded, 1 when some failed
(they are listed), 2 for a usage or setup error.
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings

from ..preprocess.psfex import psfex_all
from .common import run_main

log = logging.getLogger("psfex_dre")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="psfex_dre", description="Run PSFEx on every SExtractor "
                                "catalogue: one PSF per image, sampled at the image pixel scale.")
    p.add_argument("-i", "--input", default="Sextracted", help="directory with the <img>_cat.fits "
                   "catalogues, directly or in per-image subdirectories (default: Sextracted)")
    p.add_argument("-o", "--output", default="PSF", help="output directory for <img>.psf (default: PSF)")
    p.add_argument("-c", "--config", help="PSFEx configuration (default: the shipped dre.psfex); "
                   "plots, check images and XML are always off")
    p.add_argument("--select", choices=("locus", "psfex"), default="locus", help="who picks the PSF "
                   "stars: locus (default): the smallest-FWHM tight group of sources, given to PSFEx as "
                   "SAMPLE_FWHMRANGE; psfex: PSFEx's automatic selection (densest FWHM quarter, which "
                   "galaxies win in galaxy-rich tiles)")
    p.add_argument("--psfex", metavar="PATH", help="PSFEx binary (default: $DRE_PSFEX, else psfex on PATH)")
    p.add_argument("--warn", action="store_true", help="show Python (FITS) warnings")
    return p


def drive(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if not args.warn:
        warnings.filterwarnings("ignore")
    start = time.perf_counter()
    done, failed = psfex_all(args.input, args.output, args.config, args.psfex, args.select)
    log.info("done: %d of %d catalogue(s), %.1f s -> %s", len(done), len(done) + len(failed),
             time.perf_counter() - start, args.output)
    if failed:
        log.error("%d catalogue(s) FAILED: %s", len(failed), ", ".join(str(p) for p, _ in failed))
    return 1 if failed else 0


def main(argv=None) -> int:
    return run_main("psfex_dre", drive, argv)


if __name__ == "__main__":
    raise SystemExit(main())
