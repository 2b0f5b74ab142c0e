"""A tile's inputs beside its image: its PSF, weight map and flag map, its photometry, its health.

Where each comes from, first match wins:

- the tile's own line of the tiles file, ``IMAGE [weight=PATH] [flags=PATH] [psf=PATH]``
  (recorded in the manifest entry);
- ``prep.psf`` (one PSF file for every tile, or a directory of ``<image stem>.psf`` / ``.fits``),
  ``prep.weights`` and ``prep.flags`` (a directory of ``<image stem>_wht.fits`` /
  ``<image stem>_flag.fits``, or a suffix such as ``_wht.fits`` put after the image's stem,
  beside the image);
- none: PSFEx measures the PSF (``prep.psf_fallback`` where it accepts no star), no maps.

`absolute_paths` makes the config's paths absolute at setup (relative to the current
directory, like the tiles file's) and checks that they exist, so a typo fails setup, not a job.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from ..errors import InputError, PSFError
from ..models.psf import image_stem, psf_path_for_image, read_psf
from ..preprocess.header_keys import resolve_value

ENTRY_KEYS = ("weight", "flags", "psf")          # what a tiles-file line may add after the image
MAP_SUFFIX = {"weight": "_wht.fits", "flags": "_flag.fits"}
MAP_KEY = {"weight": "prep.weights", "flags": "prep.flags"}
BAD_IMAGE_FRACTION = 0.5          # more NaN or zero pixels than this: the tile is reported


def is_suffix(value: str) -> bool:
    """Whether a ``prep.weights``/``prep.flags`` value is a file-name suffix, not a directory."""
    return "/" not in value and value.startswith(("_", ".", "-"))


def absolute_paths(data: dict, source="run config") -> dict:
    """`data` (a resolved config as a dict) with ``prep.psf``, ``prep.psf_fallback``,
    ``prep.weights`` and ``prep.flags`` absolute, each checked to exist; an `InputError` names the
    key otherwise."""
    prep = data["prep"]
    for key, what in (("psf", "a PSF file or a directory of <image stem>.psf"), ("psf_fallback", "a PSF file"),
                      ("weights", "a directory or a suffix such as _wht.fits"),
                      ("flags", "a directory or a suffix such as _flag.fits")):
        value = prep[key]
        if value is None or (key in ("weights", "flags") and is_suffix(value)):
            continue
        path = Path(value).expanduser().absolute()
        wanted_file = key == "psf_fallback"
        ok = path.is_file() if wanted_file else (path.is_dir() or (key == "psf" and path.is_file()))
        if not ok:
            raise InputError(f"{source}: prep.{key}: {value!r} not found; expected {what}")
        prep[key] = str(path)
    return data


def map_path(setting, entry_value, image, role: str):
    """The weight (`role` 'weight') or flag map ('flags') of `image`, or None."""
    if entry_value:
        return Path(entry_value)
    if setting is None:
        return None
    image = Path(image)
    stem = image_stem(image)
    path = (image.parent / f"{stem}{setting}" if is_suffix(setting)
            else Path(setting) / f"{stem}{MAP_SUFFIX[role]}")
    if not path.is_file():
        raise InputError(f"{image}: its {role} map {path} does not exist ({MAP_KEY[role]}: {setting}); "
                         f"give it, or name it on the tile's line of the tiles file ({role}=PATH)")
    return path


def tile_maps(config, entry: dict) -> dict:
    """``{"weight": Path or None, "flags": Path or None}`` of the manifest `entry`'s tile."""
    prep = config["prep"]
    return {"weight": map_path(prep["weights"], entry.get("weight"), entry["image"], "weight"),
            "flags": map_path(prep["flags"], entry.get("flags"), entry["image"], "flags")}


def user_psf(config, entry: dict):
    """``(path, origin)`` of the PSF the user gives the tile (tiles file, then ``prep.psf``), or
    ``(None, None)``: PSFEx measures it."""
    if entry.get("psf"):
        return Path(entry["psf"]), "tiles file"
    if config["prep"]["psf"] is None:
        return None, None
    try:
        return psf_path_for_image(config["prep"]["psf"], entry["image"]), "prep.psf"
    except PSFError as exc:
        raise InputError(f"prep.psf: {exc}") from None


def install_psf(source, dest: Path, role: str) -> Path:
    """Check that `source` is a usable PSF (`read_psf`) and copy it to `dest` (the tile's PSF
    product); an `InputError` naming the file and `role` (the option that gave it) otherwise."""
    try:
        read_psf(source)
    except PSFError as exc:
        raise InputError(f"{role}: {exc}") from None
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, dest)
    return dest


def tile_photometry(config, header, image) -> dict:
    """``{"zero_point", "gain"}`` of the fit for this tile: ``fit.zero_point``/``fit.gain`` as
    numbers, ``header:KEY`` read from the image header (a missing key fails, naming it)."""
    fit = config["fit"]
    gain = resolve_value(fit["gain"], header, image, "fit.gain")
    if gain is not None and gain < 0:
        raise InputError(f"{image}: fit.gain {fit['gain']} = {gain:g} is negative")
    return {"zero_point": resolve_value(fit["zero_point"], header, image, "fit.zero_point"), "gain": gain}


def image_health(image) -> dict:
    """``{"pixels", "bad_fraction"}``: the share of an image's pixels that are NaN, infinite or
    exactly zero (over every 2-D image HDU; read a block of rows at a time)."""
    from astropy.io import fits

    bad = total = 0
    with fits.open(image, memmap=True) as hdul:
        for hdu in hdul:
            if not (hdu.is_image and hdu.header.get("NAXIS", 0) == 2) or hdu.data is None:
                continue
            data = hdu.data
            for start in range(0, data.shape[0], 1024):
                block = np.asarray(data[start:start + 1024], dtype=np.float64)
                bad += int(np.count_nonzero(~np.isfinite(block) | (block == 0)))
                total += block.size
    return {"pixels": total, "bad_fraction": round(bad / total, 4) if total else 1.0}


def health_warnings(health: dict) -> list:
    """What to report about an image whose pixels are mostly NaN or zero."""
    share = health["bad_fraction"]
    if share >= 1.0:
        return ["the image holds no valid pixel: every pixel is NaN, infinite or zero"]
    if share > BAD_IMAGE_FRACTION:
        return [f"{100 * share:.0f} % of the image's pixels are NaN, infinite or zero"]
    return []
