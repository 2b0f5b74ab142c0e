"""What a run report reads: the collated files of a run directory, and nothing that needs a refit.

`load_run` reads the flat catalogue (only the columns the report uses, so 100,000 objects take a
fraction of a second), the verification record and the missing chunks that ``collate`` wrote, the
model grid from a collated chi file's attributes, each tile's object count from its prep marker and
each chunk's run time from its done marker (markers packed by ``archive`` are read from the archive).
`summary` turns that into the counts and fractions that the page, ``report --text`` and the JSON show.
"""

from __future__ import annotations

import json
import tarfile
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import h5py
import numpy as np

from ..batch.archive import archive_path
from ..batch.collate import MISSING, read_record
from ..batch.rundir import RunDir, chunk_label
from ..errors import DreError
from ..fit.subgrid import FIT_COLUMNS
from ..flags import FitFlag
from ..models.grid import ModelGrid

#: Flat catalogue columns the report reads (``MAG``: magnitude of the fitted flux).
COLUMNS = ("TILE", "ROW", "NUMBER", "EXT_NUMBER", "X_IMAGE", "Y_IMAGE", "MODEL_IDX", "INDEX", "LOGR",
           "AX_RATIO", "ANGLE", "FLUX", "MAG", "CHI2", "DOF", "FLAGS")
#: Columns read where the catalogue has them: the sub-grid estimates (validation's coverage).
OPTIONAL_COLUMNS = tuple(name + suffix for name in FIT_COLUMNS for suffix in ("", "_ERR"))


class ReportError(DreError):
    """The run cannot be reported: not collated, or its collated files cannot be read."""


@dataclass
class ChunkTime:
    """Run time of one done chunk, from its done marker."""

    tile: str
    chunk: int
    objects: int
    seconds: float
    ranks: int


@dataclass
class RunData:
    """The collated results of one run, as the report uses them."""

    root: Path
    run: str
    catalogue: object                    # astropy Table of `COLUMNS`
    grid: ModelGrid
    seed: int                            # the run's seed (run.seed)
    images: dict                         # tile name -> its image, in manifest order
    expected: dict                       # tile -> objects the prep found (None when unknown)
    missing: list                        # {"tile", "chunk", "state", "reason"} of chunks left out
    chunk_times: list = field(default_factory=list)
    notes: list = field(default_factory=list)   # what could not be read, for the page
    preps: dict = field(default_factory=dict)   # tile -> its prep done marker ({} when unread)

    @property
    def tiles(self) -> list:
        """Tile names in manifest order."""
        return list(self.images)

    @cached_property
    def fitted(self) -> np.ndarray:
        """Objects with a best model (``MODEL_IDX`` set, finite chi-square)."""
        c = self.catalogue
        first = np.asarray(c["MODEL_IDX"]).reshape(len(c), -1)[:, 0] if len(c) else np.zeros(0)
        return (first >= 0) & np.isfinite(np.asarray(c["CHI2"], float))

    @cached_property
    def chi2_dof(self) -> np.ndarray:
        """Chi-square per degree of freedom of every object (NaN where not `fitted`)."""
        c = self.catalogue
        ratio = np.asarray(c["CHI2"], float) / np.maximum(np.asarray(c["DOF"], float), 1)
        return np.where(self.fitted, ratio, np.nan)


def _flat_catalogue(rundir: RunDir, run: str):
    from astropy.io import fits
    from astropy.table import Table
    path = rundir.collated(f"{run}_dre.fits")
    try:
        with fits.open(path, memmap=True) as hdul:
            if len(hdul) < 2 or not isinstance(hdul[1], fits.BinTableHDU):
                raise ReportError(f"{path}: no table in extension 1; run dre-batch collate again")
            names = hdul[1].columns.names
            absent = [c for c in COLUMNS if c not in names]
            if absent:
                raise ReportError(f"{path}: the flat catalogue lacks the column(s) {', '.join(absent)}")
            rows = hdul[1].data
            wanted = COLUMNS + tuple(c for c in OPTIONAL_COLUMNS if c in names)
            table = Table({c: np.array(rows[c]) if rows is not None else np.zeros(0) for c in wanted})
    except (OSError, ValueError, TypeError) as exc:
        raise ReportError(f"{path}: cannot read the flat catalogue ({exc}); run dre-batch collate") from None
    table["TILE"] = np.char.rstrip(np.asarray(table["TILE"]).astype(str))
    return table


def _grid(rundir: RunDir, tiles: list, config_model) -> ModelGrid:
    """The model grid, from the attributes of the first collated chi file (as the fits wrote it)."""
    for tile in tiles:
        path = rundir.collated(f"{tile}_chi.h5")
        if path.is_file():
            try:
                with h5py.File(path, "r") as h5:
                    return ModelGrid.from_header(dict(h5.attrs), source=str(path))
            except (OSError, DreError):
                continue
    if config_model is None:
        return ModelGrid.default()
    raise ReportError(f"{rundir.collated('')}: no readable <tile>_chi.h5 to take the model grid from")


class _Markers:
    """Done markers, from ``markers/`` or, once ``archive`` has removed it, from the run's archive."""

    def __init__(self, rundir: RunDir, run: str):
        self.rundir, self.members = rundir, None
        archive = archive_path(rundir, run)
        if not (rundir.root / "markers").is_dir() and archive.is_file():
            try:
                with tarfile.open(archive, "r:gz") as tar:
                    self.members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()
                                    if m.isfile() and m.name.startswith("markers/") and m.name.endswith(".done")}
            except (OSError, tarfile.TarError):
                self.members = {}

    def read(self, stage: str, tile: str, k=None) -> dict | None:
        path = self.rundir.marker(stage, tile, k)
        try:
            if self.members is None:
                return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
            raw = self.members.get(path.relative_to(self.rundir.root).as_posix())
            return json.loads(raw) if raw is not None else None
        except (OSError, ValueError):
            return None


def _chunk_times(markers: _Markers, record: dict) -> list:
    times = []
    for tile, entry in record.get("tiles", {}).items():
        for chunk in entry.get("chunks", []):
            marker = markers.read("fit", tile, chunk["chunk"])
            if marker and isinstance(marker.get("seconds"), (int, float)):
                times.append(ChunkTime(tile, chunk["chunk"], int(chunk["stop"]) - int(chunk["start"]),
                                       float(marker["seconds"]), int(marker.get("ranks", 1))))
    return times


def load_run(run_dir) -> RunData:
    """Read what the report needs from a collated run directory (a ReportError when it has not been
    collated or its flat catalogue cannot be read)."""
    from ..batch.config import load_config
    rundir = RunDir(run_dir).require()
    try:
        record = read_record(rundir)
    except DreError as exc:
        raise ReportError(str(exc)) from None
    manifest, config = rundir.read_manifest(), load_config(rundir.config)
    run, images = manifest["run"], {t["name"]: t["image"] for t in manifest["tiles"]}
    tiles = list(images)
    catalogue = _flat_catalogue(rundir, run)
    grid = _grid(rundir, tiles, config["fit"]["model"])
    missing_path = rundir.collated(MISSING)
    missing = json.loads(missing_path.read_text())["missing"] if missing_path.is_file() else []
    markers = _Markers(rundir, run)
    expected, preps = {}, {}
    for tile in tiles:
        prep = markers.read("prep", tile)
        expected[tile] = int(prep["n_objects"]) if prep and "n_objects" in prep else None
        preps[tile] = prep or {}
    data = RunData(rundir.root, run, catalogue, grid, int(config["run"]["seed"]), images, expected, missing,
                   _chunk_times(markers, record), preps=preps)
    if not data.chunk_times and record.get("tiles"):
        data.notes.append("run times per chunk: no done marker of the collated chunks could be read "
                          "(markers removed, or chunks redone since the collate?)")
    return data


# -- numbers ---------------------------------------------------------------------------------------
def grid_edges(model_idx, grid: ModelGrid) -> dict:
    """Fraction of best fits on each edge of the grid: ``{"log r min": f, ...}`` over fitted objects
    (``MODEL_IDX`` >= 0). The angle axis is periodic and has no edge; a one-value axis is left out."""
    idx = np.asarray(model_idx).reshape(-1, 4)
    idx = idx[idx[:, 0] >= 0]
    out = {}
    for axis, (label, position) in zip(grid.axes, (("n", 0), ("b/a", 1), ("angle", 2), ("log r", 3))):
        if label == "angle" or axis.count < 2:
            continue
        for end, value in (("min", 0), ("max", axis.count - 1)):
            out[f"{label} {end}"] = float(np.mean(idx[:, position] == value)) if len(idx) else None
    return out


def flag_counts(flags) -> dict:
    """Objects with each `FitFlag` bit set, by flag name (every flag, zeros included)."""
    flags = np.asarray(flags, np.int64)
    return {flag.name: int(np.count_nonzero(flags & int(flag))) for flag in FitFlag}


def tile_rows(data: RunData) -> list:
    """Per tile: objects found by the prep, rows in the catalogue, fitted, clean (no flag), flagged,
    chunks missing (left out by ``collate --allow-missing``) and the objects with each flag that is
    set anywhere in the tile."""
    tiles = np.asarray(data.catalogue["TILE"])
    flags = np.asarray(data.catalogue["FLAGS"], np.int64)
    fitted = data.fitted
    missing = {}
    for entry in data.missing:
        missing[entry["tile"]] = missing.get(entry["tile"], 0) + 1
    rows = []
    for tile in data.tiles:
        mine = tiles == tile
        rows.append({"tile": tile, "objects": data.expected.get(tile), "rows": int(mine.sum()),
                     "fitted": int((mine & fitted).sum()), "clean": int((mine & (flags == 0)).sum()),
                     "flagged": int((mine & (flags != 0)).sum()), "missing_chunks": missing.get(tile, 0),
                     "flags": {k: v for k, v in flag_counts(flags[mine]).items() if v}})
    return rows


def psf_rows(data: RunData) -> list:
    """Tiles whose PSF is not PSFEx's own: ``{"tile", "source", "file", "reason"}`` (source
    ``user``, ``fallback`` or ``none``: no object to fit), from the prep done markers."""
    rows = []
    for tile in data.tiles:
        psf = data.preps.get(tile, {}).get("psf") or {}
        if psf.get("source") not in (None, "psfex"):
            rows.append({"tile": tile, "source": psf["source"], "file": psf.get("file") or "",
                         "reason": psf.get("reason") or psf.get("origin") or ""})
    return rows


def tile_warnings(data: RunData) -> list:
    """``{"tile", "warning"}``: what the preps reported (no object, an image mostly NaN or zero)."""
    return [{"tile": tile, "warning": str(text)} for tile in data.tiles
            for text in data.preps.get(tile, {}).get("warnings") or []]


def summary(data: RunData) -> dict:
    """The report's headline numbers (plain JSON types)."""
    c = data.catalogue
    flags = np.asarray(c["FLAGS"], np.int64)
    fitted = data.fitted
    chi2_dof = data.chi2_dof[fitted]
    seconds = sum(t.seconds for t in data.chunk_times)
    timed = sum(t.objects for t in data.chunk_times)
    return {"run": data.run, "tiles": len(data.tiles), "objects": len(c), "fitted": int(fitted.sum()),
            "clean": int(np.count_nonzero(flags == 0)), "flagged": int(np.count_nonzero(flags)),
            "missing_chunks": len(data.missing),
            "median chi2/dof": float(np.median(chi2_dof)) if chi2_dof.size else None,
            "flags": flag_counts(flags), "grid_edges": grid_edges(c["MODEL_IDX"], data.grid),
            "chunks_timed": len(data.chunk_times), "chunk_seconds": seconds,
            "objects_per_chunk_second": timed / seconds if seconds > 0 else None}


def chunk_label_of(time: ChunkTime) -> str:
    """``tile/00003`` for a chunk's run time."""
    return f"{time.tile}/{chunk_label(time.chunk)}"
