"""Model cubes on disk, in the original DRE FITS layout (read and written exactly).

The primary HDU holds float32 data of shape ``([NINDEX,] NAXRAT, NPOSANG*BOXSIZE, NLOGH*BOXSIZE)``:
for each (index, axis ratio) plane, angle tiles run down the rows and radius tiles across the columns.
The grid keys (see :meth:`ModelGrid.to_header_cards`) sit in the primary header, so the original
loader, ``fits.getdata(f).reshape(NAXRAT, NPOSANG, BOXSIZE, NLOGH, BOXSIZE).swapaxes(2, 3)`` (with a
leading NINDEX when present), recovers the stamps as (q, angle, logr, y, x). In memory dre_hpc always
uses ``(n, q, angle, logr, y, x)``. A few documenting keys of our own describe the conventions; the
original loader ignores them.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.io.fits.verify import VerifyError

from ..errors import CubeFormatError, InputError
from ..io.fits_check import check_fits
from .grid import AXIS_KEYS, ModelGrid

GRID_KEYS = tuple(k for keys in AXIS_KEYS.values() for k in keys) + ("BOXSIZE",)


def convention_cards(grid: ModelGrid) -> list:
    """Documenting (key, value, comment) cards: centre, radius and angle definitions, flux scale."""
    return [
        ("MODELPRF", "SERSIC", "pixel-integrated elliptical Sersic models"),
        ("CENTPIX", grid.centre + 1, "model centre: this FITS pixel of a tile"),
        ("RADDEF", "HLR_MAJOR", "LOGH: log10 major-axis half-light radius, px"),
        ("ANGDEF", "CCW_FROM_X", "POSANG: major axis, deg from +x towards +y"),
        ("FLUXNORM", "UNIT_TOTAL", "model flux is 1; tiles may sum to < 1"),
        ("TILEAXES", "ANG_ROWS_LOGH_COLS", "angle tiles down rows, radius tiles across"),
    ]


def to_disk_layout(cube: np.ndarray, grid: ModelGrid) -> np.ndarray:
    """``(n, q, angle, logr, y, x)`` stamps to the tiled on-disk float32 array."""
    nn, nq, na, nr, box, _ = cube.shape
    tiles = np.ascontiguousarray(cube.transpose(0, 1, 2, 4, 3, 5), dtype=np.float32)
    tiles = tiles.reshape(nn, nq, na * box, nr * box)
    return tiles if grid.has_index_axis else tiles[0]


def from_disk_layout(data: np.ndarray, grid: ModelGrid) -> np.ndarray:
    """The tiled on-disk array to C-contiguous native float32 ``(n, q, angle, logr, y, x)`` stamps."""
    nn, nq, na, nr = grid.shape
    box = grid.boxsize
    cube = np.asarray(data).reshape(nn, nq, na, box, nr, box).swapaxes(3, 4)
    return np.ascontiguousarray(cube, dtype=np.float32)


def write_cube(path, cube, grid: ModelGrid, overwrite: bool = False, extra_cards=()) -> Path:
    """Write stamps ``grid.shape + (boxsize, boxsize)`` as a DRE model cube, atomically.

    Parameters
    ----------
    path : str or Path
        Output FITS file (a ``.gz`` name is compressed by astropy).
    cube : array_like
        Stamps, shape ``grid.shape + (grid.boxsize, grid.boxsize)``.
    grid : ModelGrid
        The grid; without an index axis the file is 3-D, has no NINDEX keys and means n = 4.
    overwrite : bool
        Replace an existing file.
    extra_cards : iterable of (key, value, comment)
        More header cards (e.g. the generator version).

    Returns
    -------
    Path
        The written file.
    """
    path = Path(path)
    cube = np.asarray(cube)
    _check_writable(path, cube, grid, overwrite)
    hdu = fits.PrimaryHDU(to_disk_layout(cube, grid))
    for key, value, comment in list(grid.to_header_cards()) + convention_cards(grid) + list(extra_cards):
        hdu.header[key] = (value, comment)
    tmp = path.with_name(f".tmp-{uuid.uuid4().hex[:12]}-{path.name}")
    try:
        hdu.writeto(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        raise InputError(f"cannot write model cube {path}: {exc}") from exc
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _check_writable(path: Path, cube: np.ndarray, grid: ModelGrid, overwrite: bool):
    expected = grid.shape + (grid.boxsize, grid.boxsize)
    if cube.shape != expected:
        raise CubeFormatError(f"{path}: cube shape {cube.shape} does not match the grid, "
                              f"expected {expected} = (n, q, angle, logr, y, x)")
    if not grid.has_index_axis and (grid.index.count != 1 or abs(grid.index.start - 4.0) > 1e-9):
        raise CubeFormatError(f"{path}: a cube without the NINDEX axis means n = 4 only, but the grid "
                              f"has n = {grid.index.values.tolist()}; write it with the index axis")
    if not np.all(np.isfinite(cube)):
        raise CubeFormatError(f"{path}: refusing to write a cube with non-finite values")
    if path.exists() and not overwrite:
        raise InputError(f"{path} already exists; use overwrite (--overwrite) to replace it")
    if not path.parent.is_dir():
        raise InputError(f"cannot write model cube {path}: directory {path.parent} does not exist")


def read_cube(path):
    """Read a DRE model cube.

    The data come from the first HDU with image data; the grid keys from the primary header, or from
    that HDU for keys the primary header lacks.

    Returns
    -------
    cube : ndarray of float32, shape (n, q, angle, logr, y, x)
    grid : ModelGrid

    Raises
    ------
    InputError
        The file is missing or is not readable FITS.
    CubeFormatError
        Keys are missing, the data shape does not match them, or values are not finite.
    """
    source = CubeFile(path)
    try:
        # memory-mapped: the tiles are byte-swapped and rearranged into stamps in one pass over the
        # file (0.25 s for the default cube instead of 0.6 s through a big-endian copy)
        cube = from_disk_layout(source._tiles, source.grid)
    except READ_ERRORS as exc:
        raise InputError(f"cannot read model cube {source.path} as FITS: {exc}") from exc
    finally:
        source.close()
    _check_finite(cube, source.path)
    return cube, source.grid


#: What reading a cube that is not readable FITS may raise (reported as an InputError).
READ_ERRORS = (OSError, ValueError, TypeError, IndexError, KeyError, AttributeError, EOFError, VerifyError)


class CubeFile:
    """A model cube read lazily: the grid from the headers (checked as `read_cube` checks them),
    the stamps on demand from the memory-mapped file (`stamps`), converted to native float32 a
    block at a time. The convolution reads its blocks from here, so neither the whole native cube
    (2 GB for the ``sersic`` cube) nor a copy of its unique stamps is ever made, and each MPI rank
    reads only the models it convolves. Values are checked (finite) as they are read.
    """

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.is_file():
            raise InputError(f"model cube {self.path} not found" if not self.path.exists()
                             else f"model cube {self.path} is not a file")
        # every header checked and the data sizes compared with the file before astropy reads it:
        # truncated files and absurd NAXISn/BITPIX give an InputError, not a huge array or a hang
        check_fits(self.path, f"cannot read model cube {self.path} as FITS")
        try:
            self._hdul = fits.open(self.path, memmap=True)
            try:
                self._hdu = first_image_hdu(self._hdul, self.path)
                header = grid_header(self._hdul[0].header, self._hdu.header)
                self.grid = ModelGrid.from_header(header, source=str(self.path))
                (nn, nq, na, nr), box = self.grid.shape, self.grid.boxsize
                self._tiles = match_shape(self._hdu.data, self.grid, self.path).reshape(
                    nn, nq, na, box, nr, box)
            except BaseException:               # a refused file is not left open
                self._hdul.close()
                raise
        except READ_ERRORS as exc:
            raise InputError(f"cannot read model cube {self.path} as FITS: {exc}") from exc

    def stamps(self, flat_indices) -> np.ndarray:
        """(k, B, B) C-contiguous native float32 stamps of the full-grid cells `flat_indices`; a
        CubeFormatError naming the first model with a non-finite value."""
        n, q, a, r = np.unravel_index(np.asarray(flat_indices, dtype=np.int64), self.grid.shape)
        box = self.grid.boxsize
        out = np.empty((len(n), box, box), dtype=np.float32)
        for i in range(len(n)):       # stamp by stamp: 6x faster than one fancy index of them all
            out[i] = self._tiles[n[i], q[i], a[i], :, r[i], :]
        with np.errstate(over="ignore", invalid="ignore"):
            if not (np.isfinite(out.reshape(-1).sum()) or np.isfinite(out).all()):
                bad = int(np.flatnonzero(~np.isfinite(out).all(axis=(1, 2)))[0])
                cell = (int(n[bad]), int(q[bad]), int(a[bad]), int(r[bad]))
                raise CubeFormatError(f"{self.path}: non-finite value(s) in the model data, in model "
                                      f"(index, ax_ratio, angle, logr) = {cell}")
        return out

    def close(self) -> None:
        """Release the mapped data (astropy keeps its array otherwise) and close the file."""
        self._tiles = None
        del self._hdu.data
        self._hdul.close()


def first_image_hdu(hdul, path):
    """The first image HDU of `hdul` with data (a CubeFormatError naming `path` when none)."""
    for hdu in hdul:
        if hdu.is_image and hdu.header.get("NAXIS", 0) > 0 and hdu.data is not None and hdu.data.size:
            return hdu
    raise CubeFormatError(f"{path}: no HDU holds image data (a model cube needs one)")


def grid_header(primary, data_header) -> dict:
    """Grid keys from the primary header, falling back to the data HDU's header."""
    merged = {}
    for key in GRID_KEYS + ("RENDERV",):
        for header in (primary, data_header):
            if key in header:
                merged[key] = header[key]
                break
    return merged


def match_shape(data, grid, path):
    """`data` in the DRE disk layout of `grid` (leading length-1 axes dropped), or a CubeFormatError."""
    box = grid.boxsize
    expected = (grid.shape[1], grid.shape[2] * box, grid.shape[3] * box)
    if grid.has_index_axis:
        expected = (grid.shape[0],) + expected

    def strip(shape):  # leading length-1 axes do not change the layout
        shape = tuple(shape)
        while len(shape) > 1 and shape[0] == 1:
            shape = shape[1:]
        return shape

    if strip(data.shape) != strip(expected):
        layout = "NINDEX, NAXRAT, NPOSANG*BOXSIZE, NLOGH*BOXSIZE" if grid.has_index_axis \
            else "NAXRAT, NPOSANG*BOXSIZE, NLOGH*BOXSIZE"
        raise CubeFormatError(f"{path}: data shape {tuple(data.shape)} does not match the header "
                              f"keys: expected {expected} = ({layout})")
    if not np.issubdtype(data.dtype, np.number):
        raise CubeFormatError(f"{path}: model data have non-numeric type {data.dtype}")
    return data.reshape(expected)


def _check_finite(cube, path):
    """A CubeFormatError naming the first model (grid indices) with a non-finite value."""
    # a float32 sum is finite if every value is (an overflow only sends it to the exact check),
    # without the cube-sized boolean array of isfinite: 0.1 s -> 0.02 s for the default cube
    with np.errstate(over="ignore", invalid="ignore"):
        if np.isfinite(cube.reshape(-1).sum()) or np.isfinite(cube).all():
            return
    bad = ~np.isfinite(cube)
    n, q, a, r = (int(i) for i in np.unravel_index(np.flatnonzero(bad)[0], cube.shape)[:4])
    raise CubeFormatError(
        f"{path}: {int(bad.sum())} non-finite value(s) in the model data, the first in model "
        f"(index, ax_ratio, angle, logr) = ({n}, {q}, {a}, {r})")