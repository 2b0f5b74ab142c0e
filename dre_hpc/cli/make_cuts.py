"""``make_cuts``: 128x128 cutouts of the catalogued galaxies of every tile (the original's options)."""

from __future__ import annotations

import argparse
import logging
import warnings

from ..errors import InputError
from ..flags import CutFlag
from ..io.cuts import COMPRESSION
from ..preprocess.cut_tiles import NeighbourOptions, cut_all_tiles
from ..preprocess.cuts import CutsOptions
from .common import run_main

log = logging.getLogger("make_cuts")


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    flags = "; ".join(f"{v} {n}" for v, n, _ in CutFlag.describe())
    p = argparse.ArgumentParser(prog="make_cuts", description="Cut 128x128 images centred on the "
                                "SExtracted objects of every tile.", epilog=f"CUT_FLAGS bits: {flags}")
    p.add_argument("-i", "--input", default="Tiles", help="directory with the tile images (default: Tiles)")
    p.add_argument("-s", "--sextracted", default="Sextracted", help="directory with the SExtractor "
                   "catalogues and check images (default: Sextracted)")
    p.add_argument("-o", "--output", default="Cuts", help="output directory (default: Cuts)")
    p.add_argument("--margin", type=_number, default=80, help="keep objects with margin < X < NAXIS1 - "
                   "margin (same in y) (default: 80); cuts reaching the edge are padded and flagged")
    p.add_argument("--max-stellarity", type=_number, default=0.5, help="keep objects with CLASS_STAR below "
                   "this (default: 0.5)")
    p.add_argument("-f", "--filter", nargs=3, action="append", default=[], metavar=("PARAM", "MIN", "MAX"),
                   help="keep objects with MIN < PARAM < MAX (catalogue column); repeatable")
    p.add_argument("--centroids", action="store_true", help="centre on SExtractor's windowed centroid "
                   "(XWIN_IMAGE, YWIN_IMAGE) instead of X_IMAGE, Y_IMAGE (stacked layout only)")
    p.add_argument("--layout", choices=("stacked", "dre"), default="stacked", help="stacked (N, 128, 128) "
                   "datasets with a position table (default), or the original one group per object")
    p.add_argument("--compression", choices=list(COMPRESSION), default="none",
                   help="HDF5 compression: none, low (lzf), medium (gzip 4), high (gzip 9) (default: none)")
    p.add_argument("--mask", choices=("grown", "original"), default="grown",
                   help="fit mask: the segment grown by 12 pixels without the neighbours' segments "
                        "(default), or the original's, grown by 4 pixels into them")
    p.add_argument("--neighbours", metavar="SUMMARY_DIR", help="second pass: cut with the neighbours' "
                   "models subtracted, from the first pass's fits (SUMMARY_DIR/<img>_dre.fits, dre -o), and the "
                   "background estimated again without them")
    p.add_argument("--psf", default="PSF", help="with --neighbours: the PSF the first pass was fitted with "
                   "(dre --psf: a directory with <img>.psf, or one file; default: PSF)")
    p.add_argument("--psf-pixel", choices=("included", "excluded"), default="included",
                   help="with --neighbours: dre's --psf-pixel of the first pass (default: included)")
    p.add_argument("--warn", action="store_true", help="show numerical and FITS warnings")
    return p


def drive(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if not args.warn:
        warnings.filterwarnings("ignore")
    filters = []
    for param, low, high in args.filter:
        try:
            filters.append((param, float(low), float(high)))
        except ValueError:
            raise InputError(f"-f {param} {low} {high}: MIN and MAX must be numbers") from None
    options = CutsOptions(margin=args.margin, max_stellarity=args.max_stellarity, filters=tuple(filters),
                          centroids=args.centroids, layout=args.layout, compression=args.compression,
                          mask=args.mask)
    neighbours = None
    if args.neighbours is not None:
        neighbours = NeighbourOptions(args.neighbours, args.psf, args.psf_pixel == "included")
        if options.layout == "dre":
            log.warning("--neighbours with --layout dre: that layout stores no BACK_ERR, so dre will take "
                        "SExtractor's background uncertainty (0.09 sigma) for these cuts' sky prior, not 0.03")
    reports, failures = cut_all_tiles(args.input, args.sextracted, args.output, options, neighbours)
    total = sum(r["cut"] for r in reports)
    log.info("done: %d cutouts from %d tile(s) into %s%s", total, len(reports), args.output,
             f"; {len(failures)} tile(s) FAILED: " + ", ".join(str(f) for f, _ in failures) if failures else "")
    return 1 if failures else 0


def main(argv=None) -> int:
    return run_main("make_cuts", drive, argv)


if __name__ == "__main__":
    raise SystemExit(main())
