"""Merging chunk outputs: FITS tables (by bytes where possible) and chi-square HDF5 files.

FITS: collating a run joins thousands of chunk tables with the same columns. Parsing each into an
astropy Table and stacking them costs tens of milliseconds per file; here each table's header is
read once (lazily), its data block is copied as bytes and a header built for the merged file is
written in front: the first part's structure and column cards (units ``TUNITn`` and descriptions
``TCOMMn`` included), ``NAXIS2`` the total, only the part cards named in `keep` (the cards that
describe one part, e.g. a chunk's object range, never reach the merged file) and the given
cards. Optionally a fixed-width string column (e.g. ``TILE``) is put first, one label per part,
and further HDUs (e.g. a table of the tiles) after the table. Only plain binary tables qualify:
no heap (``PCOUNT`` 0) and the same column keywords (``TTYPEn``, ``TFORMn``, ``TNULLn``, ...) in
every part; otherwise `write_tables` falls back to astropy (read, stack, write), which is slower
but general (a column whose unit differs between parts then has none).

HDF5: `write_chi` copies every dataset of the chunk files into one file with ``H5Ocopy`` (no
decompression or recompression), with the attributes of the first file.

Every output is written under a temporary name in its folder and renamed (`replace_write`).
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from dataclasses import dataclass

import h5py
import numpy as np
from astropy.io import fits
from astropy.table import Column, Table, vstack

from dre_hpc.batch.rundir import file_sha256
from dre_hpc.errors import InputError
from dre_hpc.io.columns import COLUMNS, read_units, write_fits_table
from dre_hpc.io.fits_check import card_int, check_table, data_bytes, header_cards, open_binary, read_header

COLUMN_KEY = re.compile(r"^(TTYPE|TFORM|TUNIT|TCOMM|TNULL|TSCAL|TZERO|TDISP|TBCOL|TDIM|TCTYP|TCUNI|"
                        r"TCRPX|TCRVL|TCDLT|TRPOS)(\d+)$")
STRUCTURE = ("XTENSION", "BITPIX", "NAXIS", "NAXIS1", "NAXIS2", "PCOUNT", "GCOUNT", "TFIELDS")
BLOCK = 2880
CARD = 80


class PartError(InputError, ValueError):
    """A chunk table that cannot be read by hand (a ValueError too, as callers expect)."""


def _read_header(handle, path) -> bytes:
    """The raw header blocks at the handle's position, up to the block with the END card."""
    return read_header(handle, str(path), PartError)


def _cards(raw: bytes) -> dict:
    """``{keyword: 80-character card}`` of a raw header (the first card of a keyword wins)."""
    return header_cards(raw)


def _int(cards: dict, key: str, default=None, where: str = "FITS header") -> int:
    """A non-negative integer keyword; a `PartError` naming `where` and the keyword otherwise."""
    return card_int(cards, key, where, PartError, default)


def _data_bytes(cards: dict, where: str = "FITS header") -> int:
    """Size of an HDU's data (without padding) from its header cards, each keyword checked."""
    return data_bytes(cards, where, PartError)


@dataclass
class TablePart:
    """One binary table extension (HDU 1) of a file: its raw header, where its data start, its
    row count and row width. `header` (an astropy Header) is parsed only when asked for."""

    path: str
    raw: bytes
    offset: int
    rows: int
    width: int

    @property
    def header(self) -> fits.Header:
        return fits.Header.fromstring(self.raw.decode("ascii"))

    @property
    def nbytes(self) -> int:
        return self.width * self.rows

    def value(self, key: str, default=None):
        """The value of header keyword `key` (parsed from its card only), or `default`."""
        card = _cards(self.raw).get(key)
        return fits.Card.fromstring(card.decode("ascii", "replace")).value if card else default


def read_part(path) -> TablePart:
    """The first extension of `path`, read by hand (only the headers: fast), or a `PartError`
    (a ValueError) when it is not a binary table without a heap, or its header is damaged or
    claims more data than the file holds."""
    with open_binary(path, str(path), PartError) as handle:
        size = os.fstat(handle.fileno()).st_size
        first = handle.read(CARD)
        if not first.startswith(b"SIMPLE  =") or first[10:30].strip() != b"T":
            raise PartError(f"{path}: not a FITS file")
        handle.seek(0)
        primary = _cards(_read_header(handle, path))
        skip = -(-_data_bytes(primary, f"{path}, primary HDU") // BLOCK) * BLOCK
        if handle.tell() + skip >= size:
            raise PartError(f"{path}: no extension after the primary HDU (the primary header "
                            f"claims {skip} bytes of data, the file has {size - handle.tell()} more)")
        handle.seek(handle.tell() + skip)
        raw = _read_header(handle, path)
        offset = handle.tell()
    cards = _cards(raw)
    where = f"{path}, extension 1"
    if cards.get("XTENSION", b"")[10:30].strip() != b"'BINTABLE'":
        raise PartError(f"{path}: extension 1 is not a binary table")
    if _int(cards, "PCOUNT", 0, where) != 0 or _int(cards, "GCOUNT", 1, where) != 1:
        raise PartError(f"{path}: binary table with a heap (variable-length columns)")
    check_table(cards, where, PartError)
    nbytes = _data_bytes(cards, where)
    if offset + nbytes > size:
        raise PartError(f"{path}: extension 1 claims {nbytes} bytes of table data "
                        f"(NAXIS1 x NAXIS2) but the file has {size - offset} after its header "
                        f"(truncated, or absurd sizes in the header)")
    return TablePart(str(path), raw, offset, _int(cards, "NAXIS2", where=where),
                     _int(cards, "NAXIS1", where=where))


def layout(part: TablePart) -> tuple:
    """The cards that define the columns and the row width, as their 80-character images."""
    cards = [part.raw[i:i + CARD] for i in range(0, len(part.raw), CARD)]
    keys = [c for c in cards if COLUMN_KEY.match(c[:8].decode("ascii", "replace").strip())]
    return (part.width, tuple(sorted(keys)))


def same_layout(parts) -> bool:
    """Whether the rows of all `parts` can be concatenated as bytes."""
    first = layout(parts[0])
    return all(layout(p) == first for p in parts[1:])


def merged_header(header: fits.Header, keep=(), cards=None) -> fits.Header:
    """The header of a merged table: the structure and column cards of a part's `header`, its
    cards named in `keep`, then `cards` (keyword: value or (value, comment))."""
    out = fits.Header()
    for card in header.cards:
        if card.keyword in STRUCTURE or card.keyword in keep or COLUMN_KEY.match(card.keyword):
            out.append(card)
    for key, value in (cards or {}).items():
        out[key] = value
    return out


def _with_label_column(header: fits.Header, name: str, width: int) -> fits.Header:
    """`header` with a ``{width}A`` column `name` (described by `COLUMNS` when it knows it) put
    first, the other columns renumbered."""
    tfields, out = header["TFIELDS"], fits.Header()
    for card in header.cards:
        match = COLUMN_KEY.match(card.keyword)
        if match and int(match[2]) <= tfields:
            out.append((f"{match[1]}{int(match[2]) + 1}", card.value, card.comment))
        else:
            out.append(card)
        if card.keyword == "TFIELDS":
            out.append(("TTYPE1", name))
            out.append(("TFORM1", f"{width}A"))
            if name in COLUMNS:
                out.append(("TCOMM1", COLUMNS[name].description))
    out["TFIELDS"] = tfields + 1
    out["NAXIS1"] = header["NAXIS1"] + width
    return out


class _HashingWriter:
    """A file opened for writing that also computes the SHA-256 and byte count of what it wrote."""

    def __init__(self, path):
        self.handle, self.digest, self.bytes = open(path, "wb"), hashlib.sha256(), 0

    def write(self, data) -> None:
        self.handle.write(data)
        self.digest.update(data)
        self.bytes += len(data)

    def close(self) -> tuple:
        self.handle.close()
        return self.digest.hexdigest(), self.bytes


def _rows(part: TablePart) -> bytes:
    with open(part.path, "rb") as handle:
        handle.seek(part.offset)
        data = handle.read(part.nbytes)
    if len(data) != part.nbytes:
        raise ValueError(f"{part.path}: table data truncated ({len(data)} of {part.nbytes} bytes)")
    return data


def hdu_bytes(hdu) -> bytes:
    """The bytes of extension `hdu` as it stands in a file (header and padded data)."""
    buffer = io.BytesIO()
    fits.HDUList([fits.PrimaryHDU(), hdu]).writeto(buffer)
    return buffer.getvalue()[BLOCK:]             # an empty primary HDU is one header block


def write_concat(path, parts, cards: dict, labels=None, label_column: str = "TILE", keep=(),
                 extra=()) -> tuple:
    """Write the rows of `parts` (same layout) into a new FITS file at `path`: an empty primary
    HDU, one binary table with the `merged_header` of the first part (`keep`, `cards`),
    ``NAXIS2`` the total, and with `labels` (one string per part) a first string column
    `label_column`; then the HDUs `extra`. Returns ``(sha256, bytes)`` of the file written."""
    header = merged_header(parts[0].header, keep, cards)
    width = max([1] + [len(label.encode("utf-8")) for label in labels]) if labels is not None else 0
    if labels is not None:
        header = _with_label_column(header, label_column, width)
    header["NAXIS2"] = sum(p.rows for p in parts)
    out = _HashingWriter(path)
    try:
        out.write(fits.PrimaryHDU().header.tostring().encode("ascii"))
        out.write(header.tostring().encode("ascii"))
        for position, part in enumerate(parts):
            if part.rows == 0:
                continue
            data = _rows(part)
            if labels is not None:
                rows = np.zeros((part.rows, width + part.width), np.uint8)
                label = np.frombuffer(labels[position].encode("utf-8").ljust(width, b"\0"), np.uint8)
                rows[:, :width] = label
                rows[:, width:] = np.frombuffer(data, np.uint8).reshape(part.rows, -1)
                data = rows.tobytes()
            out.write(data)
        out.write(b"\0" * (-out.bytes % BLOCK))
        for hdu in extra:
            out.write(hdu_bytes(hdu))
    finally:
        result = out.close()
    return result


def replace_write(path, writer):
    """Call ``writer(tmp)`` for a temporary name next to `path`, then rename it to `path`; returns
    what `writer` returned."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        result = writer(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return result


def _read_described(part: TablePart) -> Table:
    """A part's table with the units and descriptions of its header."""
    return read_units(Table.read(part.path, format="fits", hdu=1, memmap=False), part.header)


def _stack_with_astropy(path, parts, cards: dict, labels, label_column: str, keep, extra) -> tuple:
    """The general path: astropy reads, stacks (the same columns required) and writes."""
    tables = [_read_described(p) for p in parts]
    for name in tables[0].colnames:            # a unit that differs between parts is none of them
        if len({str(t[name].unit) for t in tables if name in t.colnames}) > 1:
            for t in tables:
                if name in t.colnames:
                    t[name].unit = None
    if labels is not None:
        info = COLUMNS.get(label_column)
        for table, label in zip(tables, labels):
            table.add_column(Column(np.full(len(table), label.encode("utf-8")), name=label_column,
                                    description=info.description if info else None), index=0)
    table = vstack(tables, join_type="exact", metadata_conflicts="silent") if len(tables) > 1 else tables[0]
    header = merged_header(parts[0].header, keep, cards)
    table.meta = {card.keyword: (card.value, card.comment) for card in header.cards
                  if card.keyword not in STRUCTURE and not COLUMN_KEY.match(card.keyword)}
    write_fits_table(path, table, extra)
    return file_sha256(path), os.path.getsize(path)


def write_tables(path, parts, cards: dict, labels=None, label_column: str = "TILE", keep=(),
                 extra=()) -> tuple:
    """Concatenate the tables of `parts` into `path` (atomically): by bytes when their layouts
    agree, else through astropy (a ValueError when their columns differ). The header is built
    for the merged file (`merged_header`: `keep`, `cards`); with `labels` a first string column;
    the HDUs `extra` follow the table. Returns (sha256, bytes)."""
    args = (parts, cards, labels, label_column, keep, extra)
    if same_layout(parts):
        return replace_write(path, lambda tmp: write_concat(tmp, *args))
    return replace_write(path, lambda tmp: _stack_with_astropy(tmp, *args))


class DuplicateObject(ValueError):
    """Two chi files to merge hold a dataset of the same name."""


class ChiFileError(InputError):
    """A chi file to merge is not readable HDF5 or holds a damaged object."""


def write_chi(path, sources) -> None:
    """Copy every dataset of the HDF5 files `sources` (in order) into `path` (atomically), with
    the attributes of the first; a DuplicateObject error names a repeated dataset."""
    def write(tmp):
        seen = set()
        with h5py.File(tmp, "w") as out:
            for position, source in enumerate(sources):
                if not os.path.isfile(source):
                    raise ChiFileError(f"chi file {source} " + ("is a directory, not a file"
                                       if os.path.isdir(source) else "does not exist"))
                try:
                    src = h5py.File(source, "r")
                except OSError as exc:
                    raise ChiFileError(f"chi file {source}: cannot be read as HDF5 ({exc})") from None
                with src:
                    if position == 0:
                        out.attrs.update(dict(src.attrs))
                    for name in src:
                        if name in seen:
                            raise DuplicateObject(f"{source}: object {name} is also in an earlier file")
                        seen.add(name)
                        key = name.encode("utf-8")
                        try:
                            h5py.h5o.copy(src.id, key, out.id, key)
                        except (OSError, KeyError, RuntimeError) as exc:
                            raise ChiFileError(f"chi file {source}: object {name} cannot be copied "
                                               f"(damaged file?): {exc}") from None
    replace_write(path, write)


def sha256_and_size(path) -> tuple:
    """(SHA-256, bytes) of a file, read in 16 MiB blocks: meant for a background thread, where
    few large blocks mean few waits for the GIL while the main thread copies datasets."""
    return file_sha256(path, block=1 << 24), os.path.getsize(path)
