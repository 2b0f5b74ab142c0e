"""Fitting units: the fixed batches that make a fit's numbers independent of how it is run.

A batched fit's floating-point results depend on the batch's composition (BLAS blocking, the
product groups of `engine.fit_statistic`), so the unit of work is fixed by the tile: a *unit* is
the objects of one image extension within one tile-global batch ``[b*B, (b+1)*B)``
(B = the batch size). The ``dre`` command and every dre-batch chunk, rank and attempt fit the same
units, so they give the same numbers bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .subgrid import FIT_COLUMNS


@dataclass(frozen=True)
class Unit:
    """One fitting unit: objects ``first + index`` of the tile (one extension, one batch)."""

    uid: int
    ext: int
    first: int                 # tile index of the batch's first object in the read range
    stop: int                  # end of that range
    index: np.ndarray          # positions of the unit's objects within [first, stop)

    @property
    def size(self) -> int:
        return int(self.index.size)


def plan_units(ext_numbers, lo: int, batch_size: int) -> list:
    """The units of objects ``lo, lo+1, ...`` with extension numbers `ext_numbers`, sorted by
    (extension, batch); ``uid`` is the position in that order."""
    ext = np.asarray(ext_numbers)
    tile_index = lo + np.arange(ext.size)
    batch = tile_index // batch_size
    units = []
    for value in np.unique(ext):
        for b in np.unique(batch[ext == value]):
            first, stop = max(b * batch_size, lo), min((b + 1) * batch_size, lo + ext.size)
            members = np.flatnonzero((ext == value) & (batch == b)) + lo - first
            units.append(Unit(len(units), int(value), int(first), int(stop), members))
    return units


def phases(units) -> list:
    """``[(ext, [units])]`` in extension order."""
    grouped = {}
    for unit in units:
        grouped.setdefault(unit.ext, []).append(unit)
    return sorted(grouped.items())


def psf_index(ext_number: int) -> int:
    """PSFEx HDU (0-based among PSF HDUs) of a cut: SExtractor's EXT_NUMBER is 1-based; 0 means none."""
    return max(int(ext_number) - 1, 0)


def assemble(units, results: dict, lo: int, hi: int, keep: slice, grid) -> dict:
    """Columns of objects ``[lo, hi)`` in order from per-unit results, trimmed to `keep`."""
    if not units:
        return empty_results(grid)
    position = np.concatenate([u.first - lo + u.index for u in units])
    inverse = np.argsort(position)
    in_order = bool(np.array_equal(inverse, np.arange(inverse.size)))     # one extension: no reordering
    names = results[units[0].uid].keys()
    columns = {k: np.concatenate([results[u.uid][k] for u in units]) for k in names}
    return {k: (v if in_order else v[inverse])[keep] for k, v in columns.items()}


def empty_results(grid) -> dict:
    """The result columns of `engine.fit_batch` for zero objects (``SURFACE`` sized for `grid`)."""
    f = np.zeros(0)
    names = ["CHI", "CHI_STD", "LOGR_CHI", "LOGR_VAR", "LOGR_CHI_VAR", "LOGR_PARAB", "LOGR_STD", "INDEX",
             "LOGR", "AX_RATIO", "ANGLE", "FLUX", "FLUX_ERR", "CHI2", "INDEX_MEAN", "INDEX_ERR",
             "AX_RATIO_MEAN", "AX_RATIO_ERR", "ANGLE_MEAN", "ANGLE_ERR", "LOGR_MEAN", "LOGR_ERR",
             *(name + suffix for name in FIT_COLUMNS for suffix in ("", "_ERR"))]
    cols = {n: f for n in names}
    cols.update(MODEL_IDX=np.zeros((0, 4), np.int16), DOF=np.zeros(0, np.int64), NPIX=np.zeros(0, np.int64),
                FLAGS=np.zeros(0, np.int64), SURFACE=np.zeros((0, grid.size), np.float32))
    return cols


#: The object fields that `offsets_from_catalog` fills (the rest come from the cuts file alone).
POSITION_FIELDS = ("DX", "DY", "X_IMAGE", "Y_IMAGE")


class UnitReader:
    """The object table of objects ``[lo, hi)`` of a cuts file and its units' cutouts, read one
    unit at a time, with positions from the catalogue where the cuts file has none (DRE layout).

    The ``dre`` command reads a whole file through it, a dre-batch chunk its own range. The pixel
    arrays of a unit's cutouts are read into buffers that the next `unit` call reuses: a unit's
    `CutoutSet` is valid until the next one is read."""

    def __init__(self, cuts_path, catalog_path, lo: int = 0, hi: int | None = None, boxsize: int = 128):
        from ..io.catalog import read_catalog
        from ..io.cuts import read_cut_objects
        from ..io.catalog import offsets_from_catalog
        self.path, self.boxsize, self.lo = cuts_path, boxsize, lo
        self._buffers = {}
        self.catalog = read_catalog(catalog_path) if catalog_path is not None else None
        self.objects, self.names = read_cut_objects(self.path, lo, hi)
        if self.catalog is not None and not np.isfinite(self.objects[["DX", "DY"]].tolist()).all():
            offsets_from_catalog(self.objects, self.catalog, self.boxsize)

    def unit(self, unit):
        """The `CutoutSet` of one unit, its positions those of the object table (matched once)."""
        from ..io.cuts import read_cuts
        cuts = read_cuts(self.path, unit.first, unit.stop, boxsize=self.boxsize, buffers=self._buffers)
        rows = slice(unit.first - self.lo, unit.stop - self.lo)
        for name in POSITION_FIELDS:
            cuts.objects[name] = self.objects[name][rows]
        if np.array_equal(unit.index, np.arange(len(cuts))):     # one extension: the whole read
            return cuts
        return cuts.subset(unit.index)
