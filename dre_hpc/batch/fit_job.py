"""The fit job of one chunk: objects ``[start, stop)`` of a tile's cuts -> the chunk's outputs.

The same fitting as the ``dre`` command (`dre_hpc.fit`: one convolution of the model cube per PSF
extension, batched fits, the Summary columns joined with the SExtractor catalogue), with the
options built from the run config (``fit.*``). Only the chunk's cutouts (and its edge batches)
are read.

Results do not depend on chunking, bit for bit. A batched fit's floating-point results depend on
the batch's composition (BLAS blocking, the batch's union of usable pixels), so the unit of work is
fixed by the tile, not by the chunk: a *fitting unit* is the objects of one image extension
within one tile-global batch ``[b*B, (b+1)*B)`` (B = ``fit.batch_size``). A chunk fits every unit
it touches whole and keeps its own rows, at the cost of at most 2(B-1) extra object fits at its
edges. (The ``dre`` command batches per cuts file, so its numbers may differ in the last bits.)

Split for the MPI/GPU worker to come: `fit_objects` fits whole units of a `CutoutSet` (no files,
no markers; ranks can share out units), `chunk_table` and `write_chunk` turn the results into the
chunk's files, and `run_fit` strings them together for one process. Outputs are written under
temporary names and renamed (`dre_hpc.io.outputs`); a chunk that fails leaves none of its
output files. The fit draws no random numbers; any future draw must use
`chunking.object_rng(seed, tile, object_index)`.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from .. import __version__
from ..errors import InputError
from ..fit.engine import FitOptions, fit_batch
from ..fit.tiles import CubeModels, empty_results, psf_index
from ..io.catalog import offsets_from_catalog, read_catalog
from ..io.cuts import read_cuts
from ..io.outputs import summary_table, write_chi, write_summary
from ..models.psf import read_psf
from .chunking import chunk_range
from .prep_job import tile_products
from .rundir import RunDir, Tile, file_sha256

CHI_COMPRESSION = "none"          # chunk files are intermediates: speed over size
_MODELS: dict = {}                # one CubeModels per process (a job fits one chunk; tests many)


def fit_options(config) -> FitOptions:
    """FitOptions from ``fit.*`` (as ``dre --statistic --gain --min-pixels --chunk --no-centre``)."""
    fit = config["fit"]
    return FitOptions(statistic=fit["statistic"], gain=fit["gain"], min_pixels=fit["min_pixels"],
                      batch_size=fit["batch_size"], centre=fit["centre"])


def load_models(config) -> CubeModels:
    """The model cube of ``fit.model`` (null: the default cube) with its convolution cache,
    loaded once per process for a given cube, backend, thread count and PSF convention."""
    from ..cli.dre import load_cube
    fit = config["fit"]
    workers = config["resources"]["fit"]["cpus_per_task"]
    key = (fit["model"], fit["backend"], workers, fit["psf_pixel"])
    if key not in _MODELS:
        cube, grid, cube_key = load_cube(fit["model"])
        _MODELS.clear()
        _MODELS[key] = CubeModels(cube, grid, cube_key, backend=fit["backend"], workers=workers,
                                  psf_has_pixel=fit["psf_pixel"] == "included")
    return _MODELS[key]


def read_chunk(products: dict, start: int, stop: int, boxsize: int) -> tuple:
    """``(cuts, catalog)``: objects ``[start, stop)`` of the tile's cuts, with positions from the
    catalogue where the cuts file has none (DRE layout), and the catalogue (None if absent)."""
    cuts = read_cuts(products["cuts"], start, stop, boxsize=boxsize)
    catalog = read_catalog(products["catalog"]) if products["catalog"].is_file() else None
    if catalog is not None and not np.isfinite(cuts.offsets).all():
        offsets_from_catalog(cuts.objects, catalog, boxsize)
    return cuts, catalog


def unit_range(start: int, stop: int, n_objects: int, batch_size: int) -> tuple:
    """``(lo, hi)``: the objects of the whole fitting units that chunk ``[start, stop)`` touches."""
    if start == stop:
        return start, stop
    return start // batch_size * batch_size, min(-(-stop // batch_size) * batch_size, n_objects)


def fit_objects(models: CubeModels, cuts, first: int, psf_file, options: FitOptions) -> dict:
    """Fit a `CutoutSet` holding tile objects ``first, first+1, ...`` unit by unit (extension x
    tile-global batch, see the module docstring): per-object columns and ``SURFACE`` in the order
    of `cuts`. An object's numbers are the same whenever its unit is whole in `cuts`.
    Pure computation: no markers, no output files."""
    ext = np.asarray(cuts.objects["EXT_NUMBER"])
    batch = (first + np.arange(len(cuts))) // options.batch_size
    parts, order = [], []
    for value in np.unique(ext):                     # one convolution per extension's PSF
        mm = models.for_psf(read_psf(psf_file, ext_number=psf_index(value)))
        for b in np.unique(batch[ext == value]):
            index = np.flatnonzero((ext == value) & (batch == b))
            parts.append(fit_batch(mm, cuts.subset(index), options))
            order.append(index)
    if not parts:
        return empty_results(models.grid)
    inverse = np.argsort(np.concatenate(order))
    return {k: np.concatenate([p[k] for p in parts])[inverse] for k in parts[0]}


def fit_chunk(models: CubeModels, products: dict, bounds: tuple, n_objects: int, options) -> tuple:
    """``(cuts, catalog, results)`` of chunk ``bounds = (start, stop)``: its whole units read
    and fitted, then trimmed to the chunk's own objects."""
    start, stop = bounds
    lo, hi = unit_range(start, stop, n_objects, options.batch_size)
    cuts, catalog = read_chunk(products, lo, hi, models.grid.boxsize)
    if len(cuts) != hi - lo:
        raise InputError(f"{products['cuts']}: {len(cuts)} objects from {lo} to {hi}, expected "
                         f"{hi - lo} (the prep marker counts {n_objects}); rerun the tile's prep")
    results = fit_objects(models, cuts, lo, products["psf"], options)
    keep = slice(start - lo, stop - lo)
    return cuts.subset(keep), catalog, {k: v[keep] for k, v in results.items()}


def provenance(config, tile: Tile, k: int, n_chunks: int, bounds: tuple, psf_rel: str) -> dict:
    """FITS header cards of a chunk table: the dre Summary's cards and the run's provenance."""
    fit = config["fit"]
    return {"DRE_VER": __version__, "STATISTC": fit["statistic"], "PSF": psf_rel[-60:],
            "GAIN": fit["gain"] if fit["gain"] else "none",
            "ZEROPT": fit["zero_point"] if fit["zero_point"] is not None else "none",
            "RUN": config["run"]["name"], "CFGHASH": config.hash(), "SEED": config["run"]["seed"],
            "TILE": tile.name, "CHUNK": k, "NCHUNKS": n_chunks, "OBJSTART": bounds[0], "OBJSTOP": bounds[1]}


def chunk_table(results: dict, cuts, start: int, catalog, meta: dict, zero_point):
    """The dre Summary table of a chunk; ``ROW`` is the object's index in the tile's cuts file."""
    table = summary_table(results, cuts.objects, zero_point, catalog, meta)
    table["ROW"] = np.asarray(table["ROW"]) + start
    return table


def remove_chunk_outputs(rundir: RunDir, tile: str, k: int) -> None:
    """Delete a chunk's output files and their temporary siblings."""
    for path in rundir.chunk_outputs(tile, k).values():
        path.unlink(missing_ok=True)
        path.with_name(path.name + ".tmp").unlink(missing_ok=True)


def write_chunk(rundir: RunDir, tile: str, k: int, table, cuts, results, grid, statistic) -> dict:
    """Write the chunk's ``_dre.fits`` and ``_chi.h5`` (each through a temporary name and a
    rename); ``{kind: {"path", "sha256", "bytes"}}`` with paths relative to the run directory."""
    paths = rundir.chunk_outputs(tile, k)
    write_summary(paths["dre"], table)
    write_chi(paths["chi"], cuts.names, results["SURFACE"], grid, statistic, CHI_COMPRESSION)
    return {kind: {"path": Path(p).relative_to(rundir.root).as_posix(), "sha256": file_sha256(p),
                   "bytes": Path(p).stat().st_size} for kind, p in paths.items()}


def run_fit(rundir: RunDir, config, tile: Tile, k: int, prep: dict) -> dict:
    """Fit chunk `k` of `tile` (its range from the prep done marker `prep`) and write its outputs.

    Returns the tile-specific content of the done marker: ``tile, chunk, n_chunks, start, stop,
    rows, outputs, seconds, config_hash``. On any exception no output file of the chunk remains.
    """
    begin = time.perf_counter()
    n_chunks, n_objects = int(prep["n_chunks"]), int(prep["n_objects"])
    start, stop = chunk_range(n_objects, k, n_chunks)
    products = tile_products(rundir, tile)
    remove_chunk_outputs(rundir, tile.name, k)           # an earlier attempt's, if any
    try:
        models = load_models(config)
        cuts, catalog, results = fit_chunk(models, products, (start, stop), n_objects, fit_options(config))
        meta = provenance(config, tile, k, n_chunks, (start, stop),
                          products["psf"].relative_to(rundir.root).as_posix())
        table = chunk_table(results, cuts, start, catalog, meta, config["fit"]["zero_point"])
        outputs = write_chunk(rundir, tile.name, k, table, cuts, results, models.grid,
                              config["fit"]["statistic"])
    except BaseException:
        remove_chunk_outputs(rundir, tile.name, k)
        raise
    return {"tile": tile.name, "chunk": k, "n_chunks": n_chunks, "start": start, "stop": stop,
            "rows": len(table), "outputs": outputs, "seconds": round(time.perf_counter() - begin, 3),
            "config_hash": config.hash()}
