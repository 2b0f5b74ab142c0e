"""Collate a run: verify every chunk, merge the chunks per tile, and one flat catalogue of all tiles.

Before anything is written, every done chunk is checked against its done marker: it was fitted on
the tile's current prep (``prep_digest``), the row count is ``stop - start`` (and the range is the
one `prep_chunk_range` gives the tile's object count), the output
files are where `RunDir.chunk_outputs` puts them with the recorded byte counts and SHA-256, the FITS
table has ``rows`` rows and the chi file ``rows`` datasets. A corrupt or modified chunk is refused
with its path named, always. Chunks that are not done (failed, blocked, pending, never submitted)
are listed in a `CollateError` unless ``allow_missing``: then what is done is merged and the missing
chunks are recorded in the headers (``NMISSING``) and in ``collated/missing.json``.

Outputs (`RunDir.collated`), each written under a temporary name and renamed:
``<tile>_dre.fits`` (rows in object order), ``<tile>_chi.h5`` (the chunks' datasets copied as they
are, attributes of the first chunk), ``<run>_dre.fits`` (all tiles, a ``TILE`` column first, and
an extension ``TILES``: per tile its rows, chunks merged and missing, prep digest, versions,
PSF and its source, gain and zero point) and ``collate.json``: the verification record that `archive` checks.

The headers of the merged tables describe the merged file, never one of its chunks: the run's
provenance (`_provenance`), the fit settings every chunk shares (`RUN_CARDS`), the chunks merged
(``NMERGED``), the versions that fitted them (``DRE_VER``) and, in a tile's file, its ``TILE``,
``PSF`` and ``PREPDIG``; a chunk's own cards (``CHUNK``, ``NCHUNKS``, ``OBJSTART``, ``OBJSTOP``)
stay in the chunk files.
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from collections import Counter
from dataclasses import dataclass, field

import h5py
from astropy.table import Table

from dre_hpc import __version__
from dre_hpc.batch.chunking import ChunkingError
from dre_hpc.batch.config import load_config
from dre_hpc.batch.merge import (ChiFileError, DuplicateObject, TablePart, read_part, sha256_and_size,
                                 write_chi, write_tables)
from dre_hpc.batch.prep_job import prep_chunk_range, prep_digest
from dre_hpc.batch.rundir import RunDir, file_sha256, utc_now, write_json
from dre_hpc.batch.status import collect
from dre_hpc.errors import DreError
from dre_hpc.io.columns import describe, table_hdu

RECORD = "collate.json"
MISSING = "missing.json"
RUN_CARDS = ("STATISTC", "GAIN", "ZEROPT")   # chunk header cards that are the same in every chunk
TILE_CARDS = RUN_CARDS + ("PSF", "PSFSRC", "PSFFILE")    # ... of a tile
TILES_HDU = "TILES"                           # the flat catalogue's extension describing its tiles
THREADS = min(4, os.cpu_count() or 1)   # chunks verified at once (mostly SHA-256, off the GIL)
SHOWN = 20                     # problems listed in an error message; the rest are counted


class CollateError(DreError):
    """Chunks missing, failed or corrupt: nothing was written."""


@dataclass
class Chunk:
    """A verified done chunk."""

    tile: str
    k: int
    start: int
    stop: int
    paths: dict
    sha256: dict
    part: TablePart
    prep_digest: str

    @property
    def version(self) -> str:
        """The dre_hpc version that fitted the chunk (its table's ``DRE_VER``)."""
        return str(self.part.value("DRE_VER", "unknown"))


@dataclass
class CollateReport:
    """What `collate` wrote: rows per tile, the output files, the missing chunks."""

    run: str
    rows: dict
    outputs: list
    missing: list = field(default_factory=list)
    seconds: float = 0.0

    @property
    def objects(self) -> int:
        return sum(self.rows.values())


def _listing(lines: list, what: str) -> str:
    shown = lines[:SHOWN]
    more = f"\n  ... and {len(lines) - SHOWN} more" if len(lines) > SHOWN else ""
    return f"{len(lines)} {what}:\n  " + "\n  ".join(shown) + more


def _missing_entry(item) -> dict:
    return {"tile": item.tile, "chunk": item.chunk, "state": item.state, "reason": item.reason}


def _check_chunk(rundir: RunDir, tile, k: int, prep) -> tuple:
    """``(Chunk, [])`` for a chunk whose marker, prep, files, checksums and row counts agree, else
    ``(None, [problems])``, each naming the file. `prep`: the tile's prep done marker or None."""
    kind, marker = rundir.read_marker("fit", tile.name, k)
    where = f"tile {tile.name} chunk {k}"
    if kind != "done":
        return None, [f"{where}: {marker.get('reason') if marker else 'no done marker'}"]
    if prep is None:
        return None, [f"{where}: the tile's prep has no done marker (being redone?): the chunk "
                      f"cannot be tied to the products it was fitted on"]
    n_objects = prep.get("n_objects")
    try:
        start, stop, rows = int(marker["start"]), int(marker["stop"]), int(marker["rows"])
        outputs = marker["outputs"]
        if marker["prep_digest"] != prep_digest(prep):
            return None, [f"{where}: fitted on other prep products than the tile's current ones "
                          f"(its prep was redone after this fit)"]
        if n_objects is not None and (start, stop) != prep_chunk_range(prep, k, tile.n_chunks):
            return None, [f"{where}: done marker range [{start}, {stop}) is not chunk {k} of "
                          f"{tile.n_chunks} of {n_objects} objects"]
    except (KeyError, TypeError, ValueError, ChunkingError) as exc:
        return None, [f"{rundir.marker('fit', tile.name, k)}: done marker incomplete ({exc})"]
    if rows != stop - start:
        return None, [f"{where}: {rows} rows for objects [{start}, {stop}) ({stop - start} expected)"]
    paths, problems = rundir.chunk_outputs(tile.name, k), []
    for name, path in paths.items():
        problems += _check_file(rundir, path, (outputs or {}).get(name))
    if problems:
        return None, problems
    part, problems = _check_contents(paths, rows)
    if problems:
        return None, problems
    return Chunk(tile.name, k, start, stop, paths, {n: outputs[n]["sha256"] for n in paths}, part,
                 marker["prep_digest"]), []


def _check_file(rundir: RunDir, path, recorded) -> list:
    """Problems of one chunk output against its marker entry ``{"path", "sha256", "bytes"}``."""
    rel = path.relative_to(rundir.root).as_posix()
    if not isinstance(recorded, dict) or recorded.get("path") != rel:
        return [f"{path}: the done marker does not record this output ({recorded!r})"]
    if path.is_symlink() or not path.is_file():
        return [f"{path}: chunk output missing (or not a regular file)"]
    if path.stat().st_size != recorded.get("bytes"):
        return [f"{path}: corrupt or modified: {path.stat().st_size} bytes, the done marker "
                f"records {recorded.get('bytes')}"]
    if file_sha256(path) != recorded.get("sha256"):
        return [f"{path}: corrupt or modified: its SHA-256 differs from the done marker's"]
    return []


def _check_contents(paths: dict, rows: int) -> tuple:
    """``(TablePart, problems)``: the FITS table has `rows` rows (its header is read, not the
    data) and the chi file `rows` datasets."""
    try:
        part = read_part(paths["dre"])
    except (OSError, IndexError, KeyError, ValueError) as exc:
        return None, [f"{paths['dre']}: cannot read the FITS table: {exc}"]
    if part.rows != rows:
        return None, [f"{paths['dre']}: {part.rows} rows, the done marker records {rows}"]
    try:
        with h5py.File(paths["chi"], "r") as h5:
            n_chi = len(h5)
    except OSError as exc:
        return None, [f"{paths['chi']}: cannot read the chi file: {exc}"]
    if n_chi != rows:
        return None, [f"{paths['chi']}: {n_chi} objects, the done marker records {rows}"]
    return part, []


def verify(rundir: RunDir, allow_missing: bool = False) -> tuple:
    """``(chunks per tile, missing items)``: every done chunk verified; a `CollateError` for a
    corrupt chunk, and for missing chunks unless `allow_missing`."""
    status = collect(rundir)
    missing = [_missing_entry(i) for i in status.items if i.stage == "fit" and i.state != "done"]
    if missing and not allow_missing:
        lines = [f"tile {m['tile']} chunk {'?' if m['chunk'] is None else m['chunk']}: {m['state']}"
                 + (f" ({m['reason']})" if m["reason"] else "") for m in missing]
        raise CollateError(f"{rundir.root}: cannot collate, " + _listing(lines, "chunks not done")
                           + "\n(dre-batch run --failed-only reruns them; --allow-missing collates the rest)")
    done = {(i.tile, i.chunk) for i in status.items if i.stage == "fit" and i.state == "done"}
    chunks, jobs = {}, []
    for tile in rundir.tiles():
        chunks[tile.name] = []
        if tile.n_chunks is not None:
            kind, prep = rundir.read_marker("prep", tile.name)
            prep = prep if kind == "done" else None
            jobs += [(tile, k, prep) for k in range(tile.n_chunks) if (tile.name, k) in done]
    problems = []
    with ThreadPoolExecutor(max_workers=THREADS) as pool:     # hashing releases the GIL
        for chunk, bad in pool.map(lambda job: _check_chunk(rundir, *job), jobs):
            problems += bad
            if chunk:
                chunks[chunk.tile].append(chunk)
    if problems:
        raise CollateError(f"{rundir.root}: cannot collate, " + _listing(problems, "bad chunks")
                           + "\n(remove a bad chunk's done marker; dre-batch run --failed-only reruns it)")
    if not any(chunks.values()):
        raise CollateError(f"{rundir.root}: nothing to collate: no chunk is done")
    return chunks, missing


def _versions(chunks) -> str:
    """The dre_hpc versions that fitted `chunks`, comma-separated (one, normally)."""
    return ",".join(sorted({c.version for c in chunks}))


def _provenance(config, chunks: list, n_tiles: int, n_missing, when: str) -> dict:
    """Header cards of a collated catalogue of the (verified) `chunks`: (value, comment) by keyword."""
    cards = {"RUNNAME": config["run"]["name"],          # long values: no comment (CONTINUE cards)
             "CFGHASH": config.hash(),                  # SHA-256 of the resolved run config
             "SEED": (config["run"]["seed"], "master seed of the run"),
             "COLLVER": (__version__, "dre_hpc version that collated"),
             "DRE_VER": (_versions(chunks), "dre_hpc version(s) that fitted"),
             "NTILES": (n_tiles, "tiles in this file"),
             "NOBJECTS": (sum(c.stop - c.start for c in chunks), "objects (rows) in this file"),
             "NMERGED": (len(chunks), "chunks merged into this file"),
             "COLLATED": (when, "time of collate (UTC)")}
    if n_missing is not None:
        cards["NMISSING"] = (n_missing, "chunks not done, left out (allow_missing)")
    return cards


def _tiles_hdu(chunks: dict, missing: Counter):
    """The flat catalogue's ``TILES`` extension: one row per tile in it (`chunks` per tile)."""
    done = {tile: c for tile, c in chunks.items() if c}
    table = describe(Table({
        "TILE": list(done), "ROWS": [sum(c.stop - c.start for c in cs) for cs in done.values()],
        "NMERGED": [len(cs) for cs in done.values()], "NMISSING": [missing[t] for t in done],
        "PREPDIG": [cs[0].prep_digest for cs in done.values()],
        "DRE_VER": [_versions(cs) for cs in done.values()],
        "PSF": [str(cs[0].part.value("PSF", "")) for cs in done.values()],
        "PSFSRC": [str(cs[0].part.value("PSFSRC", "psfex")) for cs in done.values()],
        "GAIN": [str(cs[0].part.value("GAIN", "none")) for cs in done.values()],
        "ZEROPT": [str(cs[0].part.value("ZEROPT", "none")) for cs in done.values()]}))
    hdu = table_hdu(table)
    hdu.name = TILES_HDU
    return hdu


def _merge_tile(rundir: RunDir, tile: str, done: list, cards: dict, hasher) -> dict:
    """Write ``<tile>_dre.fits`` and ``<tile>_chi.h5``; ``{path: (sha256, bytes)}`` (for the chi
    file a future of `hasher`, an executor: it is hashed while the next tile is merged)."""
    fits_path, chi_path = rundir.collated(f"{tile}_dre.fits"), rundir.collated(f"{tile}_chi.h5")
    cards = {"TILE": tile, "PREPDIG": done[0].prep_digest, **cards}    # the prep of every chunk (verified)
    try:
        written = {fits_path: write_tables(fits_path, [c.part for c in done], cards, keep=TILE_CARDS)}
    except ValueError as exc:
        raise CollateError(f"{rundir.chunk_dir(tile)}: cannot merge the chunk tables of tile {tile}: "
                           f"{exc}") from None
    try:
        write_chi(chi_path, [c.paths["chi"] for c in done])
    except (DuplicateObject, ChiFileError) as exc:
        raise CollateError(f"tile {tile}: {exc}") from None
    written[chi_path] = hasher.submit(sha256_and_size, chi_path)
    return written


def collate(rundir, allow_missing: bool = False) -> CollateReport:
    """Verify and merge the chunks of the run in `rundir` (see the module docstring)."""
    begin = time.perf_counter()
    rundir = (rundir if isinstance(rundir, RunDir) else RunDir(rundir)).require()
    config = load_config(rundir.config)
    rundir.check_inside(rundir.collated(RECORD))            # no link sends the collated files out
    chunks, missing = verify(rundir, allow_missing)
    rundir.collated(RECORD).unlink(missing_ok=True)        # the old record is void from here on
    when, run = utc_now(), config["run"]["name"]
    tile_missing = Counter(m["tile"] for m in missing)
    written, rows = {}, {}
    with ThreadPoolExecutor(max_workers=1) as hasher:
        for tile, done in chunks.items():
            if done:
                rows[tile] = sum(c.stop - c.start for c in done)
                cards = _provenance(config, done, 1, tile_missing[tile] if allow_missing else None, when)
                written.update(_merge_tile(rundir, tile, done, cards, hasher))
        written = {p: (w.result() if isinstance(w, Future) else w) for p, w in written.items()}
    flat_path = rundir.collated(f"{run}_dre.fits")
    merged = [c for done in chunks.values() for c in done]
    cards = _provenance(config, merged, len(rows), len(missing) if allow_missing else None, when)
    for key, card in (("gain", "GAIN"), ("zero_point", "ZEROPT")):
        if isinstance(config["fit"][key], str):       # header:KEY: per tile, in the TILES extension
            cards[card] = (f"{config['fit'][key]}", "per tile: see the TILES extension")
    try:
        written[flat_path] = write_tables(flat_path, [c.part for c in merged], cards,
                                          labels=[c.tile for c in merged], keep=RUN_CARDS,
                                          extra=[_tiles_hdu(chunks, tile_missing)])
    except ValueError as exc:
        raise CollateError(f"{flat_path}: cannot stack the tiles' tables: {exc}") from None
    _write_records(rundir, chunks, missing, written, rows, when, allow_missing)
    return CollateReport(run, rows, list(written), missing, time.perf_counter() - begin)


def _write_records(rundir: RunDir, chunks, missing, outputs: dict, rows, when, allow_missing) -> None:
    """``missing.json`` (only with missing chunks) and the verification record ``collate.json``."""
    if missing:
        write_json(rundir.collated(MISSING), {"time": when, "missing": missing})
    else:
        rundir.collated(MISSING).unlink(missing_ok=True)
    record = {
        "time": when, "allow_missing": allow_missing, "missing": len(missing),
        "tiles": {tile: {"rows": rows.get(tile, 0),
                         "chunks": [{"chunk": c.k, "start": c.start, "stop": c.stop, "sha256": c.sha256}
                                    for c in done]} for tile, done in chunks.items()},
        "outputs": {p.relative_to(rundir.root).as_posix(): {"sha256": sha, "bytes": size}
                    for p, (sha, size) in outputs.items()},
    }
    write_json(rundir.collated(RECORD), record)


def read_record(rundir: RunDir) -> dict:
    """The verification record of the last collate, or a CollateError when collate has not run."""
    path = rundir.collated(RECORD)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CollateError(f"{rundir.root}: the run has not been collated (no {path}); "
                           f"run dre-batch collate first") from None
    except (OSError, ValueError) as exc:
        raise CollateError(f"{path}: cannot read the collate record: {exc}") from None
