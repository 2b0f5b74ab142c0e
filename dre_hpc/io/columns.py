"""Units and one-line descriptions of the catalogue columns dre_hpc writes: one table, every writer.

`COLUMNS` maps a column name to its `ColumnInfo` (unit, description). Writers put the unit into
``TUNITn`` (a FITS-standard string that astropy parses) and the description into ``TCOMMn`` (the
column-comment keyword TOPCAT and other STIL/HEASARC tools show); `write_fits_table` does both.

Rules:

- **Logarithms** (``LOGR`` and its kin: log10 of a radius in pixels) have no unit: FITS writes
  such a unit ``log(pix)``, which astropy does not parse; the description says "log10 pix".
- **Fluxes** are in the image's unit: ``BUNIT`` of the image header (which SExtractor copies into
  the catalogue's ``LDAC_IMHEAD``) when it names a FITS unit (``ADU`` read as ``adu``), else
  ``adu`` when the image has no BUNIT. A BUNIT that FITS cannot express (``e-/s``) gives no unit
  and the description names it: no unit is better than a wrong one.
- **Other columns** (those a catalogue brings, e.g. SExtractor's ``FLUX_AUTO``) keep the unit and
  description their own file gave them (`read_units`), or none: never a guessed one.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from astropy import units as u
from astropy.io import fits
from astropy.table import Table

DEFAULT_FLUX_UNIT = "adu"
MAX_DESCRIPTION = 68          # a TCOMMn string that fits one card


@dataclass(frozen=True)
class ColumnInfo:
    """A column's FITS unit (None: dimensionless, a count, an index or a logarithm) and what it holds."""

    unit: str | None
    description: str


FLUX = "flux"                 # marks the columns in the image's flux unit
_LOG_PIX = "log10 pix"

#: Every column dre_hpc writes into a catalogue: name -> (unit, description).
COLUMNS = {name: ColumnInfo(unit, text) for name, (unit, text) in {
    # the original DRE's columns (computed on the statistic's surface)
    "ROW": (None, "index of the object in its tile's cuts file (0-based)"),
    "MODEL_IDX": (None, "grid indices (n, b/a, angle, log r) of the best model; -1: none"),
    "CHI": (None, "statistic of the best model (wls: chi2/dof; dre: original chi)"),
    "CHI_STD": (None, "standard deviation of the statistic over all models"),
    "LOGR_CHI": (None, f"1/statistic-weighted mean radius, {_LOG_PIX}"),
    "LOGR_VAR": (None, "log10 of the 1/statistic-weighted radius variance about LOGR, pix2"),
    "LOGR_CHI_VAR": (None, "log10 of the 1/statistic-weighted radius variance, pix2"),
    "LOGR_PARAB": (None, f"radius at the vertex of a parabola through ln(statistic), {_LOG_PIX}"),
    "LOGR_STD": (None, "width 1/sqrt(2a) of that parabola, dex"),
    "INDEX": (None, "Sersic index of the best model"),
    "LOGR": (None, f"half-light radius (major axis) of the best model, {_LOG_PIX}"),
    "AX_RATIO": (None, "axis ratio b/a of the best model"),
    "ANGLE": ("deg", "position angle of the best model, from +x towards +y"),
    "EXT_NUMBER": (None, "image extension of the object (SExtractor's, 1-based)"),
    "NUMBER": (None, "SExtractor object number"),
    # ours
    "FLUX": (FLUX, "total flux of the model at the chi-square minimum"),
    "FLUX_ERR": (FLUX, "error of FLUX, shape uncertainty included"),
    "MAG": ("mag", "ZP - 2.5 log10 FLUX (with a zero-point, else NaN)"),
    "MAG_ERR": ("mag", "error of MAG"),
    "CHI2": (None, "chi-square of the best model"),
    "DOF": (None, "degrees of freedom: usable pixels - free parameters"),
    "NPIX": (None, "usable pixels in the object's mask"),
    "INDEX_MEAN": (None, "posterior mean of the Sersic index over the grid"),
    "INDEX_ERR": (None, "posterior standard deviation of the Sersic index"),
    "AX_RATIO_MEAN": (None, "posterior mean of b/a over the grid"),
    "AX_RATIO_ERR": (None, "posterior standard deviation of b/a"),
    "ANGLE_MEAN": ("deg", "posterior circular mean of the angle (period 180 deg)"),
    "ANGLE_ERR": ("deg", "posterior circular standard deviation of the angle"),
    "LOGR_MEAN": (None, f"posterior mean of the radius, {_LOG_PIX}"),
    "LOGR_ERR": (None, "posterior standard deviation of log10 radius, dex"),
    # sub-grid refinement (fit.subgrid): NaN with --statistic dre
    "INDEX_FIT": (None, "Sersic index at the vertex of the local chi2 quadratic"),
    "INDEX_FIT_ERR": (None, "error of INDEX_FIT (delta chi2 = 1)"),
    "AX_RATIO_FIT": (None, "b/a at the vertex of the local chi2 quadratic"),
    "AX_RATIO_FIT_ERR": (None, "error of AX_RATIO_FIT (delta chi2 = 1)"),
    "ANGLE_FIT": ("deg", "position angle at the vertex of the local chi2 quadratic"),
    "ANGLE_FIT_ERR": ("deg", "error of ANGLE_FIT (delta chi2 = 1)"),
    "LOGR_FIT": (None, f"radius at the vertex of the local chi2 quadratic, {_LOG_PIX}"),
    "LOGR_FIT_ERR": (None, "error of LOGR_FIT (delta chi2 = 1), dex"),
    "FLUX_FIT": (FLUX, "total flux at the vertex of the local chi2 quadratic"),
    "FLUX_FIT_ERR": (FLUX, "error of FLUX_FIT, shape uncertainty included"),
    "X_IMAGE": ("pix", "object position along x (1-based FITS pixels)"),
    "Y_IMAGE": ("pix", "object position along y (1-based FITS pixels)"),
    "DX": ("pix", "x offset of the centre used from the cut's centre pixel"),
    "DY": ("pix", "y offset of the centre used from the cut's centre pixel"),
    "FLAGS": (None, "dre_hpc fit flags (bit mask; see the README)"),
    # collated catalogues, and the TILES extension of the flat one
    "TILE": (None, "tile (image) the object was found on"),
    "ROWS": (None, "rows (objects) of the tile in this file"),
    "NMERGED": (None, "chunks of the tile merged into this file"),
    "NMISSING": (None, "chunks of the tile not done, left out (collate --allow-missing)"),
    "PREPDIG": (None, "digest of the prep products the tile's chunks were fitted on"),
    "DRE_VER": (None, "dre_hpc version(s) that fitted the tile's chunks"),
    "PSF": (None, "PSF file of the tile (its last 60 characters)"),
    # dre-sim truth tables
    "ID": (None, "object id (galaxies first)"),
    "KIND": (None, "galaxy or star"),
    "X": ("pix", "true position along x (1-based FITS pixels)"),
    "Y": ("pix", "true position along y (1-based FITS pixels)"),
    "SNR": (None, "optimal S/N against the sky noise"),
}.items()}

#: Truth-table columns whose meaning differs from the fit's column of the same name.
TRUTH_INFO = {
    "INDEX": ColumnInfo(None, "true Sersic index (NaN for stars)"),
    "AX_RATIO": ColumnInfo(None, "true axis ratio b/a (NaN for stars)"),
    "ANGLE": ColumnInfo("deg", "true position angle, from +x towards +y"),
    "LOGR": ColumnInfo(None, f"true half-light radius (major axis), {_LOG_PIX}"),
    "FLUX": ColumnInfo(FLUX, "true total flux"),
    "MAG": ColumnInfo("mag", "MAGZERO - 2.5 log10 FLUX"),
}


def fits_unit(text) -> str | None:
    """`text` as a FITS unit string astropy parses (``pixel`` -> ``pix``, ``ADU`` -> ``adu``), or
    None when it is empty or no FITS unit (``e-/s``, ``log(pix)``)."""
    text = str(text or "").strip()
    if not text:
        return None
    for candidate in (text, text.lower()):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                unit = u.Unit(candidate, format="fits")
                return unit.to_string(format="fits") or None
        except (ValueError, TypeError):
            continue
    return None


def flux_unit(bunit=None) -> tuple:
    """``(unit, note)`` of the flux columns for an image whose header says BUNIT = `bunit`
    (None: no BUNIT, so ADU); `note` is added to their descriptions when the unit is not FITS."""
    if bunit is None or not str(bunit).strip():
        return DEFAULT_FLUX_UNIT, ""
    unit = fits_unit(bunit)
    return (unit, "") if unit else (None, f", in BUNIT {str(bunit).strip()}")


def describe(table: Table, bunit=None, overrides: dict | None = None) -> Table:
    """Set the unit and description of every column of `table` that `COLUMNS` (updated with
    `overrides`) knows, the flux columns in `flux_unit(bunit)`; other columns are left as they
    are. Returns `table`."""
    table_of = {**COLUMNS, **(overrides or {})}
    unit_of_flux, note = flux_unit(bunit)
    for name in table.colnames:
        info = table_of.get(name)
        if info is None:
            continue
        column = table[name]
        column.unit = unit_of_flux if info.unit == FLUX else info.unit
        column.info.description = (info.description + note) if info.unit == FLUX else info.description
    return table


def read_units(table: Table, header: fits.Header) -> Table:
    """Give `table` (read from a FITS table HDU with this `header`) the units of its ``TUNITn``
    (as FITS units; unparsable ones dropped) and the descriptions of its ``TCOMMn``, else of the
    comments of its ``TTYPEn`` (SExtractor's habit). Returns `table`."""
    for i in range(1, int(header.get("TFIELDS", 0)) + 1):
        name = header.get(f"TTYPE{i}")
        if name not in table.colnames:
            continue
        table[name].unit = fits_unit(header.get(f"TUNIT{i}"))
        text = header.get(f"TCOMM{i}") or header.comments[f"TTYPE{i}"]
        table[name].info.description = str(text).strip() or None
    return table


def table_hdu(table: Table) -> fits.BinTableHDU:
    """`table` as a binary table HDU: ``TUNITn`` from the columns' units, ``TCOMMn`` from their
    descriptions (ASCII, cut to one card), ``table.meta`` as header cards."""
    plain = Table(table, copy=False)          # new column objects: `table` keeps its descriptions
    descriptions = []
    for column in plain.itercols():
        descriptions.append(column.info.description)
        column.info.description = None     # astropy would add a YAML block of column metadata
        if column.unit is not None and fits_unit(column.unit) is None:
            column.unit = None             # a unit FITS cannot write is left out, not written wrong
    hdu = fits.table_to_hdu(plain)
    at = 1 + max(i for i, key in enumerate(hdu.header) if key.startswith("TTYPE"))
    for i, text in enumerate(descriptions, start=1):
        if text:          # after the column cards (astropy writes those as one block), before the meta
            hdu.header.insert(at, (f"TCOMM{i}", str(text).encode("ascii", "replace").decode("ascii")
                                   [:MAX_DESCRIPTION]))
            at += 1
    return hdu


def write_fits_table(path, table: Table, extra=()) -> None:
    """Write `table` (`table_hdu`) after an empty primary HDU, then the HDUs `extra`, to `path`."""
    fits.HDUList([fits.PrimaryHDU(), table_hdu(table), *extra]).writeto(path, overwrite=True)
