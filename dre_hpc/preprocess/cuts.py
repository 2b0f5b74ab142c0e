"""Cut 128x128 stamps around catalogued galaxies: the work behind ``make_cuts``.

For a tile's catalogue and images (`cut_tiles` finds them and writes the files): select objects
(margin, stellarity, ``-f PARAM MIN MAX`` filters, all strict inequalities like the original),
cut data (the background-subtracted image), rms and segmentation, build each object's mask like
the original (`clean_mask`) and record integrity bits (`CutFlag`).

Placement: the cut of an object at 1-based ``X_IMAGE`` starts at 0-based pixel
``ceil(X_IMAGE - 1 - B/2)``, exactly where the original's ``Cutout2D`` put it, so that both
layouts agree with positions recomputed from the catalogue. A cut reaching beyond the image is
padded (data 0, rms 0, mask off) and flagged, never shrunk.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from astropy.io import fits
from astropy.io.fits.verify import VerifyError

from ..errors import InputError
from ..flags import CutFlag
from ..io.cuts import COMPRESSION, CutoutSet, empty_objects, object_name
from ..io.fits_check import check_fits
from .masks import MASKS, object_mask
from .weights import noise_from_weight, usable_weight, weight_scale

BOXSIZE = 128


@dataclass(frozen=True)
class CutsOptions:
    """How objects are selected and written (defaults: the original make_cuts)."""

    margin: float = 80
    max_stellarity: float = 0.5
    filters: tuple = ()                  # ((PARAM, MIN, MAX), ...)
    centroids: bool = False              # centre on XWIN_IMAGE/YWIN_IMAGE instead of X/Y_IMAGE
    layout: str = "stacked"
    compression: str = "none"
    boxsize: int = BOXSIZE
    weight_type: str = "MAP_WEIGHT"      # how a weight map gives the noise (`weights`)
    mask: str = "grown"                  # the fit mask (`masks`): grown, or the original's

    def __post_init__(self):
        if self.layout not in ("stacked", "dre"):
            raise InputError(f"layout {self.layout!r}: expected 'stacked' or 'dre'")
        if self.compression not in COMPRESSION:
            raise InputError(f"compression {self.compression!r}: expected one of {', '.join(COMPRESSION)}")
        if self.centroids and self.layout == "dre":
            raise InputError("--centroids needs the stacked layout: the DRE layout stores no positions, "
                             "so dre would centre on the catalogue's X_IMAGE/Y_IMAGE instead")
        if self.margin < 0:
            raise InputError(f"--margin {self.margin}: expected >= 0")
        if self.mask not in MASKS:
            raise InputError(f"--mask {self.mask!r}: expected one of {', '.join(MASKS)}")


@dataclass
class Selection:
    """Catalogue rows kept, and how many each criterion rejected."""

    rows: np.ndarray
    rejected: dict = field(default_factory=dict)


def select_objects(table, shapes: dict, options: CutsOptions) -> Selection:
    """Rows with ``margin < X < NAXIS1 - margin`` (same in y), ``CLASS_STAR < max_stellarity``
    and ``MIN < PARAM < MAX`` for every filter. ``shapes`` maps EXT_NUMBER to (ny, nx)."""
    n = len(table)
    ext = ext_numbers(table)
    nx = np.array([shapes[e][1] for e in ext]) if n else np.zeros(0)
    ny = np.array([shapes[e][0] for e in ext]) if n else np.zeros(0)
    x, y = np.asarray(table["X_IMAGE"], float), np.asarray(table["Y_IMAGE"], float)
    m = options.margin
    tests = {"margin": (m < x) & (x < nx - m) & (m < y) & (y < ny - m)}
    if options.max_stellarity is not None:
        _require(table, "CLASS_STAR", "--max-stellarity")
        tests["stellarity"] = np.asarray(table["CLASS_STAR"], float) < options.max_stellarity
    for param, low, high in options.filters:
        _require(table, param, f"-f {param}")
        values = np.asarray(table[param], float)
        tests[f"filter {param}"] = (float(low) < values) & (values < float(high))
    keep = np.ones(n, bool)
    rejected = {}
    for name, ok in tests.items():
        rejected[name] = int(np.count_nonzero(keep & ~ok))
        keep &= ok
    return Selection(np.flatnonzero(keep), rejected)


def _require(table, column, option):
    if column not in table.colnames:
        raise InputError(f"{option}: the catalogue has no column {column}; it has "
                         f"{', '.join(table.colnames[:40])}")


def ext_numbers(table) -> np.ndarray:
    """SExtractor's EXT_NUMBER of each catalogue row (0 when the catalogue has none)."""
    if "EXT_NUMBER" in table.colnames:
        return np.asarray(table["EXT_NUMBER"], int)
    return np.zeros(len(table), int)


def cut_start(position: np.ndarray, boxsize: int) -> np.ndarray:
    """0-based first pixel of the cut around 1-based catalogue positions (astropy Cutout2D's rule)."""
    return np.ceil(np.asarray(position, float) - 1.0 - boxsize / 2).astype(np.int64)


def cut_stack(image: np.ndarray, x0: np.ndarray, y0: np.ndarray, boxsize: int, fill=0) -> tuple:
    """Stamps ``image[y0:y0+B, x0:x0+B]`` (N, B, B), padded with ``fill``; and which were padded."""
    ny, nx = image.shape
    out = np.full((len(x0), boxsize, boxsize), fill, dtype=image.dtype.newbyteorder("="))
    padded = np.zeros(len(x0), bool)
    for i, (xs, ys) in enumerate(zip(x0, y0)):
        xa, xb, ya, yb = max(xs, 0), min(xs + boxsize, nx), max(ys, 0), min(ys + boxsize, ny)
        if xa >= xb or ya >= yb:
            padded[i] = True
            continue
        padded[i] = (xa, ya, xb, yb) != (xs, ys, xs + boxsize, ys + boxsize)
        out[i, ya - ys:yb - ys, xa - xs:xb - xs] = image[ya:yb, xa:xb]
    return out, padded


class TileImages:
    """The 2-D image planes of a tile's FITS files, by SExtractor's EXT_NUMBER (1-based; 0 = the first)."""

    def __init__(self, paths: dict):
        self.paths, self.hduls, self.planes = paths, {}, {}
        for role, path in paths.items():
            try:
                # headers and data sizes checked first: a truncated image or absurd NAXISn/BITPIX
                # is an InputError here, not a failed memory map when its pixels are cut
                check_fits(path, f"{path}: cannot be read as a FITS image")
            except InputError:
                self.close()
                raise
            try:
                self.hduls[role] = fits.open(path, memmap=True)
                self.planes[role] = [h for h in self.hduls[role]
                                     if h.is_image and h.header.get("NAXIS", 0) == 2]
            except (OSError, ValueError, TypeError, KeyError, VerifyError) as exc:
                self.close()
                raise InputError(f"{path}: cannot be read as a FITS image ({exc})") from None
            if not self.planes[role]:
                self.close()
                raise InputError(f"{path}: no 2-D image HDU")
        counts = {role: len(p) for role, p in self.planes.items()}
        if len(set(counts.values())) != 1:
            self.close()
            raise InputError(f"tile images have different numbers of image extensions: {counts}")

    def shapes(self, numbers) -> dict:
        """(ny, nx) of the image plane of each EXT_NUMBER in ``numbers``."""
        return {int(e): self.plane("image", e).shape for e in set(np.asarray(numbers).tolist())}

    def plane(self, role: str, ext_number: int) -> np.ndarray:
        planes = self.planes[role]
        k = max(int(ext_number) - 1, 0)
        if k >= len(planes):
            raise InputError(f"{self.paths[role]}: catalogue EXT_NUMBER {ext_number} but the file has "
                             f"{len(planes)} image extension(s)")
        return planes[k].data

    def close(self):
        for hdul in self.hduls.values():
            hdul.close()


def cut_objects(table, rows, images: TileImages, options: CutsOptions) -> CutoutSet:
    """Cutouts (data, mask, rms), positions and integrity flags of the selected catalogue rows."""
    b = options.boxsize
    sub = table[rows]
    objects = empty_objects(len(sub))
    objects["NUMBER"] = np.asarray(sub["NUMBER"], int)
    objects["EXT_NUMBER"] = ext_numbers(sub)
    objects["X_IMAGE"], objects["Y_IMAGE"] = np.asarray(sub["X_IMAGE"], float), np.asarray(sub["Y_IMAGE"], float)
    cx, cy = _centres(sub, options)
    objects["X0"], objects["Y0"] = cut_start(cx, b), cut_start(cy, b)
    objects["DX"] = cx - 1.0 - objects["X0"] - b // 2
    objects["DY"] = cy - 1.0 - objects["Y0"] - b // 2
    data = np.zeros((len(sub), b, b), np.float32)
    rms = np.zeros_like(data)
    mask = np.zeros((len(sub), b, b), bool)
    flags = np.zeros(len(sub), np.int64)
    for ext in np.unique(objects["EXT_NUMBER"]):
        idx = np.flatnonzero(objects["EXT_NUMBER"] == ext)
        flags[idx] = _cut_extension(images, int(ext), objects[idx], data, rms, mask, idx, b,
                                    options.weight_type, options.mask)
    objects["CUT_FLAGS"] = flags
    cuts = CutoutSet(data, mask, rms, objects, "make_cuts")
    cuts.names = [object_name(e, n) for e, n in zip(objects["EXT_NUMBER"], objects["NUMBER"])]
    return cuts


def _centres(sub, options) -> tuple:
    if not options.centroids:
        return np.asarray(sub["X_IMAGE"], float), np.asarray(sub["Y_IMAGE"], float)
    for column in ("XWIN_IMAGE", "YWIN_IMAGE"):
        _require(sub, column, "--centroids")
    return np.asarray(sub["XWIN_IMAGE"], float), np.asarray(sub["YWIN_IMAGE"], float)


def _map_cuts(images, ext, x0, y0, b, weight_type):
    """``(unusable, noise)`` from the tile's weight and flag maps (`weights`): (N, B, B) True where
    a pixel is ruled out, and the weight map's noise (NaN where it has none); None without maps."""
    unusable = noise = None
    if "weight" in images.planes:
        weight = cut_stack(images.plane("weight", ext), x0, y0, b, 1)[0].astype(np.float64)
        unusable = ~usable_weight(weight)
        scale = weight_scale(images.plane("weight", ext), images.plane("rms", ext), weight_type)
        noise = noise_from_weight(weight, weight_type, scale)
    if "flags" in images.planes:
        flagged = cut_stack(images.plane("flags", ext), x0, y0, b, 0)[0] != 0
        unusable = flagged if unusable is None else unusable | flagged
    return unusable, noise


def _cut_extension(images, ext, objects, data, rms, mask, idx, b, weight_type, mask_kind) -> np.ndarray:
    x0, y0 = objects["X0"], objects["Y0"]
    nb, padded = cut_stack(images.plane("nb", ext), x0, y0, b)
    noise, _ = cut_stack(images.plane("rms", ext), x0, y0, b)
    seg, _ = cut_stack(images.plane("seg", ext), x0, y0, b, -1)
    raw = images.plane("image", ext)
    raw_cuts = cut_stack(raw, x0, y0, b)[0] if raw.dtype.kind == "f" else None
    unusable, map_noise = _map_cuts(images, ext, x0, y0, b, weight_type)
    if map_noise is not None:                # the weight map's noise where it has one (`weights`)
        noise = np.where(np.isfinite(map_noise), map_noise, noise).astype(noise.dtype)
    flags = np.where(padded, int(CutFlag.PADDED), 0)
    for k, i in enumerate(idx):
        in_image = seg[k] >= 0                       # padding of the segmentation map is -1
        finite = np.isfinite(nb[k]) & np.isfinite(noise[k])
        if raw_cuts is not None:
            finite &= np.isfinite(raw_cuts[k])
        own = seg[k] == objects["NUMBER"][k]
        m = object_mask(seg[k], objects["NUMBER"][k], mask_kind) & in_image
        if unusable is not None:
            m &= ~unusable[k]
        flags[k] |= int(CutFlag.NONFINITE) * bool((~finite & in_image).any())
        flags[k] |= int(CutFlag.ALL_ZERO) * bool(not np.any(nb[k][in_image]))
        flags[k] |= int(CutFlag.BAD_RMS) * bool((m & ~(noise[k] > 0) & np.isfinite(noise[k])).any())
        flags[k] |= int(CutFlag.NO_SEGMENT) * bool(not own.any())
        data[i], rms[i], mask[i] = nb[k], noise[k], m
    return flags
