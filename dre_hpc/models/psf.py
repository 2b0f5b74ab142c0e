"""Read a PSF (PSFEx ``.psf`` or a plain FITS image) as a clean, unit-sum 2-D array.

Pixel convention
----------------
The centre of a PSF array of shape ``(ny, nx)`` is the centre of 0-based pixel
``(ny // 2, nx // 2)``; this is PSFEx's convention (its ``PSF_MASK`` vignets are centred there) and
the one :func:`dre_hpc.models.convolve.convolve_cube` assumes, so that a model centred on stamp
pixel ``[B // 2, B // 2]`` stays centred there after convolution. Plain FITS PSFs must follow it.

PSFEx files
-----------
A ``.psf`` file holds one ``PSF_DATA`` binary-table HDU per image extension of the catalogue
(HDU ``ext_number + 1`` for 0-based image extension ``ext_number`` = SExtractor's EXT_NUMBER - 1). Its ``PSF_MASK`` cell has shape
``(ncomp, ny, nx)``: the coefficients of a polynomial in the image position. Component 0, the
constant term, is the PSF at the polynomial's reference position (what the original DRE used).
``PSF_SAMP`` is the size of a PSF pixel in image pixels; it must be 1 unless the caller asks for
resampling (``PSF_SAMPLING 1.0`` in the PSFEx configuration gives 1).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ..errors import PSFError
from ..io.fits_check import check_fits

log = logging.getLogger(__name__)

#: Largest accepted PSF side in pixels (model stamps are 128 pixels; anything bigger is a mistake).
MAX_PSF_SIDE = 512
#: Accepted distance of PSF_SAMP from 1.
SAMPLING_TOLERANCE = 1e-3
#: File suffixes stripped from an image name to find its PSF.
IMAGE_SUFFIXES = (".fz", ".gz", ".fits", ".fit", ".fts", ".h5", ".hdf5")


def read_psf(path, ext_number: int = 0, resample: bool = False) -> np.ndarray:
    """Read the PSF of image extension `ext_number` from a PSFEx ``.psf`` or FITS image file.

    Parameters
    ----------
    path : str or Path
        A PSFEx ``.psf`` file or a FITS file whose first image HDU is the PSF.
    ext_number : int
        0-based image extension: SExtractor's 1-based ``EXT_NUMBER`` minus 1 (a single-extension
        image has EXT_NUMBER 1, so 0; see ``fit.tiles.psf_index``). Selects PSFEx HDU
        ``ext_number + 1``; ignored for FITS image PSFs.
    resample : bool
        Resample a PSFEx PSF whose ``PSF_SAMP`` is not 1 to image pixels (with a warning) instead
        of refusing it.

    Returns
    -------
    ndarray of float64, shape (ny, nx)
        Non-negative, sum 1, centred on pixel ``(ny // 2, nx // 2)``.

    Raises
    ------
    PSFError
        Missing or unreadable file, no PSF data, unusable sampling, extension or pixel values.
    """
    from astropy.io.fits.verify import VerifyError

    path = Path(path)
    with _open_fits(path) as hdul:
        try:
            psfex_hdus = [i for i, hdu in enumerate(hdul) if _is_psfex_hdu(hdu)]
            if psfex_hdus:
                raw, samp = _read_psfex(hdul, psfex_hdus, int(ext_number), path)
                raw = _check_sampling(raw, samp, resample, path, int(ext_number))
            else:
                raw = _read_image_psf(hdul, path)
        except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError, VerifyError) as exc:
            raise PSFError(f"PSF file {path}: cannot read its PSF data ({type(exc).__name__}: "
                           f"{exc})") from exc
    return _clean(raw, path)


def psf_centre(psf) -> tuple:
    """0-based ``(row, column)`` of the pixel on whose centre `psf` is centred: ``(ny//2, nx//2)``."""
    ny, nx = np.shape(psf)
    return ny // 2, nx // 2


def psf_path_for_image(psf_arg, image_name):
    """The PSF file for one image from the ``dre --psf`` argument.

    Parameters
    ----------
    psf_arg : str, Path or None
        A directory holding ``<image>.psf`` (preferred) or ``<image>.fits`` per image, or one PSF
        file used for every image; None means no PSF (returns None).
    image_name : str or Path
        The image (or its cuts file); directories and the suffixes in `IMAGE_SUFFIXES` are
        stripped, so ``data/field1.fits`` and ``field1`` both look for ``field1.psf``.

    Returns
    -------
    Path or None
    """
    if psf_arg is None:
        return None
    psf_arg = Path(psf_arg)
    if psf_arg.is_file():
        return psf_arg
    if not psf_arg.exists():
        raise PSFError(f"PSF path {psf_arg} does not exist (give a PSF file or a directory of "
                       f"<image>.psf files)")
    stem = image_stem(image_name)
    tried = [psf_arg / f"{stem}.psf", psf_arg / f"{stem}.fits"]
    for candidate in tried:
        if candidate.is_file():
            return candidate
    raise PSFError(f"no PSF for image {image_name!s} in directory {psf_arg}: looked for "
                   f"{' and '.join(str(t) for t in tried)}")


def image_stem(image_name) -> str:
    """Base name of an image without directory and FITS/HDF5/compression suffixes."""
    name = Path(str(image_name)).name
    stripped = True
    while stripped:
        stripped = False
        for suffix in IMAGE_SUFFIXES:
            if name.lower().endswith(suffix) and len(name) > len(suffix):
                name, stripped = name[: -len(suffix)], True
    return name


def resample_psf(psf, psf_samp: float) -> np.ndarray:
    """Resample a PSF tabulated every `psf_samp` image pixels onto the image pixel grid.

    The PSFEx model is the pixel-convolved PSF, so it is interpolated (cubic spline) at the image
    pixel positions; the centre pixel ``n // 2`` maps onto the output centre pixel ``m // 2``.
    The output side is odd and covers the input footprint. Flux is not renormalised here.
    """
    from scipy.ndimage import map_coordinates

    psf = np.asarray(psf, dtype=np.float64)
    if not (np.isfinite(psf_samp) and psf_samp > 0):
        raise PSFError(f"PSF_SAMP = {psf_samp} is not a usable sampling step")
    axes = []
    for n in psf.shape:
        half_out = int(np.floor((n // 2) * psf_samp + 1e-6))
        offsets = np.arange(-half_out, half_out + 1, dtype=np.float64)
        axes.append(n // 2 + offsets / psf_samp)
    grid = np.meshgrid(*axes, indexing="ij")
    return map_coordinates(psf, grid, order=3, mode="constant", cval=0.0)


# -- internals -------------------------------------------------------------------------------

def _open_fits(path: Path):
    """astropy HDUList of `path`, or PSFError saying why it cannot be opened."""
    from astropy.io import fits

    if not path.exists():
        raise PSFError(f"PSF file {path} does not exist")
    if not path.is_file():
        raise PSFError(f"PSF path {path} is not a file")
    # headers checked and data sizes compared with the file first: a truncated file or absurd
    # NAXISn/TFIELDS is refused here instead of astropy allocating or looping on it
    check_fits(path, f"PSF file {path} is not a readable FITS file", PSFError)
    hdul = None
    try:
        hdul = fits.open(path, memmap=False)
        len(hdul)  # forces astropy to read every header now
    except Exception as exc:  # astropy raises OSError, ValueError, TypeError... on garbage
        if hdul is not None:
            hdul.close()
        raise PSFError(f"PSF file {path} is not a readable FITS file ({exc})") from exc
    return hdul


def _is_psfex_hdu(hdu) -> bool:
    if not hasattr(hdu, "columns"):
        return False
    names = [c.upper() for c in hdu.columns.names]
    return hdu.header.get("EXTNAME", "").upper() == "PSF_DATA" or "PSF_MASK" in names


def _pick_psfex_hdu(hdul, psfex_hdus: list, ext_number: int, path: Path) -> int:
    """HDU index of the PSF of image extension `ext_number` (checked for ACCEPTED stars)."""
    if len(psfex_hdus) == 1:
        if ext_number != 0:
            raise PSFError(f"PSF file {path} has a single PSF (HDU {psfex_hdus[0]}) but image "
                           f"extension {ext_number} was asked for; give one PSF per extension")
        index = psfex_hdus[0]
    else:
        index = ext_number + 1
        if index not in psfex_hdus:
            raise PSFError(f"PSF file {path} has no PSF for image extension {ext_number} (HDU "
                           f"{index}); PSF_DATA HDUs: {psfex_hdus}")
    if int(hdul[index].header.get("ACCEPTED", 1)) == 0:
        good = [i - 1 for i in psfex_hdus if int(hdul[i].header.get("ACCEPTED", 1)) != 0]
        raise PSFError(f"PSF file {path}, image extension {ext_number} (HDU {index}): PSFEx "
                       f"accepted no stars (ACCEPTED = 0); extensions with accepted stars: "
                       f"{good if good else 'none'}")
    return index


def _read_psfex(hdul, psfex_hdus: list, ext_number: int, path: Path) -> tuple:
    """Constant term of the PSFEx polynomial and PSF_SAMP of the chosen HDU."""
    index = _pick_psfex_hdu(hdul, psfex_hdus, ext_number, path)
    hdu = hdul[index]
    where = f"PSF file {path} HDU {index}"
    if "PSF_MASK" not in [c.upper() for c in hdu.columns.names]:
        raise PSFError(f"{where}: no PSF_MASK column")
    if hdu.data is None or len(hdu.data) == 0:
        raise PSFError(f"{where}: the PSF_DATA table has no rows")
    cell = np.asarray(hdu.data["PSF_MASK"][0], dtype=np.float64)
    header = hdu.header
    if cell.ndim == 1 and all(f"PSFAXIS{i}" in header for i in (1, 2)):
        nx, ny, ncomp = (int(header.get(f"PSFAXIS{i}", 1)) for i in (1, 2, 3))
        if cell.size != nx * ny * ncomp:
            raise PSFError(f"{where}: PSF_MASK has {cell.size} values, PSFAXIS1..3 say "
                           f"{nx}x{ny}x{ncomp}")
        cell = cell.reshape(ncomp, ny, nx)
    if cell.ndim == 3:
        cell = cell[0]
    if cell.ndim != 2:
        raise PSFError(f"{where}: PSF_MASK cell has shape {cell.shape}, expected (ncomp, ny, nx)")
    return cell, float(header.get("PSF_SAMP", 1.0))


def _check_sampling(psf, samp: float, resample: bool, path: Path, ext_number: int):
    """`psf` unchanged when PSF_SAMP is 1, resampled when allowed, otherwise PSFError."""
    if abs(samp - 1.0) <= SAMPLING_TOLERANCE:
        return psf
    if not resample:
        raise PSFError(f"PSF file {path} (extension {ext_number}): the PSF is sampled at "
                       f"{samp:g} image pixels per PSF pixel (PSF_SAMP = {samp:g}), not 1; run "
                       f"PSFEx with PSF_SAMPLING 1.0, or resample it (resample=True)")
    out = resample_psf(psf, samp)
    log.warning("PSF %s (extension %d): PSF_SAMP = %g, resampled from %s to %s image pixels",
                path, ext_number, samp, psf.shape, out.shape)
    return out


def _read_image_psf(hdul, path: Path) -> np.ndarray:
    """Data of the first image HDU with at least two dimensions."""
    for index, hdu in enumerate(hdul):
        if hasattr(hdu, "columns") or hdu.header.get("NAXIS", 0) == 0:
            continue
        data = np.asarray(hdu.data, dtype=np.float64)
        while data.ndim > 2 and data.shape[0] == 1:
            data = data[0]
        if data.ndim != 2:
            raise PSFError(f"PSF file {path} HDU {index}: image has shape {data.shape}, "
                           f"expected a 2-D PSF")
        return data
    kinds = [type(h).__name__ for h in hdul]
    raise PSFError(f"PSF file {path} holds no PSF: neither a PSFEx PSF_DATA table nor an image "
                   f"HDU (HDUs: {', '.join(kinds)})")


def _clean(psf: np.ndarray, path: Path) -> np.ndarray:
    """Checked, negatives set to 0, normalised to sum 1, float64 C-contiguous."""
    psf = np.array(psf, dtype=np.float64, order="C")
    if psf.ndim != 2 or min(psf.shape) < 1:
        raise PSFError(f"PSF from {path} has shape {psf.shape}, expected a non-empty 2-D array")
    if max(psf.shape) > MAX_PSF_SIDE:
        raise PSFError(f"PSF from {path} is {psf.shape[0]}x{psf.shape[1]} pixels, larger than "
                       f"the {MAX_PSF_SIDE}-pixel limit")
    bad = ~np.isfinite(psf)
    if bad.any():
        raise PSFError(f"PSF from {path} has {int(bad.sum())} non-finite (NaN/inf) pixels")
    np.maximum(psf, 0.0, out=psf)
    total = psf.sum()
    if not total > 0:
        raise PSFError(f"PSF from {path} is zero everywhere (after setting negative pixels to 0)")
    psf /= total
    return psf
