"""Deterministic chunk bounds and per-object seeds for dre-batch.

Chunks are made of whole fitting *units* of U objects (the fit's batch size: the tile's objects
``[b*U, (b+1)*U)``, fitted together wherever they are fitted): with ``N_u = ceil(N / U)`` units,
chunk k of n covers units ``[N_u*k//n, N_u*(k+1)//n)``, so no chunk fits objects that it does not
keep (a chunk that cut a unit would fit the whole unit). The chunks tile ``[0, N)`` exactly,
differ in size by at most one unit, and any job can compute its own range from (N, k, n, U)
alone; with U = 1 chunk k covers ``[N*k//n, N*(k+1)//n)``. With ``chunks_per_tile`` the number
of chunks is *not* capped at the units: the job array is sized at setup time, before prep has
counted the objects, so a tile with fewer units than chunks simply has empty chunks (which still
finish and write zero rows); with ``objects_per_chunk`` it is (`n_chunks_for`). A tile always has
at least one chunk, so that every tile leaves a completion marker, even with N = 0.

Random draws are seeded from (master seed, tile name, object index) through
`numpy.random.SeedSequence`, with the tile name hashed by SHA-256 (Python's ``hash()`` is
salted per process), so an object's seed is the same for every chunking, rank count, process
and platform.
"""

from __future__ import annotations

import hashlib
import numbers

import numpy as np

from dre_hpc.errors import DreError


class ChunkingError(DreError):
    """Invalid chunking arguments (negative counts, zero chunks, both or neither size given)."""


def _count(value, name, minimum=0):
    """`value` as an int >= minimum, or a ChunkingError naming the argument."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ChunkingError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ChunkingError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def chunk_range(n_objects, k, n_chunks, unit=1):
    """Objects ``[start, stop)`` of chunk `k` (0-based) of `n_chunks` of a tile with `n_objects`,
    in whole units of `unit` objects (the last unit may be shorter)."""
    n_objects = _count(n_objects, "n_objects")
    n_chunks = _count(n_chunks, "n_chunks", 1)
    unit = _count(unit, "unit", 1)
    k = _count(k, "chunk index k")
    if k >= n_chunks:
        raise ChunkingError(f"chunk index k must be < n_chunks = {n_chunks}, got {k}")
    n_units = -(-n_objects // unit)
    return (min(n_objects, n_units * k // n_chunks * unit),
            min(n_objects, n_units * (k + 1) // n_chunks * unit))


def chunk_bounds(n_objects, n_chunks, unit=1):
    """All ``(start, stop)`` pairs of `n_chunks` chunks of `n_objects` objects, in order.

    Chunks may be empty when there are more chunks than units; their union is exactly
    ``[0, n_objects)``.
    """
    return [chunk_range(n_objects, k, n_chunks, unit) for k in range(_count(n_chunks, "n_chunks", 1))]


def n_chunks_for(n_objects, objects_per_chunk=None, chunks_per_tile=None, unit=1):
    """Number of chunks of a tile: exactly one of `objects_per_chunk`, `chunks_per_tile` is given.

    With `objects_per_chunk`: ``ceil(n_objects / objects_per_chunk)``, at least 1, and no more
    than the tile's units of `unit` objects (a chunk holds whole units: none is left empty).
    With `chunks_per_tile`: that number, whatever `n_objects` (chunks may be empty).
    """
    n_objects = _count(n_objects, "n_objects")
    if (objects_per_chunk is None) == (chunks_per_tile is None):
        raise ChunkingError("give exactly one of objects_per_chunk and chunks_per_tile "
                            f"(got objects_per_chunk={objects_per_chunk!r}, "
                            f"chunks_per_tile={chunks_per_tile!r})")
    if chunks_per_tile is not None:
        return _count(chunks_per_tile, "chunks_per_tile", 1)
    per_chunk = _count(objects_per_chunk, "objects_per_chunk", 1)
    unit = _count(unit, "unit", 1)
    return max(1, min(-(-n_objects // per_chunk), -(-n_objects // unit)))


def tile_key(tile_name):
    """A stable 64-bit integer from the tile name (SHA-256 of its UTF-8 bytes, first 8 bytes)."""
    if not isinstance(tile_name, str) or not tile_name:
        raise ChunkingError(f"tile_name must be a non-empty string, got {tile_name!r}")
    return int.from_bytes(hashlib.sha256(tile_name.encode("utf-8")).digest()[:8], "big")


def _seed_sequence(master_seed, tile_name, object_index):
    master_seed = _count(master_seed, "master_seed")
    object_index = _count(object_index, "object_index")
    return np.random.SeedSequence([master_seed, tile_key(tile_name), object_index])


def object_seed(master_seed, tile_name, object_index):
    """The 64-bit seed (a Python int) of object `object_index` of tile `tile_name` in a run."""
    state = _seed_sequence(master_seed, tile_name, object_index).generate_state(1, dtype=np.uint64)
    return int(state[0])


def object_rng(master_seed, tile_name, object_index):
    """A `numpy.random.Generator` for one object, seeded like `object_seed` (same SeedSequence)."""
    return np.random.default_rng(_seed_sequence(master_seed, tile_name, object_index))
