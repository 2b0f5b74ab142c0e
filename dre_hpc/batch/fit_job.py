"""The fit job of one chunk: objects ``[start, stop)`` of a tile's cuts -> the chunk's outputs.

The same fitting as the ``dre`` command (`dre_hpc.fit`: one convolution of the model cube per PSF
extension, batched fits, the Summary columns joined with the SExtractor catalogue), with the
options built from the run config (``fit.*``), run by every rank of the job (`chunk_fit`, `comm`).
Only the cutouts of the chunk's units are read, one unit at a time.

Results do not depend on chunking, rank count or interruptions, bit for bit. A batched fit's
floating-point results depend on the batch's composition (BLAS blocking, the batch's union of
usable pixels), so the unit of work is fixed by the tile, not by the chunk: a *fitting unit* is
the objects of one image extension within one tile-global batch ``[b*B, (b+1)*B)``
(B = ``fit.batch_size``). A chunk fits every unit it touches whole and keeps its own rows, at the
cost of at most 2(B-1) extra object fits at its edges. (The ``dre`` command batches per cuts file,
so its numbers may differ in the last bits.)

`run_fit` pins BLAS to ``resources.fit.cpus_per_task`` threads (its results depend on the
thread count); world rank 0 removes an earlier attempt's outputs and loads the checkpoint; the ranks
fit the remaining units (`chunk_fit.fit_pending`); rank 0 gathers the results, writes the chunk's
files under temporary names and renames them (`dre_hpc.io.outputs`), and removes the checkpoint.
A chunk that fails leaves none of its output files. The fit draws no random numbers; any future
draw must use `chunking.object_rng(seed, tile, object_index)`.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from .. import __version__
from ..errors import InputError
from ..fit.engine import FitOptions
from ..fit.units import UnitReader, assemble, plan_units
from ..io.outputs import summary_table, write_chi, write_summary
from .checkpoint import Checkpoint, CheckpointPolicy, identity_digest
from .chunk_fit import ChunkInterrupted, NodeModels, NoStop, fit_pending
from .comm import SerialComm
from .prep_job import check_products, prep_chunk_range, prep_digest, tile_products
from .environment import hostname
from .rundir import RunDir, Tile, file_sha256

CHI_COMPRESSION = "none"          # chunk files are intermediates: speed over size
_MODELS: dict = {}                # one NodeModels per process (a job fits one chunk; tests many)


def fit_options(config, prep=None) -> FitOptions:
    """FitOptions from ``fit.*`` (as ``dre --statistic --gain --min-pixels --chunk --no-centre``);
    the gain is the tile's (`tile_photometry`) when `prep`, its prep done marker, is given (without
    it a ``header:KEY`` gain is left out: the report's gallery only draws the models)."""
    fit = config["fit"]
    gain = tile_photometry(config, prep)["gain"] if prep is not None else fit["gain"]
    return FitOptions(statistic=fit["statistic"], gain=None if isinstance(gain, str) else gain,
                      min_pixels=fit["min_pixels"], batch_size=fit["batch_size"], centre=fit["centre"])


def tile_photometry(config, prep: dict) -> dict:
    """``{"zero_point", "gain"}`` of a tile's fit: the values its prep resolved (``header:KEY``
    read from the tile's header) or, for a prep that recorded none, the config's numbers."""
    recorded = prep.get("photometry")
    if recorded is not None:
        return recorded
    fit = config["fit"]
    for key in ("zero_point", "gain"):
        if isinstance(fit[key], str):
            raise InputError(f"fit.{key} is {fit[key]} but the tile's prep done marker records no "
                             f"header values; redo the prep (dre-batch run --failed-only after "
                             f"removing markers/prep/{prep.get('tile')}.done)")
    return {"zero_point": fit["zero_point"], "gain": fit["gain"]}


def load_models(config, comm) -> NodeModels:
    """The model cube of ``fit.model`` (null: the default cube) for `comm`'s ranks, loaded once per
    process for a given cube, backend, thread count, PSF convention and sharing."""
    from ..cli.dre import describe_cube, load_cube
    fit = config["fit"]
    workers = config["resources"]["fit"]["cpus_per_task"]
    key = (fit["model"], fit["backend"], workers, fit["psf_pixel"], fit["shared_models"], id(comm))
    if key not in _MODELS:
        _MODELS.clear()
        _MODELS[key] = NodeModels(comm, lambda: load_cube(fit["model"]), backend=fit["backend"],
                                  workers=workers, psf_has_pixel=fit["psf_pixel"] == "included",
                                  shared=fit["shared_models"], describe=lambda: describe_cube(fit["model"]))
    return _MODELS[key]


def convolve_for_fits(rundir: RunDir, config, tile: Tile) -> dict:
    """Convolve ``fit.model`` with each PSF extension of the tile into the tile's model cache, at
    the end of its prep, so that every fit job of the tile loads the models instead of reading the
    cube and convolving it. Done only where the models fit in half of ``resources.prep.mem_gb``
    (0: no limit); otherwise the first fit job of the tile convolves. Returns what the prep done
    marker records: ``{"convolved", "seconds"}`` or ``{"skipped": reason}``."""
    from ..cli.dre import describe_cube, load_cube
    from ..fit.units import psf_index
    from ..io.cuts import read_cut_objects
    from ..models.psf import read_psf
    begin = time.perf_counter()
    fit, limit_gb = config["fit"], config["resources"]["prep"]["mem_gb"]
    grid, _ = describe_cube(fit["model"])
    pixels = grid.boxsize * grid.boxsize
    need_gb = 3 * grid.unique_models()[0].size * pixels * 4 / 1e9     # matrix, squares, model-major
    if limit_gb and need_gb > 0.5 * limit_gb:
        return {"skipped": f"the models need about {need_gb:.1f} GB, more than half of "
                           f"resources.prep.mem_gb ({limit_gb:g}); the first fit job of the tile convolves"}
    products = tile_products(rundir, tile)
    models = NodeModels(None, lambda: load_cube(fit["model"]), backend="cpu",
                        workers=config["resources"]["prep"]["cpus_per_task"],
                        psf_has_pixel=fit["psf_pixel"] == "included", describe=lambda: describe_cube(fit["model"]),
                        cache_dir=rundir.model_cache(tile.name))
    extensions = np.unique(read_cut_objects(products["cuts"])[0]["EXT_NUMBER"])
    for ext in extensions:
        models.for_psf(read_psf(products["psf"], ext_number=psf_index(ext)))
    return {"convolved": len(extensions), "seconds": round(time.perf_counter() - begin, 3)}


def unit_range(start: int, stop: int, n_objects: int, batch_size: int) -> tuple:
    """``(lo, hi)``: the objects of the whole fitting units that chunk ``[start, stop)`` touches."""
    if start == stop:
        return start, stop
    return start // batch_size * batch_size, min(-(-stop // batch_size) * batch_size, n_objects)


def chunk_identity(config, tile: Tile, bounds: tuple, n_objects: int, prep: dict, cube_key) -> str:
    """What a checkpoint must match: the chunk, the settings that change results, the cube and
    the prep products (their checksums)."""
    fit = config["fit"]
    settings = {k: fit[k] for k in ("model", "statistic", "backend", "gain", "batch_size", "centre",
                                    "min_pixels", "psf_pixel")}
    if isinstance(fit["gain"], str):                # header:KEY: the tile's own value
        settings["gain"] = tile_photometry(config, prep)["gain"]
    return identity_digest({"version": __version__, "tile": tile.name, "bounds": list(bounds),
                            "n_objects": n_objects, "fit": settings, "cube": cube_key,
                            "prep": prep.get("outputs")})


def provenance(config, tile: Tile, k: int, n_chunks: int, bounds: tuple, psf_rel: str,
               prep: dict | None = None) -> dict:
    """FITS header cards of a chunk table: the dre Summary's cards and the run's provenance; with
    the prep done marker `prep`, the tile's own gain and zero point and where its PSF came from."""
    fit, prep = config["fit"], prep or {}
    photometry = (tile_photometry(config, prep) if prep
                  else {"gain": fit["gain"], "zero_point": fit["zero_point"]})
    psf = prep.get("psf") or {}
    return {"DRE_VER": __version__, "STATISTC": fit["statistic"], "PSF": psf_rel[-60:],
            "PSFSRC": psf.get("source", "psfex"), "PSFFILE": str(psf.get("file", ""))[-60:],
            "GAIN": photometry["gain"] if photometry["gain"] else "none",
            "ZEROPT": photometry["zero_point"] if photometry["zero_point"] is not None else "none",
            "RUN": config["run"]["name"], "CFGHASH": config.hash(), "SEED": config["run"]["seed"],
            "TILE": tile.name, "CHUNK": k, "NCHUNKS": n_chunks, "OBJSTART": bounds[0], "OBJSTOP": bounds[1]}


def chunk_table(results: dict, objects, start: int, catalog, meta: dict, zero_point):
    """The dre Summary table of a chunk; ``ROW`` is the object's index in the tile's cuts file."""
    table = summary_table(results, objects, zero_point, catalog, meta)
    table["ROW"] = np.asarray(table["ROW"]) + start
    return table


def remove_chunk_outputs(rundir: RunDir, tile: str, k: int) -> None:
    """Delete a chunk's output files and their temporary siblings."""
    for path in rundir.chunk_outputs(tile, k).values():
        path.unlink(missing_ok=True)
        path.with_name(path.name + ".tmp").unlink(missing_ok=True)


def write_chunk(rundir: RunDir, tile: str, k: int, table, names, results, grid, statistic) -> dict:
    """Write the chunk's ``_dre.fits`` and ``_chi.h5`` (each through a temporary name and a
    rename); ``{kind: {"path", "sha256", "bytes"}}`` with paths relative to the run directory."""
    paths = rundir.chunk_outputs(tile, k)
    write_summary(paths["dre"], table)
    write_chi(paths["chi"], names, results["SURFACE"], grid, statistic, CHI_COMPRESSION)
    return {kind: {"path": Path(p).relative_to(rundir.root).as_posix(), "sha256": file_sha256(p),
                   "bytes": Path(p).stat().st_size} for kind, p in paths.items()}


def run_fit(rundir: RunDir, config, tile: Tile, k: int, prep: dict, comm=None, stop=None):
    """Fit chunk `k` of `tile` (its range from the prep done marker `prep`) with every rank of
    `comm` (default: this process alone) and write its outputs.

    `stop`: a `StopSignals` (entered by the caller) whose signal ends the fit at the next unit
    with a checkpoint and `ChunkInterrupted` on every rank. Returns, on world rank 0, the
    tile-specific content of the done marker (``tile, chunk, n_chunks, start, stop, rows, outputs,
    seconds, config_hash, prep_digest`` and how the work went: ``ranks, resumed_objects,
    fitted_objects, checkpoints, per_rank``); None on the other ranks. On any exception no output
    file remains. A prep product that is missing or changed since the prep (`check_products`)
    is a `PrepChanged` error before anything is fitted.
    A symbolic link at ``tiles/<tile>`` or ``chunks/<tile>`` (or above) is refused (RunDirError)
    before anything is read or written.
    """
    comm, stop = comm or SerialComm(), stop or NoStop()
    for folder in (rundir.tile_dir(tile.name), rundir.chunk_dir(tile.name)):
        rundir.check_inside(folder)              # no link planted there sends outputs elsewhere
    # BLAS results depend on its thread count: pin it, so they do not depend on the launcher
    with threadpool_limits(limits=config["resources"]["fit"]["cpus_per_task"], user_api="blas"):
        return _run_fit(rundir, config, tile, k, prep, comm, stop)


def _run_fit(rundir, config, tile, k, prep, comm, stop):
    begin = time.perf_counter()
    n_chunks = int(prep["n_chunks"])
    bounds = prep_chunk_range(prep, k, n_chunks)
    if comm.rank == 0:
        remove_chunk_outputs(rundir, tile.name, k)           # an earlier attempt's, if any
    check_products(rundir, tile, prep)      # every rank: the same answer, so none waits for another
    try:
        models = load_models(config, comm)
        models.use_cache_dir(rundir.model_cache(tile.name))
        work = ChunkWork(rundir, config, tile, k, prep, bounds, models)
        resumed = work.checkpoint.load(work.sizes) if comm.rank == 0 else {}
        done = set(comm.bcast(sorted(resumed)))
        mine, stats, stopped = fit_pending(
            comm, models, [u for u in work.units if u.uid not in done], work.reader.unit,
            work.products["psf"], work.options, work.checkpoint, work.policy, stop,
            config["fit"]["schedule"])
        gathered = comm.gather(({} if stopped else mine, dict(stats, rank=comm.rank, host=hostname())))
        if stopped:
            raise interrupted(stop, work, done, gathered)
        if comm.rank != 0:
            return None
        return dict(work.finish(resumed, gathered), seconds=round(time.perf_counter() - begin, 3))
    except BaseException:
        if comm.rank == 0:
            remove_chunk_outputs(rundir, tile.name, k)
        raise


def interrupted(stop, work, done, gathered) -> ChunkInterrupted:
    """The exception of a stopped fit; on rank 0 it counts what the checkpoint now holds."""
    if gathered is None:
        return ChunkInterrupted(f"interrupted by {stop.received or 'another rank'}")
    saved = sum(work.sizes[uid] for uid in done) + sum(s["objects"] for _, s in gathered)
    return ChunkInterrupted(f"interrupted by {stop.received or 'a signal to another rank'}: the "
                            f"checkpoint holds {saved} of {sum(work.sizes.values())} objects "
                            f"(whole units); a rerun resumes from there")


class ChunkWork:
    """One chunk's fit as every rank sees it: range, units, reader, checkpoint, policy."""

    def __init__(self, rundir, config, tile, k, prep, bounds, models):
        self.rundir, self.config, self.tile, self.k, self.prep = rundir, config, tile, k, prep
        self.bounds, self.models = bounds, models
        self.options = fit_options(config, prep).for_grid(models.grid)
        n_objects = int(prep["n_objects"])
        self.lo, self.hi = unit_range(*bounds, n_objects, self.options.batch_size)
        self.products = tile_products(rundir, tile)
        catalog = self.products["catalog"]
        self.reader = UnitReader(self.products["cuts"], catalog if catalog.is_file() else None, self.lo,
                                 self.hi, models.grid.boxsize)
        if len(self.reader.objects) != self.hi - self.lo:
            raise InputError(f"{self.reader.path}: {len(self.reader.objects)} objects from {self.lo} to "
                             f"{self.hi}, expected {self.hi - self.lo} (the prep marker counts {n_objects}); "
                             f"rerun the tile's prep")
        self.units = plan_units(self.reader.objects["EXT_NUMBER"], self.lo, self.options.batch_size)
        self.sizes = {u.uid: u.size for u in self.units}
        identity = chunk_identity(config, tile, bounds, n_objects, prep, models.key)
        self.checkpoint = Checkpoint(rundir.checkpoint_dir(tile.name, k), identity, models.comm.rank)
        fit = config["fit"]
        self.policy = CheckpointPolicy(fit["checkpoint_seconds"], fit["checkpoint_objects"])

    def finish(self, resumed: dict, gathered: list) -> dict:
        """Rank 0: assemble every unit's results, write the chunk's files, drop the checkpoint."""
        results = dict(resumed)
        for part, _ in gathered:
            results.update(part)
        start, stop = self.bounds
        keep = slice(start - self.lo, stop - self.lo)
        columns = assemble(self.units, results, self.lo, self.hi, keep, self.models.grid)
        meta = provenance(self.config, self.tile, self.k, int(self.prep["n_chunks"]), self.bounds,
                          self.products["psf"].relative_to(self.rundir.root).as_posix(), self.prep)
        table = chunk_table(columns, self.reader.objects[keep], start, self.reader.catalog, meta,
                            tile_photometry(self.config, self.prep)["zero_point"])
        outputs = write_chunk(self.rundir, self.tile.name, self.k, table, self.reader.names[keep],
                              columns, self.models.grid, self.config["fit"]["statistic"])
        self.checkpoint.clear()
        per_rank = [stats for _, stats in gathered]
        return {"tile": self.tile.name, "chunk": self.k, "n_chunks": int(self.prep["n_chunks"]),
                "start": start, "stop": stop, "rows": len(table), "outputs": outputs,
                "config_hash": self.config.hash(), "prep_digest": prep_digest(self.prep),
                "ranks": len(gathered),
                "schedule": self.config["fit"]["schedule"],
                "resumed_objects": sum(self.sizes[uid] for uid in resumed),
                "fitted_objects": sum(s["objects"] for s in per_rank),
                "checkpoints": sum(s["checkpoints"] for s in per_rank), "per_rank": per_rank}
