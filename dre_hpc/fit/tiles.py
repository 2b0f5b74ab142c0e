"""Fit every cuts file of a directory: the work behind the ``dre`` command.

For each ``<img>_cuts.h5``: find its PSF, convolve the cube once per PSF extension, fit the objects
in the tile's fitting units (`units`) through the same loop as the dre-batch worker
(`batch.chunk_fit.fit_pending`, one process), write ``Summary/<img>_dre.fits``,
``Chi/<img>_chi.h5`` and optionally mosaics. The same inputs and options give the same numbers
as a dre-batch run.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import __version__
from ..errors import InputError
from ..io.catalog import find_catalog
from ..io.outputs import mosaic_panels, summary_table, write_chi, write_mosaic, write_summary
from ..batch.chunk_fit import fit_pending
from ..batch.comm import SerialComm
from ..models.psf import image_stem, psf_path_for_image, read_psf
from .engine import FitOptions
from .model_matrix import NodeModels
from .units import UnitReader, assemble, phases, plan_units, psf_index

log = logging.getLogger(__name__)
CUTS_SUFFIX = "_cuts.h5"
#: The log line of a fitted tile, as benchmarks read it: objects, seconds, and the seconds of those
#: spent convolving or mapping the models for its PSFs.
FIT_LOG = re.compile(r": (\d+) objects fitted in ([0-9.]+) s.*? took ([0-9.]+) s of it")


@dataclass
class TileJob:
    """Where a run reads and writes, and how it fits."""

    cuts: str = "Cuts"
    psf: str = "PSF"
    summary_dir: str = "Summary"
    chi_dir: str | None = "Chi"
    catalogs: str | None = "Sextracted"
    mosaics_dir: str | None = None
    mosaic_png: bool = False
    zero_point: float | None = None
    compression: str = "medium"
    backend: str = "cpu"
    workers: int | None = None
    options: FitOptions = field(default_factory=FitOptions)


def list_cuts_files(cuts) -> list:
    """The cuts files of a directory (``*_cuts.h5``, sorted), or the one file given."""
    path = Path(cuts)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise InputError(f"cuts input {path} is neither a directory nor a file")
    files = sorted(path.glob(f"*{CUTS_SUFFIX}"))
    if not files:
        raise InputError(f"no *{CUTS_SUFFIX} files in {path}")
    return files


def fit_tile(models: NodeModels, cuts_file: Path, job: TileJob) -> dict:
    """Fit one cuts file and write its outputs. Returns counts for the log."""
    name = cuts_file.name[: -len(CUTS_SUFFIX)] if cuts_file.name.endswith(CUTS_SUFFIX) else image_stem(cuts_file)
    psf_file = psf_path_for_image(job.psf, name)
    if psf_file is None:
        raise InputError(f"no PSF for {name}: give --psf DIR (with {name}.psf) or --psf FILE")
    catalog_path = find_catalog(job.catalogs, name)
    reader = UnitReader(cuts_file, catalog_path, boxsize=models.grid.boxsize)
    preparing = models.seconds_preparing
    results, elapsed = _fit_by_extension(models, reader, psf_file, name, job)
    preparing = models.seconds_preparing - preparing
    meta = {"DRE_VER": __version__, "STATISTC": job.options.statistic, "PSF": str(psf_file)[-60:],
            "GAIN": job.options.gain if job.options.gain else "none",
            "ZEROPT": job.zero_point if job.zero_point is not None else "none"}
    n = len(reader.objects)
    write_summary(Path(job.summary_dir) / f"{name}_dre.fits",
                  summary_table(results, reader.objects, job.zero_point, reader.catalog, meta))
    if job.chi_dir and n:
        write_chi(Path(job.chi_dir) / f"{name}_chi.h5", reader.names, results["SURFACE"], models.grid,
                  job.options.statistic, job.compression)
    rate = n / elapsed if elapsed > 0 else float("inf")
    log.info("%s: %d objects fitted in %.2f s (%.1f objects/s), %d flagged; the models for its "
             "PSF(s) took %.2f s of it", name, n, elapsed, rate,
             int(np.count_nonzero(results.get("FLAGS", []))) if n else 0, preparing)
    return {"name": name, "objects": n, "seconds": elapsed}


def _fit_by_extension(models, reader, psf_file, name, job):
    """Fit the tile's units, extension by extension with that extension's PSF, reading one unit's
    cutouts at a time, and write the mosaics. Returns results in input order and the fit seconds."""
    n = len(reader.objects)
    options = job.options.for_grid(models.grid)
    units = plan_units(reader.objects["EXT_NUMBER"], 0, options.batch_size)
    start = time.perf_counter()
    results, _, _ = fit_pending(SerialComm(), models, units, reader.unit, psf_file, options)
    seconds = time.perf_counter() - start
    columns = assemble(units, results, 0, n, slice(0, n), models.grid)
    if job.mosaics_dir:
        for ext, group in phases(units):
            mm = models.for_psf(read_psf(psf_file, ext_number=psf_index(ext)))
            for unit in group:
                rows = unit.first + unit.index
                _write_mosaics(mm, reader.unit(unit), {k: v[rows] for k, v in columns.items()}, name, job)
    return columns, seconds


def _write_mosaics(mm, cuts, results, name, job):
    """Data, mask, model and residual of every object of ``cuts`` (one extension, fitted with ``mm``)."""
    from .centering import centre_cutouts
    out = Path(job.mosaics_dir) / name
    for i in range(len(cuts)):
        best = int(np.ravel_multi_index(results["MODEL_IDX"][i], mm.grid.shape)) \
            if results["MODEL_IDX"][i][0] >= 0 else None
        data, mask = cuts.data[i], cuts.mask[i]
        offset = np.nan_to_num(cuts.offsets[i:i + 1])
        if job.options.centre and np.any(offset != 0):
            d, _, m, _ = centre_cutouts(np, np.nan_to_num(data)[None], cuts.rms[i][None], mask[None],
                                        np.zeros((1,) + data.shape, bool), offset)
            data, mask = d[0], m[0]
        model = mm.stamp(best) if best is not None else np.zeros_like(data)
        flux = results["FLUX"][i] if np.isfinite(results["FLUX"][i]) else 0.0
        write_mosaic(out / f"{name}_{cuts.names[i]}_mosaic.fits", mosaic_panels(data, mask, model, flux),
                     [("NUMBER", int(cuts.objects["NUMBER"][i])), ("FLAGS", int(results["FLAGS"][i]))],
                     png=job.mosaic_png)
