"""Write the fit outputs: ``Summary/<img>_dre.fits``, ``Chi/<img>_chi.h5`` and mosaics.

Every file is written under a temporary name and renamed, so a reader never sees half a file.
"""

from __future__ import annotations

import logging
from pathlib import Path

import h5py
import numpy as np
from astropy.io import fits
from astropy.table import Table, join, unique

from ..errors import DreError
from .columns import COLUMNS, describe, write_fits_table
from .cuts import COMPRESSION

log = logging.getLogger(__name__)

#: The original DRE columns, in its order, then ours.
ORIGINAL_COLUMNS = ["ROW", "MODEL_IDX", "CHI", "CHI_STD", "LOGR_CHI", "LOGR_VAR", "LOGR_CHI_VAR",
                    "LOGR_PARAB", "LOGR_STD", "INDEX", "LOGR", "AX_RATIO", "ANGLE", "EXT_NUMBER", "NUMBER"]
EXTRA_COLUMNS = ["FLUX", "FLUX_ERR", "MAG", "MAG_ERR", "CHI2", "DOF", "NPIX",
                 "INDEX_MEAN", "INDEX_ERR", "AX_RATIO_MEAN", "AX_RATIO_ERR", "ANGLE_MEAN", "ANGLE_ERR",
                 "LOGR_MEAN", "LOGR_ERR", "INDEX_FIT", "INDEX_FIT_ERR", "AX_RATIO_FIT", "AX_RATIO_FIT_ERR",
                 "ANGLE_FIT", "ANGLE_FIT_ERR", "LOGR_FIT", "LOGR_FIT_ERR", "FLUX_FIT", "FLUX_FIT_ERR",
                 "X_IMAGE", "Y_IMAGE", "DX", "DY", "FLAGS"]
#: Prefix given to catalogue columns whose names clash with ours (e.g. SExtractor's FLAGS).
CATALOG_PREFIX = "SEX_"


def magnitudes(flux, flux_err, zero_point):
    """MAG and MAG_ERR for positive fluxes; NaN elsewhere or without a zero-point."""
    flux = np.asarray(flux, dtype=float)
    if zero_point is None:
        nan = np.full(flux.shape, np.nan)
        return nan, nan.copy()
    with np.errstate(divide="ignore", invalid="ignore"):
        positive = flux > 0
        mag = np.where(positive, zero_point - 2.5 * np.log10(np.where(positive, flux, 1)), np.nan)
        err = np.where(positive, 2.5 / np.log(10) * flux_err / np.where(positive, flux, 1), np.nan)
    return mag, err


def summary_table(results: dict, objects, zero_point=None, catalog: Table | None = None,
                  meta: dict | None = None) -> Table:
    """The per-object table: original columns, ours, then catalogue columns joined on the object id.

    Our columns get their units and descriptions (`columns.describe`; fluxes in the unit of the
    image's BUNIT, which `read_catalog` finds in the catalogue, else ADU); the catalogue's keep theirs."""
    cols = dict(results)
    cols.pop("SURFACE", None)
    n = len(objects)
    cols["ROW"] = np.arange(n)
    for name in ("EXT_NUMBER", "NUMBER", "X_IMAGE", "Y_IMAGE", "DX", "DY"):
        cols[name] = np.asarray(objects[name])
    cols["MAG"], cols["MAG_ERR"] = magnitudes(cols["FLUX"], cols["FLUX_ERR"], zero_point)
    order = ORIGINAL_COLUMNS + EXTRA_COLUMNS
    table = Table([cols[c] for c in order], names=order)
    describe(table, bunit=catalog.meta.get("BUNIT") if catalog is not None else None)
    for key, value in (meta or {}).items():
        table.meta[key] = value
    if catalog is not None and (len(catalog) or not len(table)):    # an empty tile: columns, no rows
        table = _join_catalog(table, catalog)
    return table


def _join_catalog(table: Table, catalog: Table) -> Table:
    catalog = catalog.copy(copy_data=False)
    catalog.meta.clear()                  # the summary's header cards are ours
    for name in [c for c in catalog.colnames if c.startswith("VIGNET")]:
        catalog.remove_column(name)
    keys = ["NUMBER"] + (["EXT_NUMBER"] if "EXT_NUMBER" in catalog.colnames else [])
    for name in list(catalog.colnames):
        if name in table.colnames and name not in keys:
            catalog.rename_column(name, CATALOG_PREFIX + name)
    if "EXT_NUMBER" not in keys:
        catalog = catalog.copy()
    if len(catalog) and len(unique(catalog, keys=keys)) < len(catalog):
        # e.g. a multi-extension catalogue without EXT_NUMBER: a left join would repeat summary
        # rows, so the first catalogue row of each id is kept (one summary row per cut)
        log.warning("catalogue has repeated %s values: joining the first row of each", "/".join(keys))
        catalog = unique(catalog, keys=keys, keep="first")
    if len(table) == 0:           # astropy's join refuses empty tables: add the columns, empty
        for name in catalog.colnames:
            if name not in keys:
                table[name] = catalog[name][:0]
        return table
    for key in keys:                      # the join keys are ours: our unit and description
        catalog[key].unit, catalog[key].info.description = table[key].unit, table[key].info.description
    joined = join(table, catalog, keys=keys, join_type="left")
    joined.sort("ROW")
    return joined


class _writing:
    """Turn an OSError while writing ``path`` (a file where a directory is needed, no permission, a
    full disk) into a one-line `DreError` naming the file."""

    def __init__(self, path, what):
        self.path, self.what = Path(path), what

    def __enter__(self):
        return self.path

    def __exit__(self, kind, exc, tb):
        if kind is not None and issubclass(kind, OSError):
            raise DreError(f"cannot write {self.what} {self.path}: {exc}") from None
        return False


def write_summary(path, table: Table) -> None:
    """The summary table in HDU 1, with its columns' units (TUNITn) and descriptions (TCOMMn); our
    columns that lost their description on the way (a caller replaced ``ROW``) get it back."""
    for name in ORIGINAL_COLUMNS + EXTRA_COLUMNS:
        if name in table.colnames and not table[name].info.description:
            table[name].info.description = COLUMNS[name].description
    with _writing(path, "summary") as path:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        write_fits_table(tmp, table)
        tmp.replace(path)


#: Uncompressed surfaces up to this size are stored in the dataset's header (HDF5's compact
#: layout, read like any other dataset): 10,000 of the default grid's written in 0.6 s, not 1.0.
COMPACT_BYTES = 60_000


def write_chi(path, names, surfaces, grid, statistic: str, compression: str = "medium") -> None:
    """One float32 dataset per object, shape (NINDEX, NAXRAT, NPOSANG, NLOGH), named like its cut."""
    opts = COMPRESSION[compression]
    with _writing(path, "chi-square file") as path:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with h5py.File(tmp, "w") as h5:
            h5.attrs["statistic"] = statistic
            for key, value, _ in grid.to_header_cards():
                h5.attrs[key] = value
            like = None
            surfaces = np.ascontiguousarray(surfaces, dtype=np.float32)     # rows without copies
            for name, surface in zip(names, surfaces):
                data = np.ascontiguousarray(surface.reshape(grid.shape), dtype=np.float32)
                if like is None and not opts and data.nbytes <= COMPACT_BYTES:
                    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
                    dcpl.set_layout(h5py.h5d.COMPACT)
                    dcpl.set_obj_track_times(False)       # no timestamps: the same bytes every run
                    like = (h5py.h5t.py_create(data.dtype), h5py.h5s.create_simple(data.shape), dcpl)
                elif like is None:
                    first = h5.create_dataset(name, data=data, **opts).id
                    like = (first.get_type(), first.get_space(), first.get_create_plist())
                    continue
                # one type, space and creation properties for all, through the low-level API: half
                # the time of create_dataset for 10,000 objects
                dataset = h5py.h5d.create(h5.id, name.encode(), like[0], like[1], dcpl=like[2])
                dataset.write(h5py.h5s.ALL, h5py.h5s.ALL, data)
        tmp.replace(path)


def mosaic_panels(data, mask, model, flux) -> np.ndarray:
    """Data, mask (scaled to the data), scaled model and residual side by side: (B, 4B), data orientation."""
    scaled = flux * model
    level = np.nanmax(np.abs(data)) if np.isfinite(data).any() else 1.0
    return np.hstack([data, mask.astype(np.float32) * level, scaled, data - scaled]).astype(np.float32)


def write_mosaic(path, panels, header_cards=(), png=False) -> None:
    header = fits.Header()
    for key, value in header_cards:
        header[key] = value
    header["PANELS"] = ("DATA,MASK,MODEL,RESID", "left to right")
    with _writing(path, "mosaic") as path:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        fits.PrimaryHDU(panels, header=header).writeto(tmp, overwrite=True)
        tmp.replace(path)
        if png:
            _write_png(path.with_suffix(".png"), panels)


def _write_png(path, panels):
    try:
        import matplotlib
    except ImportError:
        raise DreError("mosaic PNGs need matplotlib: pip install 'dre_hpc[plots]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    b = panels.shape[0]
    fig, axes = plt.subplots(1, 4, figsize=(12, 3.3))
    vmax = np.nanpercentile(np.abs(panels[:, :b]), 99.5) or 1.0
    for k, (ax, title) in enumerate(zip(axes, ("data", "mask", "model", "residual"))):
        ax.imshow(panels[:, k * b:(k + 1) * b], origin="lower", cmap="gray", vmin=-vmax, vmax=vmax)
        ax.set_title(title)
        ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
