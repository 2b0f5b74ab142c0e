"""Cutout files: the original DRE layout (one HDF5 group per object) and our stacked layout.

**DRE layout**: one group per object named ``f"{EXT_NUMBER:02d}_{NUMBER:04d}"`` with datasets
``obj`` (float32), ``seg`` (bool mask) and ``rms`` (float32), each 128x128. No positions.

**Stacked layout** (``attrs['layout'] == 'dre_hpc-stacked'``), built for fast chunked reads:
datasets ``data`` (N, B, B) float32, ``mask`` (N, B, B) bool, ``rms`` (N, B, B) float32, and the
table ``objects`` (N,) with fields ``NUMBER``, ``EXT_NUMBER``, ``X_IMAGE``, ``Y_IMAGE`` (catalogue
position, FITS 1-based), ``X0``, ``Y0`` (0-based image pixel of cut pixel [0, 0]), ``DX``, ``DY``
(object centre minus the model centre ``[B//2, B//2]`` in cut pixels; NaN when unknown),
``CUT_FLAGS`` (integrity bits from make_cuts) and ``BACK_ERR`` (the uncertainty of the cut's
background level in units of its pixels' noise, where make_cuts knows it better than the fit's
default: ``--neighbours``; NaN otherwise, and in files written before the field existed).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from ..errors import CutsFormatError, InputError

STACKED_LAYOUT = "dre_hpc-stacked"
OBJECT_FIELDS = [("NUMBER", "i8"), ("EXT_NUMBER", "i4"), ("X_IMAGE", "f8"), ("Y_IMAGE", "f8"),
                 ("X0", "i8"), ("Y0", "i8"), ("DX", "f8"), ("DY", "f8"), ("CUT_FLAGS", "i8"),
                 ("BACK_ERR", "f8")]
#: Most bytes one `read_cuts` call allocates (data + mask + rms); read a larger file in parts
#: (``start``/``stop``). A header that claims more is refused before anything is read.
MAX_READ_BYTES = 64 * 2**30
COMPRESSION = {"none": {}, "low": {"compression": "lzf"},
               "medium": {"compression": "gzip", "compression_opts": 4},
               "high": {"compression": "gzip", "compression_opts": 9}}


@dataclass
class CutoutSet:
    """A batch of cutouts in memory: arrays (N, B, B) and one table row per object."""

    data: np.ndarray
    mask: np.ndarray
    rms: np.ndarray
    objects: np.ndarray                      # structured array with OBJECT_FIELDS
    source: str = ""
    names: list = field(default_factory=list)

    def __len__(self):
        return self.data.shape[0]

    @property
    def offsets(self) -> np.ndarray:
        """(N, 2) array of (dy, dx); NaN where the position is unknown."""
        return np.stack([self.objects["DY"], self.objects["DX"]], axis=1)

    def subset(self, index) -> "CutoutSet":
        names = list(np.asarray(self.names, dtype=object)[index]) if self.names else []
        return CutoutSet(self.data[index], self.mask[index], self.rms[index], self.objects[index],
                         self.source, names)


def object_name(ext_number, number) -> str:
    """The original DRE group name of an object."""
    return f"{int(ext_number):02d}_{int(number):04d}"


def empty_objects(n: int) -> np.ndarray:
    table = np.zeros(n, dtype=OBJECT_FIELDS)
    table["DX"] = table["DY"] = table["BACK_ERR"] = np.nan
    return table


def detect_layout(h5, source) -> str:
    tag = h5.attrs.get("layout")
    if isinstance(tag, bytes):
        tag = tag.decode("utf-8", "replace")
    if isinstance(tag, str) and tag == STACKED_LAYOUT:
        return "stacked"
    groups = list(h5.keys())
    # groups holding some of obj/seg/rms are DRE groups; one that lacks a dataset is reported by name
    # when it is read, rather than calling the whole file "not a cuts file"
    if groups and all(isinstance(h5[g], h5py.Group) and {"obj", "seg", "rms"} & set(h5[g]) for g in groups[:3]):
        return "dre"
    if not groups:
        return "empty"
    raise CutsFormatError(f"{source}: not a cuts file: expected groups with obj/seg/rms (DRE layout) "
                          f"or attrs layout={STACKED_LAYOUT!r} (stacked layout); found {groups[:5]}")


def count_cuts(path) -> int:
    """Number of objects in a cuts file of either layout."""
    with _open(path) as h5, _damaged(path):
        layout = detect_layout(h5, path)
        if layout == "stacked":
            found = _stacked_datasets(h5, path)
            for name, ds in found.items():      # a count the file cannot hold is refused
                _check_stored(ds, path, name)
            return found["data"].shape[0]
        return len(h5) if layout == "dre" else 0


def read_cuts(path, start: int = 0, stop: int | None = None, boxsize: int = 128, buffers=None) -> CutoutSet:
    """Read objects ``[start, stop)`` of a cuts file of either layout (DRE groups in sorted order).

    ``buffers``: a dict in which the stacked layout's pixel arrays are kept and read into again
    by the next call (the returned arrays are views of them, valid until then): no fresh memory
    per read, whose first touch costs more than the read itself (2-4x, on 1,024 cutouts)."""
    with _open(path) as h5, _damaged(path):
        layout = detect_layout(h5, path)
        if layout == "stacked":
            cuts = _read_stacked(h5, path, start, stop, boxsize, buffers)
        elif layout == "dre":
            cuts = _read_dre(h5, path, start, stop, boxsize)
        else:
            cuts = _empty_set(path, boxsize)
    _check_shapes(cuts, path, boxsize)
    return cuts


def read_cut_objects(path, start: int = 0, stop: int | None = None) -> tuple:
    """``(table, names)`` of objects ``[start, stop)`` without their pixels: the OBJECT_FIELDS table
    (for the DRE layout only ``NUMBER`` and ``EXT_NUMBER``, from the group names) and the names
    that `read_cuts` gives them."""
    with _open(path) as h5, _damaged(path):
        layout = detect_layout(h5, path)
        if layout == "stacked":
            objects = _stacked_datasets(h5, path)["objects"]
            _check_stored(objects, path, "objects")
            found = objects[slice(start, stop)]
            table = empty_objects(len(found))
            for name in found.dtype.names:
                if name in table.dtype.names:
                    table[name] = found[name]
            return table, [object_name(e, n) for e, n in zip(table["EXT_NUMBER"], table["NUMBER"])]
        names = sorted(h5.keys())[start:stop] if layout == "dre" else []
    table = empty_objects(len(names))
    for i, name in enumerate(names):
        table["EXT_NUMBER"][i], table["NUMBER"][i] = _parse_name(name, path)
    return table, names


@contextmanager
def _damaged(path):
    """Turn the errors h5py raises on a damaged file (a truncated chunk, a broken link) into a
    CutsFormatError naming the file."""
    try:
        yield
    except (OSError, KeyError, RuntimeError) as exc:
        raise CutsFormatError(f"{path}: damaged cuts file, cannot be read ({type(exc).__name__}: "
                              f"{exc})") from None


def _stacked_datasets(h5, path) -> dict:
    """The datasets of a stacked file, their kinds, ranks and lengths checked (nothing read)."""
    found = {}
    for name, kinds, ndim in (("data", "fiu", 3), ("mask", "biu", 3), ("rms", "fiu", 3), ("objects", "V", 1)):
        if name not in h5:
            raise CutsFormatError(f"{path}: stacked cuts file lacks {name!r}; expected datasets "
                                  "data, mask, rms and objects")
        ds = h5[name]
        if not isinstance(ds, h5py.Dataset):
            raise CutsFormatError(f"{path}: {name!r} is not a dataset")
        if ds.dtype.kind not in kinds or ds.ndim != ndim:
            what = ("a table (compound type) with fields " + ", ".join(f for f, _ in OBJECT_FIELDS)
                    if name == "objects" else f"a numeric {ndim}-D array (N, B, B)")
            raise CutsFormatError(f"{path}: dataset {name!r} has type {ds.dtype} and shape {ds.shape}, "
                                  f"expected {what}")
        found[name] = ds
    for field_name in found["objects"].dtype.names:
        kind = found["objects"].dtype[field_name].kind
        if field_name in dict(OBJECT_FIELDS) and kind not in "biuf":
            raise CutsFormatError(f"{path}: objects field {field_name!r} has type "
                                  f"{found['objects'].dtype[field_name]}, expected a number")
    lengths = {name: ds.shape[0] for name, ds in found.items()}
    if len(set(lengths.values())) > 1:
        raise CutsFormatError(f"{path}: data, mask, rms and objects have different lengths {lengths}")
    return found


def _check_stored(ds, path, name) -> None:
    """CutsFormatError when the file does not hold `ds`'s data: a chunked dataset with chunks
    never written (reads would give fill values, or a shape in the billions with nothing behind
    it) or a contiguous one with less storage than its size (checked before reading)."""
    if ds.size == 0:
        return
    layout = ds.id.get_create_plist().get_layout()
    if layout == h5py.h5d.CHUNKED:
        expected = math.prod(-(-n // c) for n, c in zip(ds.shape, ds.chunks))
        held = ds.id.get_num_chunks()
        if held < expected:
            raise CutsFormatError(f"{path}: dataset {name!r} of shape {ds.shape} holds only {held} of "
                                  f"its {expected} chunks (never written, or a shape the file cannot "
                                  f"hold)")
    elif layout == h5py.h5d.CONTIGUOUS:
        nbytes = ds.size * ds.dtype.itemsize
        if ds.id.get_storage_size() < nbytes:
            raise CutsFormatError(f"{path}: dataset {name!r} of shape {ds.shape} claims {nbytes} bytes "
                                  f"but the file stores {ds.id.get_storage_size()}")


def _open(path):
    path = Path(path)
    if not path.is_file():
        raise InputError(f"cuts file {path} is a directory, not a file" if path.is_dir()
                         else f"cuts file {path} does not exist")
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise CutsFormatError(f"{path}: cannot be read as HDF5 ({exc})") from None


def _read_stacked(h5, path, start, stop, boxsize, buffers=None) -> CutoutSet:
    found = _stacked_datasets(h5, path)
    sel = slice(start, stop)
    first, last, _ = sel.indices(found["data"].shape[0])
    n = max(last - first, 0)
    for name in ("data", "mask", "rms"):
        if found[name].shape[1:] != (boxsize, boxsize):
            raise CutsFormatError(f"{path}: {name} cutouts have shape {found[name].shape[1:]}, expected "
                                  f"({boxsize}, {boxsize}) like the model stamps")
    nbytes = n * boxsize * boxsize * 9
    if nbytes > MAX_READ_BYTES:
        raise CutsFormatError(f"{path}: reading {n} cutouts needs {nbytes / 2**30:.1f} GiB, more than "
                              f"the {MAX_READ_BYTES // 2**30} GiB limit of one read; read it in parts")
    for name, ds in found.items():
        _check_stored(ds, path, name)
    table = found["objects"][sel]
    pixels = [_read_pixels(found[name], first, n, dtype, buffers, name)
              for name, dtype in (("data", np.float32), ("mask", bool), ("rms", np.float32))]
    cuts = CutoutSet(*pixels, empty_objects(len(table)), str(path))
    for name in table.dtype.names:
        if name in cuts.objects.dtype.names:
            cuts.objects[name] = table[name]
    cuts.names = [object_name(e, n) for e, n in zip(cuts.objects["EXT_NUMBER"], cuts.objects["NUMBER"])]
    return cuts


def _read_pixels(ds, first: int, n: int, dtype, buffers, name):
    """Rows ``first..first+n`` of a stacked pixel dataset as ``dtype``: into ``buffers[name]`` (made
    or grown here) when buffers are given and the file stores that type, else a new array."""
    if buffers is None or n == 0 or ds.dtype != np.dtype(dtype):
        return ds[first:first + n].astype(dtype, copy=False)
    buf = buffers.get(name)
    if buf is None or len(buf) < n or buf.shape[1:] != ds.shape[1:]:
        buf = buffers[name] = np.empty((n,) + ds.shape[1:], dtype)
    ds.read_direct(buf, np.s_[first:first + n], np.s_[0:n])
    return buf[:n]


def _empty_set(path, boxsize) -> CutoutSet:
    return CutoutSet(*(np.zeros((0, boxsize, boxsize), t) for t in ("f4", "?", "f4")),
                     empty_objects(0), str(path))


def _read_dre(h5, path, start, stop, boxsize) -> CutoutSet:
    names = sorted(h5.keys())[start:stop]
    if not names:                 # an empty selection (e.g. start >= the number of objects)
        return _empty_set(path, boxsize)
    table = empty_objects(len(names))
    arrays = {"obj": [], "seg": [], "rms": []}
    for i, name in enumerate(names):
        group = h5[name]
        if not isinstance(group, h5py.Group):
            raise CutsFormatError(f"{path}: {name!r} is not a group (DRE layout: one group per object "
                                  "with datasets obj, seg, rms)")
        for key in arrays:
            if key not in group:
                raise CutsFormatError(f"{path}: group {name!r} lacks dataset {key!r} (DRE layout needs obj, seg, rms)")
            ds = group[key]
            if not isinstance(ds, h5py.Dataset) or ds.dtype.kind not in "biuf" or ds.shape != (boxsize, boxsize):
                what = (f"type {ds.dtype}, shape {ds.shape}" if isinstance(ds, h5py.Dataset)
                        else "a group, not a dataset")
                raise CutsFormatError(f"{path}: group {name!r} {key} has {what}, expected ({boxsize}, "
                                      f"{boxsize}) numbers like the model stamps (every obj/seg/rms "
                                      f"must be {boxsize}x{boxsize})")
            _check_stored(ds, path, f"{name}/{key}")
            arrays[key].append(ds[()])
        table["EXT_NUMBER"][i], table["NUMBER"][i] = _parse_name(name, path)
    try:
        data, seg, rms = (np.array(arrays[k]) for k in ("obj", "seg", "rms"))
    except ValueError:
        raise CutsFormatError(f"{path}: cutouts of different shapes; every obj/seg/rms must be 128x128") from None
    return CutoutSet(data.astype(np.float32), seg.astype(bool), rms.astype(np.float32), table, str(path), names)


def _parse_name(name, path):
    try:
        ext, number = name.split("_")
        return int(ext), int(number)
    except ValueError:
        raise CutsFormatError(f"{path}: group name {name!r} is not EXT_NUMBER_NUMBER (e.g. 00_0042)") from None


def _check_shapes(cuts, path, boxsize):
    for name in ("data", "mask", "rms"):
        arr = getattr(cuts, name)
        if arr.ndim != 3 or arr.shape[1:] != (boxsize, boxsize):
            raise CutsFormatError(f"{path}: {name} cutouts have shape {arr.shape[1:]}, expected "
                                  f"({boxsize}, {boxsize}) like the model stamps")
    if not (len(cuts.mask) == len(cuts.rms) == len(cuts.data) == len(cuts.objects)):
        raise CutsFormatError(f"{path}: data, mask, rms and objects have different lengths")


def _check_unique_names(objects, path):
    keys, counts = np.unique(np.stack([objects["EXT_NUMBER"], objects["NUMBER"]], axis=1), axis=0,
                             return_counts=True)
    if np.any(counts > 1):
        repeated = ", ".join(object_name(*k) for k in keys[counts > 1][:5])
        raise CutsFormatError(f"{path}: the DRE layout names groups by EXT_NUMBER_NUMBER and these "
                              f"objects repeat: {repeated}; use the stacked layout")


def write_cuts(path, cuts: CutoutSet, layout: str = "stacked", compression: str = "low") -> None:
    """Write a cuts file in the ``stacked`` or ``dre`` layout (temporary name, then rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    opts = COMPRESSION[compression]
    with h5py.File(tmp, "w") as h5:
        if layout == "stacked":
            h5.attrs["layout"] = STACKED_LAYOUT
            h5.attrs["version"] = 1
            n, b = len(cuts), cuts.data.shape[-1]
            chunk = (min(max(n, 1), 64), b, b)
            for name, arr in (("data", cuts.data), ("mask", cuts.mask), ("rms", cuts.rms)):
                h5.create_dataset(name, data=arr, chunks=chunk if n else None, **(opts if n else {}))
            h5.create_dataset("objects", data=cuts.objects)
        else:
            _check_unique_names(cuts.objects, path)
            for i, row in enumerate(cuts.objects):
                group = h5.create_group(object_name(row["EXT_NUMBER"], row["NUMBER"]))
                group.create_dataset("obj", data=cuts.data[i].astype(np.float32), **opts)
                group.create_dataset("seg", data=cuts.mask[i].astype(bool), **opts)
                group.create_dataset("rms", data=cuts.rms[i].astype(np.float32), **opts)
    tmp.replace(path)
