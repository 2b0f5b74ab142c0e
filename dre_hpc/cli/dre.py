"""``dre``: fit every cuts file with the model cube (the original's options, plus ours)."""

from __future__ import annotations

import argparse
import logging
import time
import warnings

from threadpoolctl import threadpool_limits

from ..errors import InputError
from ..fit.backend import BACKENDS
from ..fit.engine import STATISTICS, FitOptions
from ..fit.model_matrix import NodeModels
from ..fit.tiles import TileJob, fit_tile, list_cuts_files
from ..flags import FitFlag
from ..io.cuts import COMPRESSION
from .common import run_main

log = logging.getLogger("dre")


def build_parser() -> argparse.ArgumentParser:
    flags = "; ".join(f"{v} {n}" for v, n, _ in FitFlag.describe())
    p = argparse.ArgumentParser(prog="dre", description="Fit galaxy cutouts with a grid of PSF-convolved "
                                "Sersic models (DRE).", epilog=f"FLAGS bits: {flags}")
    p.add_argument("-m", "--model", help="model cube FITS file, or a preset: bulge (the default: the "
                   "original's n = 4 grid) or sersic (a Sersic-index axis n = 0.5..6), generated on first "
                   "use into the user cache")
    p.add_argument("--psf", default="PSF", help="directory with <img>.psf per image, or one .psf/.fits "
                   "for all images (default: PSF)")
    p.add_argument("-i", "--input", default="Cuts", help="directory with <img>_cuts.h5 files, or one file "
                   "(default: Cuts)")
    p.add_argument("-o", "--output", default="Summary", help="summary directory (default: Summary)")
    p.add_argument("--chi", default="Chi", help="directory for chi-square cubes (default: Chi)")
    p.add_argument("--mosaics", action="store_true", help="write data/mask/model/residual mosaics "
                   "into Mosaics/<img>/")
    p.add_argument("--mosaics-dir", default="Mosaics", help="where --mosaics go (default: Mosaics)")
    p.add_argument("--mosaic-png", action="store_true", help="also write each mosaic as PNG")
    p.add_argument("--cpu", type=int, default=1, help="threads for the cube convolution and the matrix "
                   "products (default: 1; results depend on it in the last bits, as dre-batch's on "
                   "resources.fit.cpus_per_task)")
    p.add_argument("--chunk", type=int, default=None,
                   help="objects fitted together in one batch (default: from the grid, 1024 for the "
                        "default cube, 512 for sersic)")
    p.add_argument("--catalogs", default="Sextracted", help="directory with the SExtractor catalogues "
                   "joined to the summary and used for positions (default: Sextracted)")
    p.add_argument("--compression", choices=list(COMPRESSION), default="medium",
                   help="compression of the chi-square file (default: medium)")
    p.add_argument("--warn", action="store_true", help="show numerical warnings")
    p.add_argument("--statistic", choices=STATISTICS, default="wls", help="wls: weighted least squares "
                   "with fitted flux (default); dre: the original DRE statistic")
    p.add_argument("--backend", choices=BACKENDS, default="cpu", help="cpu (NumPy) or gpu (CuPy)")
    p.add_argument("--zero-point", type=float, default=None, help="magnitude zero-point: adds MAG")
    p.add_argument("--gain", type=float, default=None, help="gain in e-/ADU of the cut data: adds the "
                   "Poisson term to the variance")
    p.add_argument("--min-pixels", type=int, default=16, help="fewest usable mask pixels to fit (default: 16)")
    p.add_argument("--psf-pixel", choices=("included", "excluded"), default="included",
                   help="whether the PSF already contains the pixel response (PSFEx PSFs do: it is "
                   "divided out so that the pixel-integrated models do not count it twice)")
    p.add_argument("--no-centre", action="store_true", help="do not move cutouts to the sub-pixel centre")
    p.add_argument("--model-cache", default=None, metavar="DIR",
                   help="keep the convolved models of each (cube, PSF) in DIR and map them on the next "
                        "run with the same cube and PSF instead of convolving again (sersic: about 20 s "
                        "and 5.4 GB of disk per PSF; the same entries as dre-batch's model cache)")
    return p


def load_cube(model_path):
    """(cube, grid, cache key) of ``-m`` or of the default cube: the cube a `CubeFile` (its
    headers read and checked now, its stamps when they are convolved)."""
    from ..models.cube_io import CubeFile
    from ..models.generate import resolve_model
    path = resolve_model(model_path)
    cube = CubeFile(path)
    return cube, cube.grid, cube_key(path)


def describe_cube(model_path):
    """(grid, cache key) of ``-m`` or of the default cube, from the headers alone."""
    from astropy.io import fits

    from ..io.fits_check import check_fits
    from ..models.cube_io import first_image_hdu, grid_header
    from ..models.generate import resolve_model
    from ..models.grid import ModelGrid
    path = resolve_model(model_path)
    check_fits(path, f"cannot read model cube {path} as FITS")
    with fits.open(path, memmap=True) as hdul:
        header = grid_header(hdul[0].header, first_image_hdu(hdul, path).header)
    return ModelGrid.from_header(header, source=str(path)), cube_key(path)


def cube_key(path) -> str:
    """The identity of a cube file for the convolved-model caches: resolved path, size, mtime."""
    stat = path.stat()
    return f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"


def drive(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if not args.warn:
        warnings.filterwarnings("ignore", category=RuntimeWarning)
    if (args.chunk is not None and args.chunk < 1) or args.cpu < 1:
        raise InputError("--chunk and --cpu must be >= 1")
    if args.mosaics and args.mosaic_png:          # say so now, not after the fits
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise InputError("--mosaic-png needs matplotlib: pip install 'dre_hpc[plots]'") from None
    options = FitOptions(statistic=args.statistic, gain=args.gain, min_pixels=args.min_pixels,
                         batch_size=args.chunk, centre=not args.no_centre)
    job = TileJob(cuts=args.input, psf=args.psf, summary_dir=args.output, chi_dir=args.chi,
                  catalogs=args.catalogs, mosaics_dir=args.mosaics_dir if args.mosaics else None,
                  mosaic_png=args.mosaic_png, zero_point=args.zero_point, compression=args.compression,
                  backend=args.backend, workers=args.cpu, options=options)
    files = list_cuts_files(args.input)
    models = NodeModels(None, lambda: load_cube(args.model), backend=args.backend, workers=args.cpu,
                        psf_has_pixel=args.psf_pixel == "included", cache_dir=args.model_cache,
                        describe=(lambda: describe_cube(args.model)) if args.model_cache else None)
    start, total = time.perf_counter(), 0
    # BLAS results depend on its thread count: pinned, as the dre-batch worker pins it
    with threadpool_limits(limits=args.cpu, user_api="blas"):
        for k, cuts_file in enumerate(files, 1):
            log.info("(%d/%d) %s", k, len(files), cuts_file)
            total += fit_tile(models, cuts_file, job)["objects"]
    log.info("done: %d objects in %d file(s), %.1f s", total, len(files), time.perf_counter() - start)
    return 0


def main(argv=None) -> int:
    return run_main("dre", drive, argv)


if __name__ == "__main__":
    raise SystemExit(main())
