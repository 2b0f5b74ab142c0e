"""The convolved models as the fit reads them, and the one holder that makes them per PSF.

Layout (`ModelMatrix`): pixel-major ``(P, K)`` float32, the rows (stamp pixels) in *radial order*,
the nearest to the model centre first, with the element-wise squares beside it. A galaxy's usable
pixels (its mask, after centring on the model centre) lie inside a disc, so the products of an
object read a contiguous prefix of rows ``models[:n]``: no per-batch gather of K x P columns, no
per-batch squares, and the original statistic reads the same rows (no transposed copy).

`NodeModels` is the holder used by the ``dre`` command and by the dre-batch worker alike: the
convolution of the cube's unique stamps with the current PSF, written straight into the layout
above. The stamps are read a block at a time as they are convolved (`CubeFile`, memory-mapped):
the cube itself is never held in memory. With an MPI communicator the convolved arrays live once
per node in shared memory (every node rank reads and convolves a slice). With a ``cache_dir`` the
convolved models of each (cube, PSF) are kept on disk (`CachedModels`: the matrix, its squares,
the model-major copy and the supports, as ``.npy``) so that the next job of the same tile *maps*
them instead of reading the cube and convolving it again: no copy, no squares, no transpose; the
pages come from the node's page cache, shared by every job and rank of the node that maps them,
and a job touches only the rows its objects use.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from ..errors import DreError
from ..models.convolve import ALGORITHM_VERSION, convolve_cube, psf_digest, remove_pixel_response
from ..models.core import CORE_VERSION, CoreStore, core_pixels, correction_matrix
from ..models.grid import SUPPORT_TAIL, UNIQUE_ORDER
from .backend import get_backend, to_host

log = logging.getLogger(__name__)

#: Stamps convolved per block before they are scattered into the pixel-major matrix.
CONVOLVE_BLOCK = 64
LAYOUT_VERSION = f"radial-v1|{UNIQUE_ORDER}"
#: Models per block of `ModelMatrix.column_blocks` (adjacent blocks with the same rows are merged).
COLUMN_BLOCK = 256


def radial_order(boxsize: int) -> np.ndarray:
    """Flat stamp indices sorted by distance from the model centre ``(B // 2, B // 2)`` (stable)."""
    c = boxsize // 2
    y, x = np.mgrid[:boxsize, :boxsize]
    return np.argsort(((y - c) ** 2 + (x - c) ** 2).ravel(), kind="stable")


@functools.lru_cache(maxsize=4)
def radial_layout(boxsize: int) -> tuple:
    """``(order, rank, radius)`` of a stamp size, made once (read-only): `radial_order`, the row
    of each stamp pixel, and each row's distance from the model centre (non-decreasing)."""
    order = radial_order(boxsize)
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    c = boxsize // 2
    radius = np.hypot(*np.divmod(order, boxsize) - np.array([[c], [c]]))
    for array in (order, rank, radius):
        array.flags.writeable = False
    return order, rank, radius


def to_pixel_major(stamps, order) -> np.ndarray:
    """(K, B, B) stamps -> (P, K) float32 with rows in ``order`` (the layout of `ModelMatrix`; the
    holder writes it from the transforms directly, `NodeModels._convolve`)."""
    flat = np.asarray(stamps, dtype=np.float32).reshape(len(stamps), -1)
    return np.ascontiguousarray(np.take(flat, order, axis=1).T)     # take: 2.5x faster than flat[:, order]


#: Largest model matrix (bytes) of which `NodeModels` also keeps a model-major copy, from which
#: the sub-grid windows read contiguous rows (the default cube's 150 MB and the sersic cube's
#: 1.8 GB: yes; with it the sersic cube's window products take 0.2 ms/object instead of 0.7), and
#: at most this fraction of the node's memory (`model_major_limit`).
MODEL_MAJOR_BYTES = 2 * 2 ** 30
MODEL_MAJOR_MEMORY_FRACTION = 1 / 8


def model_major_limit() -> int:
    """Bytes up to which a model-major copy is kept: `MODEL_MAJOR_BYTES`, or less on a node with
    less than 8x that memory (the sersic cube needs about 8 GB without the copy)."""
    try:
        memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return MODEL_MAJOR_BYTES
    return int(min(MODEL_MAJOR_BYTES, memory * MODEL_MAJOR_MEMORY_FRACTION))


def model_support(xp, models_sq, tail=SUPPORT_TAIL, rows=128) -> np.ndarray:
    """(K,) host number of leading rows of each column of ``models_sq`` (P, K) that hold all but
    ``tail`` of its sum (float64 cumulative sums). Sums of blocks of `rows` rows first (one pass),
    then the cumulative sum inside the one block where each column crosses the limit."""
    p, k = models_sq.shape
    starts = list(range(0, p, rows))
    sums = xp.stack([models_sq[lo:lo + rows].sum(axis=0, dtype=xp.float64) for lo in starts])
    cum = xp.cumsum(sums, axis=0)                                          # (blocks, K)
    limit = (1 - tail) * cum[-1]
    below = to_host((cum < limit).sum(axis=0))                             # whole blocks below
    base = to_host(xp.concatenate([xp.zeros((1, k)), cum], axis=0))[below, np.arange(k)]
    limit = to_host(limit)
    out = np.empty(k, dtype=np.int64)
    for j in np.unique(below):
        cols = np.flatnonzero(below == j)
        lo = starts[min(int(j), len(starts) - 1)]
        part = xp.cumsum(models_sq[lo:lo + rows][:, xp.asarray(cols)].astype(xp.float64), axis=0)
        inside = to_host((xp.asarray(base[cols]) + part < xp.asarray(limit[cols])).sum(axis=0))
        out[cols] = lo + inside + 1
    return np.minimum(out, p)


class ModelMatrix:
    """The unique convolved models of a grid on the backend ``xp``, pixel-major in radial order.

    Attributes
    ----------
    models, models_sq : (P, K) float32 backend arrays; row i is stamp pixel ``order[i]``.
    models_major : optional (K, P) copy of ``models`` (model-major), where the holder keeps one.
    order : (P,) flat stamp index of each row; ``rank`` its inverse; ``radius`` the distance of
        each row's pixel from the model centre (non-decreasing).
    representatives, inverse : the grid's unique models (`ModelGrid.unique_models`).
    host : the (P, K) host array of ``models``.
    """

    def __init__(self, xp, grid, models_t, models_sq_t=None, models_major=None, support=None):
        self.representatives, self.inverse = grid.unique_models()
        k, p = self.representatives.size, grid.boxsize * grid.boxsize
        if tuple(models_t.shape) != (p, k):
            raise DreError(f"expected a ({p}, {k}) pixel-major model matrix, got {tuple(models_t.shape)}")
        self.xp, self.grid = xp, grid
        self.order, self.rank, self.radius = radial_layout(grid.boxsize)
        self.host = models_t
        self.models = xp.asarray(models_t)
        if models_sq_t is None:
            models_sq_t = xp.multiply(self.models, self.models)
        self.models_sq = xp.asarray(models_sq_t)
        self.models_major = None if models_major is None else xp.asarray(models_major)
        self._support = None if support is None else np.asarray(support)

    @property
    def row_min(self):
        """(P,) minimum of each row over the models (the ``dre`` kernel's test for terms whose
        denominator can cancel), made on first use."""
        if getattr(self, "_row_min", None) is None:
            from .dre_kernel import model_row_min
            self._row_min = model_row_min(self.xp, self.models)
        return self._row_min

    @property
    def support(self) -> np.ndarray:
        """(K,) host: the leading rows that hold all but `SUPPORT_TAIL` of each model's sum of
        squares (made on first use, one pass over the squares): beyond them a model adds nothing
        that float32 products could show (the sub-grid window's products stop there)."""
        if getattr(self, "_support", None) is None:
            self._support = model_support(self.xp, self.models_sq)
        return self._support

    def column_blocks(self, n: int) -> list:
        """``[(k0, k1, rows), ...]``: the models ``k0:k1`` need only their first ``rows`` (<= `n`)
        rows to reach every pixel of a group whose pixels are the first `n` rows: blocks of
        `COLUMN_BLOCK` models, each stopped at its largest `support` (the unique models are ordered
        by their reach, `models.grid.support_radius`), adjacent blocks with the same rows merged."""
        if getattr(self, "_block_support", None) is None:
            s = self.support
            self._block_support = np.array([s[k:k + COLUMN_BLOCK].max() for k in range(0, s.size, COLUMN_BLOCK)])
        blocks = []
        for b, reach in enumerate(self._block_support):
            rows, k0, k1 = int(min(n, reach)), b * COLUMN_BLOCK, min((b + 1) * COLUMN_BLOCK, self.n_models)
            if blocks and blocks[-1][2] == rows:
                blocks[-1] = (blocks[-1][0], k1, rows)
            else:
                blocks.append((k0, k1, rows))
        return blocks

    @property
    def n_models(self) -> int:
        return int(self.models.shape[1])

    @property
    def n_pixels(self) -> int:
        return int(self.models.shape[0])

    def stamp(self, full_index: int) -> np.ndarray:
        """The convolved model (B, B) of a full-grid cell, on the host."""
        flat = np.empty(self.n_pixels, dtype=np.float32)
        flat[self.order] = self.host[:, self.inverse[full_index]]
        return flat.reshape(self.grid.boxsize, self.grid.boxsize)

    def columns(self, unique_index, n: int):
        """(N, n) backend array: the first `n` radial pixels of the models `unique_index` (N,)."""
        return self.models[:n][:, unique_index].T


class NodeModels:
    """A model cube's unique stamps and their convolution with the current PSF (see the module).

    Parameters
    ----------
    comm : `dre_hpc.batch.comm` communicator, or None for one process.
    load : callable returning ``(cube, grid, key)``, the cube a `CubeFile` or an in-memory array
        (`stamp_source`); called (on node rank 0) at construction without ``describe``, and by
        each rank whose stamps are needed (a cache miss) and not yet loaded.
    describe : optional callable returning ``(grid, key)`` without reading the cube: then the cube
        is read on the first convolution, and not at all when the disk cache has every PSF.
    cache_dir : optional directory of the on-disk cache of convolved models (pixel-major ``.npy``);
        `use_cache_dir` changes it (e.g. per tile).
    Collective: every rank constructs it and calls `for_psf` with the same PSFs in the same order.
    """

    def __init__(self, comm, load, backend="cpu", workers=None, psf_has_pixel=True, shared=True,
                 describe=None, cache_dir=None):
        if comm is None:
            from ..batch.comm import SerialComm
            comm = SerialComm()
        self.comm, self.workers, self.psf_has_pixel, self._load = comm, workers, psf_has_pixel, load
        self.shared = bool(shared) and comm.size > 1
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self._source = None                  # the cube's stamps (`stamp_source`), read when needed
        lead = comm.node_rank == 0 or not self.shared
        if describe is not None:
            grid, key = describe() if lead else (None, None)
        else:
            cube, grid, key = load() if lead else (None, None, None)
            self._source = None if cube is None else stamp_source(cube, grid)
            del cube
        if self.shared:
            grid, key = comm.bcast((grid, key) if comm.rank == 0 else None)
        self.grid, self.key = grid, key
        k, p = grid.unique_models()[0].size, grid.boxsize * grid.boxsize
        self.shape = (p, k)
        # model-major too where it is small: the sub-grid windows then read contiguous rows
        self.keep_major = 4 * k * p <= model_major_limit()
        self.convolved = self.convolved_sq = self.convolved_major = None    # made on first convolution
        self.order = radial_layout(grid.boxsize)[0]
        # the cores computed without aliasing (`models.core`): for dre_hpc's own stamps and a PSF
        # that holds the pixel response
        self.corrects_cores = bool(psf_has_pixel) and bool(grid.renderer)
        self._cores = None                   # their fine cores (`CoreStore`), made on first use
        comm.barrier()
        self.xp = get_backend(backend, device=comm.local_rank)
        self.digest, self.matrix = None, None
        self.n_convolved = 0                 # convolutions run by this process (cache hits do not count)
        self.seconds_preparing = 0.0         # spent convolving or mapping the models of new PSFs

    def use_cache_dir(self, cache_dir) -> None:
        """Keep and look for convolved models in `cache_dir` (None: no disk cache) from now on."""
        self.cache_dir = Path(cache_dir) if cache_dir else None

    def for_psf(self, psf) -> ModelMatrix:
        """The models convolved with `psf` (its pixel response removed first when it has one):
        mapped from the disk cache when it has them, else convolved (and cached)."""
        effective = psf
        if self.psf_has_pixel:
            psf = remove_pixel_response(psf)
        digest = psf_digest(psf)
        if digest != self.digest:
            begin = time.perf_counter()
            entry = self._cache_entry(digest)
            self.matrix = self._map_cached(entry)
            if self.matrix is None:
                self._convolve(psf, effective)
                self.matrix = ModelMatrix(self.xp, self.grid, self.convolved, self.convolved_sq,
                                          self.convolved_major)
                support = self.matrix.support        # with the models: every wls product needs it
                if entry is not None and self.comm.rank == 0:
                    entry.write(self.convolved, self.convolved_sq, self.convolved_major, support)
            self.digest = digest
            self.seconds_preparing += time.perf_counter() - begin
        return self.matrix

    def _fill_pixel_major(self, major, first, tile=128):
        """Models ``first:first + len(major)`` from their model-major rows `major` into the pixel-
        major matrix, transposed 128 x 128 at a time (tiles that stay in cache), then their squares
        row block by row block. Squaring the transposed tiles as they came took 5x longer, and a
        column block of the matrix at a time (strided rows) longer still."""
        rows, cols = major.shape[1], slice(first, first + len(major))
        for start in range(0, len(major), tile):
            stop = min(start + tile, len(major))
            for r in range(0, rows, tile):
                self.convolved[r:r + tile, first + start:first + stop] = major[start:stop, r:r + tile].T
        for r in range(0, rows, tile):
            block = self.convolved[r:r + tile, cols]
            np.multiply(block, block, out=self.convolved_sq[r:r + tile, cols])

    def _cache_entry(self, digest):
        if self.cache_dir is None:
            return None
        text = f"{ALGORITHM_VERSION}|{LAYOUT_VERSION}|{self.key}|{digest}" + \
            (f"|{CORE_VERSION}" if self.corrects_cores else "")
        return CachedModels(self.cache_dir / f"models-{hashlib.sha256(text.encode()).hexdigest()[:32]}",
                            self.shape)

    def _map_cached(self, entry):
        """The `ModelMatrix` of a usable cache entry, every rank mapping the same files (node rank
        0 checks them, the same answer on every rank); None on a miss."""
        hit = False
        if entry is not None and (self.comm.node_rank == 0 or not self.shared):
            hit = entry.usable()
        if self.shared:
            hit = self.comm.bcast(hit if self.comm.rank == 0 else None)
        if not hit:
            return None
        models, squares, major, support = entry.open()
        return ModelMatrix(self.xp, self.grid, models, squares, major, support)

    def _buffers(self):
        """The arrays a convolution fills, made once (node-shared when shared; collective)."""
        if self.convolved is None:
            alloc = self.comm.shared_array if self.shared else np.empty
            p, k = self.shape
            self.convolved, self.convolved_sq = alloc((p, k), np.float32), alloc((p, k), np.float32)
            self.convolved_major = alloc((k, p), np.float32) if self.keep_major else None

    def _convolve(self, psf, effective):
        self._buffers()
        parts, part = (self.comm.node_size, self.comm.node_rank) if self.shared else (1, 0)
        lo, hi = np.linspace(0, self.convolved.shape[1], parts + 1).astype(int)[part:part + 2]
        if self._source is None:                # every rank reads the stamps it convolves itself
            self._source = stamp_source(self._load()[0], self.grid)
        representatives = self.grid.unique_models()[0]
        rows = None if self.convolved_major is not None else \
            np.empty((CONVOLVE_BLOCK, self.shape[0]), np.float32)
        if self.corrects_cores and self._cores is None:
            self._cores = CoreStore(self.grid)
        cores = CoreCorrection(self.grid.boxsize, effective, psf, self._cores) if self.corrects_cores else None
        for start in range(lo, hi, CONVOLVE_BLOCK):
            stop = min(start + CONVOLVE_BLOCK, hi)
            # each model's pixels in radial order, straight from the transform: model-major rows
            major = self.convolved_major[start:stop] if rows is None else rows[:stop - start]
            convolve_cube(self._source.stamps(representatives[start:stop]), psf, workers=self.workers,
                          out=major, order=self.order)
            if cores is not None:
                cores.apply(major, start, stop)
            if rows is not None:            # no model-major copy: into the columns block by block
                self._fill_pixel_major(major, start)
        if rows is None:
            self._fill_pixel_major(self.convolved_major[lo:hi], lo)
        self.n_convolved += 1
        if cores is not None and parts == 1:
            self._cores.save()
        if self.shared:
            self.comm.barrier()


class CoreCorrection:
    """Adds each model's core computed without aliasing (`models.core`) to its convolved
    model-major row, for one PSF: `effective` (with the pixel response) and `used` (without,
    what the stamps were convolved with); the cores come from `store` (a `CoreStore`; None when
    they are given to `corrections`)."""

    def __init__(self, boxsize, effective, used, store):
        self.store = store
        matrix, h = correction_matrix(effective, used)
        self.pixels, inside = core_pixels(h, boxsize)      # the part inside a small stamp
        self.matrix = np.ascontiguousarray(matrix[inside])
        self.rows = radial_layout(boxsize)[1][self.pixels]

    def corrections(self, cores) -> np.ndarray:
        """(N, pixels) float32 corrections of the cores (N, F * F): summed in float64 on one BLAS
        thread, so that every process (whatever its thread count or batch) gets the same bits."""
        with threadpool_limits(limits=1, user_api="blas"):
            return (np.asarray(cores, dtype=np.float64) @ self.matrix.T).astype(np.float32)

    def apply(self, major, start: int, stop: int) -> None:
        """Correct the rows `major` of the unique models ``start:stop``."""
        major[:, self.rows] += self.corrections(self.store.get(start, stop))


def convolved_stamps(grid, stamps, flat_cells, psf, psf_has_pixel=True) -> np.ndarray:
    """(N, B, B) float32: the cells `flat_cells` of `grid` (their `stamps`, N x B x B) convolved
    with `psf` as `NodeModels` convolves them (the pixel response removed, the cores corrected),
    for a few models without convolving the whole cube (the report's gallery)."""
    cores = None
    if psf_has_pixel and grid.renderer:
        cores = CoreStore(grid).take(grid.unique_models()[1][np.asarray(flat_cells)])
    return convolve_models(stamps, cores, psf, psf_has_pixel)


def convolve_models(stamps, cores, psf, psf_has_pixel=True) -> np.ndarray:
    """(N, B, B) float32: model `stamps` convolved with `psf` as the fit's models are: without the
    pixel response when the PSF holds it, and then with the `cores` (`models.core.render_cores`
    of the same models; None: no correction) computed without aliasing."""
    used = remove_pixel_response(psf) if psf_has_pixel else psf
    out = convolve_cube(stamps, used)
    if psf_has_pixel and cores is not None:
        correction = CoreCorrection(out.shape[-1], psf, used, None)
        flat = out.reshape(len(out), -1)
        flat[:, correction.pixels] += correction.corrections(cores)
    return out


class ArrayStamps:
    """`stamp_source` of a cube already in memory, ``grid.shape + (B, B)``."""

    def __init__(self, cube, grid):
        self.flat = np.asarray(cube).reshape((grid.size, grid.boxsize, grid.boxsize))

    def stamps(self, flat_indices) -> np.ndarray:
        return np.take(self.flat, flat_indices, axis=0).astype(np.float32, copy=False)


def stamp_source(cube, grid):
    """What `NodeModels` reads the stamps from: a `CubeFile` (``stamps(flat_indices)``) as it
    is, an in-memory cube through `ArrayStamps`."""
    return cube if hasattr(cube, "stamps") else ArrayStamps(cube, grid)


class CachedModels:
    """One (cube, PSF) entry of the disk cache: a directory of ``.npy`` files, the (P, K) models,
    their squares, the supports and, when the writer kept one, the (K, P) model-major copy.
    Written under a temporary name and renamed whole; read by memory-mapping (read-only)."""

    FILES = ("models", "squares", "support", "major")

    def __init__(self, path: Path, shape: tuple):
        self.path, self.shape = Path(path), tuple(shape)

    def _expected(self, name):
        p, k = self.shape
        return {"models": ((p, k), np.float32), "squares": ((p, k), np.float32),
                "support": ((k,), np.int64), "major": ((k, p), np.float32)}[name]

    def _load(self, name, mmap_mode="r"):
        """The named array mapped read-only, checked against the expected shape and type; None
        when the entry has no such file (only the major copy is optional)."""
        file = self.path / f"{name}.npy"
        if name == "major" and not file.exists():
            return None
        arr = np.load(file, mmap_mode=mmap_mode, allow_pickle=False)
        shape, dtype = self._expected(name)
        if arr.shape != shape or arr.dtype != dtype:
            raise ValueError(f"{file.name}: shape {arr.shape} {arr.dtype}, expected {shape} "
                             f"{np.dtype(dtype)}")
        return arr

    def usable(self) -> bool:
        """True when every file is there with its shape and type; a damaged entry is reported
        (warning) and treated as a miss (the convolution writes it again)."""
        if not self.path.is_dir():
            return False
        try:
            for name in self.FILES:
                self._load(name)
            return True
        except (OSError, ValueError) as exc:
            log.warning("ignoring convolved-model cache entry %s (%s)", self.path, exc)
            return False

    def open(self) -> tuple:
        """``(models, squares, major or None, support)``: plain read-only ndarrays over the files'
        mappings (no copy; a page is read when first used)."""
        arrays = {name: self._load(name) for name in self.FILES}
        support = np.array(arrays["support"])
        return tuple(None if arrays[n] is None else arrays[n].view(np.ndarray)
                     for n in ("models", "squares", "major")) + (support,)

    def write(self, models, squares, major, support) -> None:
        """Write the entry through a temporary directory renamed into place (replacing a damaged
        one); a failure only costs the next job a convolution."""
        tmp = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp"))
            for name, arr in zip(self.FILES, (models, squares, support, major)):
                if arr is not None:
                    np.save(tmp / f"{name}.npy", np.asarray(arr))
            if self.path.exists():
                shutil.rmtree(self.path)
            os.replace(tmp, self.path)
            tmp = None
        except OSError as exc:
            log.warning("could not write convolved-model cache entry %s (%s); continuing", self.path, exc)
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
