"""SExtractor catalogues (FITS_LDAC or plain FITS tables) and the positions they give the cutouts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.io.fits.verify import VerifyError
from astropy.table import Table, TableMergeError, vstack

from ..errors import InputError
from .columns import read_units
from .fits_check import check_fits


def find_catalog(catalogs_dir, name) -> Path | None:
    """``<dir>/<name>/<name>_cat.fits`` (``--subdir`` layout) or ``<dir>/<name>_cat.fits``; None if absent."""
    if catalogs_dir is None:
        return None
    for candidate in (Path(catalogs_dir) / name / f"{name}_cat.fits", Path(catalogs_dir) / f"{name}_cat.fits"):
        if candidate.is_file():
            return candidate
    return None


def read_catalog(path) -> Table:
    """The object table of a catalogue: HDU ``LDAC_OBJECTS`` (FITS_LDAC) or the first table HDU.

    A FITS_LDAC catalogue of a multi-extension image has one ``LDAC_OBJECTS`` HDU per image
    extension: they are stacked in file order. Columns keep the file's units and descriptions
    (`columns.read_units`); ``meta["BUNIT"]`` is the image's BUNIT when the catalogue's copy of
    the image header (``LDAC_IMHEAD``) has one.
    """
    if not Path(path).is_file():
        raise InputError(f"catalogue {path} does not exist" if not Path(path).exists()
                         else f"catalogue {path} is not a file")
    # headers and data sizes checked against the file before astropy reads anything
    check_fits(path, f"catalogue {path}: cannot be read as FITS")
    try:
        with fits.open(path, memmap=False) as hdul:
            hdus = [h for h in hdul if h.name == "LDAC_OBJECTS"]
            if not hdus:
                hdus = [h for h in hdul if isinstance(h, (fits.BinTableHDU, fits.TableHDU))][:1]
            if not hdus:
                raise InputError(f"catalogue {path}: no LDAC_OBJECTS or table HDU")
            tables = [read_units(Table(h.data), h.header) for h in hdus]
            table = tables[0] if len(tables) == 1 else vstack(tables, join_type="exact",
                                                              metadata_conflicts="silent")
            bunit = _image_bunit(hdul)
    except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError, VerifyError,
            TableMergeError) as exc:
        raise InputError(f"catalogue {path}: cannot be read as FITS ({exc})") from None
    if "NUMBER" not in table.colnames:
        raise InputError(f"catalogue {path}: no NUMBER column; a SExtractor catalogue is expected")
    if bunit is not None:
        table.meta["BUNIT"] = bunit
    return table


def _image_bunit(hdul) -> str | None:
    """BUNIT of the image header that SExtractor stores in the first ``LDAC_IMHEAD`` HDU, or None."""
    for hdu in hdul:
        if hdu.name == "LDAC_IMHEAD" and hdu.data is not None and len(hdu.data):
            cards = (c.decode("ascii", "replace") if isinstance(c, bytes) else str(c)
                     for c in np.ravel(hdu.data[0][0]))
            text = "".join(c.ljust(80) for c in cards)        # astropy strips trailing blanks
            for i in range(0, len(text), 80):
                if text.startswith("BUNIT   =", i):
                    value = fits.Card.fromstring(text[i:i + 80]).value
                    return str(value).strip() or None
            return None
    return None


def offsets_from_catalog(objects, table, boxsize=128) -> int:
    """Fill the unknown DX/DY (and X_IMAGE/Y_IMAGE) of cutouts from catalogue positions.

    Only rows whose DX or DY is NaN (the DRE layout stores no positions) are filled; offsets
    that the cuts file holds are kept.

    The original make_cuts cut with astropy ``Cutout2D`` at the 0-based position X_IMAGE - 1, whose
    first pixel is ``ceil(p - B/2)``: the object sits at ``p - ceil(p - B/2)`` in the cut, in (63, 64]
    for B = 128. Returns the number of objects matched.
    """
    if not {"X_IMAGE", "Y_IMAGE"} <= set(table.colnames):
        return 0
    has_ext = "EXT_NUMBER" in table.colnames
    lookup = {}
    for i, number in enumerate(np.asarray(table["NUMBER"])):
        ext = int(table["EXT_NUMBER"][i]) if has_ext else 0
        lookup.setdefault((ext, int(number)), i)      # the first row of a repeated id, like the join
    matched = 0
    for row in objects:
        if np.isfinite(row["DX"]) and np.isfinite(row["DY"]):
            continue                     # a position the cuts file knows is kept (stacked layout)
        key = (int(row["EXT_NUMBER"]), int(row["NUMBER"]))
        i = lookup.get(key, lookup.get((0, key[1])) if not has_ext else None)
        if i is None:
            continue
        x, y = float(table["X_IMAGE"][i]), float(table["Y_IMAGE"][i])
        row["X_IMAGE"], row["Y_IMAGE"] = x, y
        for coord, field in ((x, "DX"), (y, "DY")):
            p = coord - 1.0
            row[field] = p - np.ceil(p - boxsize / 2) - boxsize // 2
        matched += 1
    return matched
