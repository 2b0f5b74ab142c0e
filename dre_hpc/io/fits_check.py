"""Checking a FITS file's structure by hand before astropy reads it.

astropy trusts a header: a truncated file, ``NAXIS1 = 3000000000``, a negative size, an odd
``BITPIX`` or a ``TFIELDS`` in the billions make it warn and then fail deep inside (KeyError,
reshape errors), allocate terabytes or loop for minutes. `check_fits` walks the headers (80-byte
cards, 2880-byte blocks) and, for every HDU, checks the mandatory keywords and that the data the
header describes lie inside the file, before anything is allocated. Problems become the caller's
`InputError` subclass with the file name and what was expected.

Compressed files (gzip, bzip2) are checked through a decompressing stream: seeking past the end of
the data stops at the real end, which is how a truncated or oversized HDU is seen.
"""

from __future__ import annotations

import bz2
import gzip
import os
from dataclasses import dataclass

from ..errors import InputError

BLOCK = 2880
CARD = 80
#: Most bytes of header kept for one HDU (100,000 cards); more is not a header but garbage.
MAX_HEADER_BYTES = 8_000_000
#: Accepted BITPIX values (FITS standard).
BITPIX_VALUES = (8, 16, 32, 64, -32, -64)
#: Largest NAXIS and TFIELDS the standard allows.
MAX_AXES = 999


def card_value(card: bytes) -> bytes:
    """The value field of a ``KEY     = value / comment`` card (quotes kept)."""
    text = card[10:].strip()
    if text.startswith(b"'"):           # a string: up to the closing quote ('' is a quote)
        i = 1
        while i < len(text):
            if text[i:i + 1] == b"'":
                if text[i + 1:i + 2] != b"'":
                    return text[:i + 1]
                i += 1
            i += 1
        return text
    return text.split(b"/")[0].strip()


def header_cards(raw: bytes) -> dict:
    """``{keyword: 80-byte card}`` of a raw header (the first card of a keyword wins)."""
    cards = {}
    for i in range(0, len(raw), CARD):
        cards.setdefault(raw[i:i + 8].decode("ascii", "replace").strip(), raw[i:i + CARD])
    return cards


def card_int(cards: dict, key: str, where: str, error=InputError, default=None,
             minimum: int | None = 0) -> int:
    """Integer value of keyword `key` (`default` when absent and a default is given), or `error`
    naming `where` and the keyword when it is missing, not an integer or below `minimum`."""
    if key not in cards:
        if default is None:
            raise error(f"{where}: header keyword {key} is missing")
        return default
    text = card_value(cards[key])
    try:
        value = int(text)
    except ValueError:
        shown = text.decode("ascii", "replace")
        raise error(f"{where}: header keyword {key} = {shown!r} is not an integer") from None
    if minimum is not None and value < minimum:
        raise error(f"{where}: header keyword {key} = {value} is negative or too small "
                    f"(expected >= {minimum})")
    return value


def read_header(handle, where: str, error=InputError) -> bytes:
    """The raw header blocks at the handle's position, up to the block with the END card."""
    blocks, size = [], 0
    while True:
        block = handle.read(BLOCK)
        if len(block) < BLOCK:
            raise error(f"{where}: truncated FITS header (the file ends before its END card)")
        blocks.append(block)
        size += BLOCK
        if any(block[i:i + 8] == b"END     " for i in range(0, BLOCK, CARD)):
            return b"".join(blocks)
        if size > MAX_HEADER_BYTES:
            raise error(f"{where}: no END card in the first {MAX_HEADER_BYTES} bytes of a header")


def data_bytes(cards: dict, where: str, error=InputError) -> int:
    """Size of an HDU's data (without padding) from its header cards, every keyword checked."""
    bitpix = card_int(cards, "BITPIX", where, error, minimum=None)
    if bitpix not in BITPIX_VALUES:
        raise error(f"{where}: BITPIX = {bitpix} is not one of {', '.join(map(str, BITPIX_VALUES))}")
    naxis = card_int(cards, "NAXIS", where, error)
    if naxis > MAX_AXES:
        raise error(f"{where}: NAXIS = {naxis} is above the FITS limit of {MAX_AXES}")
    if naxis == 0:
        return 0
    sizes = [card_int(cards, f"NAXIS{n}", where, error) for n in range(1, naxis + 1)]
    groups = card_value(cards.get("GROUPS", b" " * CARD)) == b"T" and sizes[0] == 0
    size = 1
    for n in sizes[1:] if groups else sizes:
        size *= n
    pcount = card_int(cards, "PCOUNT", where, error, default=0)
    gcount = card_int(cards, "GCOUNT", where, error, default=1)
    return abs(bitpix) // 8 * gcount * (pcount + size)


@dataclass
class HduLayout:
    """Where one HDU lies in the file: header start, data start and data size (bytes)."""

    header_offset: int
    data_offset: int
    data_size: int
    cards: dict


def open_binary(path, where, error):
    """`path` opened for reading bytes, or `error` saying why not (missing, a directory, ...)."""
    try:
        return open(path, "rb")
    except IsADirectoryError:
        raise error(f"{where}: it is a directory, not a FITS file") from None
    except FileNotFoundError:
        raise error(f"{where}: the file does not exist") from None
    except OSError as exc:
        raise error(f"{where}: cannot be opened ({exc.strerror or exc})") from None


def _open(path, where, error):
    handle = open_binary(path, where, error)
    magic = handle.read(3)
    handle.seek(0)
    if magic[:2] == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=handle, mode="rb"), None, handle
    if magic == b"BZh":
        return bz2.BZ2File(handle, mode="rb"), None, handle
    return handle, os.fstat(handle.fileno()).st_size, handle


def _skip(stream, size: int, total, what: str, where: str, error) -> None:
    """Move `size` bytes forward; `error` when the file ends first."""
    start = stream.tell()
    target = start + size
    if total is not None:
        if target > total:
            raise error(f"{where}: {what} claims {size} bytes of data but the file has only "
                        f"{max(total - start, 0)} after its header (truncated, or absurd sizes "
                        f"in the header)")
        stream.seek(target)
        return
    try:
        stream.seek(target)
    except (OSError, EOFError, ValueError) as exc:
        raise error(f"{where}: cannot read the data of {what}: {exc}") from None
    if stream.tell() < target:
        raise error(f"{where}: {what} claims {size} bytes of data but the file has only "
                    f"{stream.tell() - start} after its header (truncated, or absurd sizes "
                    f"in the header)")


def check_fits(path, where: str | None = None, error=InputError) -> list:
    """Check the structure of the FITS file at `path` and return its `HduLayout` list.

    Every header must end with an END card; BITPIX, NAXIS, NAXISn, PCOUNT, GCOUNT must be
    integers in range; table extensions need TFIELDS (0..999) and every TFORMn; and the data each
    header describes must lie inside the file (the final padding may be missing). Bytes after the
    last HDU that do not start an extension are ignored (as astropy does). `error` (an
    `InputError` subclass) is raised with ``"{where}: what is wrong"``; `where` (default
    ``"FITS file {path}"``) must name the file.
    """
    where = where or f"FITS file {path}"
    stream, total, handle = _open(path, where, error)
    hdus = []
    try:
        try:
            first = stream.read(CARD)
            if not first.startswith(b"SIMPLE  =") or card_value(first) != b"T":
                raise error(f"{where}: not a FITS file (it does not start with SIMPLE = T)")
            stream.seek(0)
            while True:
                start = stream.tell()
                name = "the primary HDU" if not hdus else f"HDU {len(hdus)}"
                cards = header_cards(read_header(stream, f"{where}, {name}", error))
                size = data_bytes(cards, f"{where}, {name}", error)
                if hdus:
                    check_table(cards, f"{where}, {name}", error)
                data_offset = stream.tell()
                padded = -(-size // BLOCK) * BLOCK
                if total is not None and data_offset + padded > total:
                    _skip(stream, size, total, name, where, error)    # the padding may be missing
                    hdus.append(HduLayout(start, data_offset, size, cards))
                    break
                _skip(stream, padded if total is not None else size, total, name, where, error)
                hdus.append(HduLayout(start, data_offset, size, cards))
                if total is None:       # a stream: skip the padding, which may be missing at the end
                    stream.read(padded - size)
                peek = stream.read(8)
                if peek != b"XTENSION":
                    break
                stream.seek(stream.tell() - 8)
        except (OSError, EOFError, ValueError) as exc:   # a damaged gzip/bzip2 stream
            if isinstance(exc, InputError):
                raise
            raise error(f"{where}: cannot be read ({exc})") from None
    finally:
        stream.close()
        handle.close()
    return hdus


def check_table(cards: dict, where: str, error=InputError) -> None:
    """TFIELDS (0..999) and every TFORMn of a table extension header; `error` otherwise."""
    xtension = card_value(cards.get("XTENSION", b" " * CARD)).strip(b"' ").upper()
    if xtension not in (b"BINTABLE", b"TABLE", b"A3DTABLE"):
        return
    tfields = card_int(cards, "TFIELDS", where, error)
    if tfields > MAX_AXES:
        raise error(f"{where}: TFIELDS = {tfields} is above the FITS limit of {MAX_AXES}")
    missing = [f"TFORM{n}" for n in range(1, tfields + 1) if f"TFORM{n}" not in cards]
    if missing:
        raise error(f"{where}: TFIELDS = {tfields} but keyword(s) {', '.join(missing[:5])} "
                    f"are missing")
