"""SExtractor on the tiles: catalogue and check images for PSFEx, make_cuts and dre.

For each image ``Tiles/<img>.fits`` (also ``.fit``, ``.fits.fz``) SExtractor writes, in
``Sextracted/`` (or ``Sextracted/<img>/`` with ``subdir``)::

    <img>_cat.fits   FITS_LDAC catalogue (HDU LDAC_OBJECTS), columns of dre.param
    <img>_nb.fits    -BACKGROUND check image (background-subtracted image)
    <img>_rms.fits   BACKGROUND_RMS check image
    <img>_seg.fits   SEGMENTATION check image

Tile-compressed images (``.fits.fz``), which SExtractor 2.25 cannot read ("Unknown TFORM"), are
unpacked into a temporary plain FITS file next to the outputs first (`tools.unpack_image`).

Outputs are written under ``.part`` names and renamed when SExtractor succeeded and all four
exist (the catalogue last); a failed run leaves none of them, not even those of an earlier run,
so a catalogue on disk always comes with its check images. Files named ``*_flag.fits`` or
``*_wht.fits`` are flag and weight maps, never tiles: `layout.list_tile_images` skips them.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DreError, InputError
from ..models.psf import image_stem
from .header_keys import header_key, header_number
from .weights import WEIGHT_TYPES
from .layout import SEXTRACTED_ROLES, for_each_tile, list_tile_images, sextracted_files
from .tools import (config_path, find_tool, path_arg, read_image_header, run_tool, tool_warnings,
                    unpack_image)

log = logging.getLogger(__name__)

CHECKIMAGE_TYPES = "-BACKGROUND,BACKGROUND_RMS,SEGMENTATION"
FORCED_KEYS = ("CATALOG_NAME", "CATALOG_TYPE", "CHECKIMAGE_TYPE", "CHECKIMAGE_NAME", "GAIN", "GAIN_KEY")
#: A header key that never exists: SExtractor would let a header GAIN override our -GAIN.
NO_GAIN_KEY = "DRE_NONE"
FLAG_PARAMS = ("IMAFLAGS_ISO", "NIMAFLAGS_ISO")
#: Catalogue columns PSFEx and make_cuts read (a -p parameter file without them is warned about).
NEEDED_PARAMS = ("NUMBER", "X_IMAGE", "Y_IMAGE", "FLUX_APER", "FLUXERR_APER", "FLUX_RADIUS",
                 "SNR_WIN", "ELONGATION", "FLAGS", "CLASS_STAR", "VIGNET")


@dataclass
class SexOptions:
    """How to run SExtractor; None for a file means the one shipped in ``dre_hpc/data``.

    ``gain`` is 'counts' (header gain, image in ADU), 'cps' (header gain x EXPTIME, image in
    ADU/s) or a number in e-/ADU; ``extra`` holds further ``-KEY value`` overrides.
    """

    config: str | Path | None = None
    param: str | Path | None = None
    filter: str | Path | None = None
    nnw: str | Path | None = None
    gain: str | float = "counts"
    gain_key: str = "auto"
    flags_dir: str | Path | None = None
    weights_dir: str | Path | None = None
    flag_image: str | Path | None = None          # one image's maps: win over the directories
    weight_image: str | Path | None = None
    weight_type: str = "MAP_WEIGHT"
    subdir: bool = False
    extra: dict = field(default_factory=dict)
    executable: str | None = None


@dataclass
class SexOutputs:
    """The files SExtractor wrote for one image."""

    image: Path
    catalog: Path
    nb: Path
    rms: Path
    seg: Path
    n_objects: int = 0
    seconds: float = 0.0


def output_paths(output_dir, stem: str, subdir: bool = False) -> dict:
    """``{'cat', 'nb', 'rms', 'seg'} -> Path`` of the outputs of image `stem`."""
    return sextracted_files(output_dir, stem, subdir)


def resolve_gain(header, mode="counts", gain_key: str = "auto", source="image") -> float:
    """Gain in e-/ADU to give SExtractor.

    Parameters
    ----------
    header : mapping
        The image header (astropy Header or dict).
    mode : {'counts', 'cps'} or float or str
        'counts': the header gain; 'cps': header gain x EXPTIME (image in counts per second);
        'header:KEY': header KEY; a number (or a string holding one): that gain.
    gain_key : str
        Header key of the gain; 'auto': ``GAIN`` if present, else the single key containing
        ``GAIN``.
    source : str or Path
        Named in error messages.

    Raises
    ------
    InputError
        Unknown mode, no or several gain keys, missing EXPTIME, non-numeric or negative values.
    """
    mode_text = str(mode).strip().lower()
    if header_key(mode) is not None:
        return _checked(header_number(header, header_key(mode), source, "gain"), f"header {header_key(mode)}",
                        source)
    if mode_text not in ("counts", "cps"):
        try:
            value = float(mode)
        except (TypeError, ValueError):
            raise InputError(f"gain {mode!r}: expected 'counts', 'cps' or a number in e-/ADU") from None
        return _checked(value, "gain", source)
    key = _gain_key(header, gain_key, source)
    gain = _checked(_number(header, key, source), f"header {key}", source)
    if mode_text == "cps":
        if "EXPTIME" not in header:
            raise InputError(f"{source}: --gain cps needs the header key EXPTIME, which is missing")
        gain *= _checked(_number(header, "EXPTIME", source), "header EXPTIME", source)
    return gain


def _gain_key(header, gain_key: str, source) -> str:
    if str(gain_key).lower() != "auto":
        key = str(gain_key).upper()
        if key not in header:
            raise InputError(f"{source}: header key {key} (--gain-key) is missing")
        return key
    if "GAIN" in header:
        return "GAIN"
    keys = sorted({str(k).upper() for k in header.keys() if "GAIN" in str(k).upper()})
    if len(keys) != 1:
        found = f"several: {', '.join(keys)}" if keys else "none"
        raise InputError(f"{source}: no GAIN header key and {found} containing GAIN; give "
                         f"--gain-key KEY or --gain VALUE (e-/ADU)")
    return keys[0]


def _number(header, key: str, source) -> float:
    try:
        return float(header[key])
    except (TypeError, ValueError):
        raise InputError(f"{source}: header {key} = {header[key]!r} is not a number") from None


def _checked(value: float, what: str, source) -> float:
    if not (math.isfinite(value) and value >= 0):
        raise InputError(f"{source}: {what} = {value!r} is not a finite gain >= 0")
    return value


def run_sextractor(image, output_dir="Sextracted", options: SexOptions | None = None) -> SexOutputs:
    """Run SExtractor on one image and return the paths it wrote.

    Raises
    ------
    InputError
        Unreadable image, flag/weight map missing, bad gain or option.
    ToolNotFoundError, ToolError
        SExtractor missing, failing, or not writing all its outputs.
    """
    options = options or SexOptions()
    check_options(options)
    image = Path(image)
    stem = image_stem(image)
    gain = resolve_gain(read_image_header(image), options.gain, options.gain_key, source=image)
    final = output_paths(output_dir, stem, options.subdir)
    keys = _command_keys(stem, gain, options)
    executable = find_tool("sextractor", options.executable)
    final["cat"].parent.mkdir(parents=True, exist_ok=True)
    parts = {kind: path.with_name(path.name + ".part") for kind, path in final.items()}
    for path in list(final.values()) + list(parts.values()):
        path.unlink(missing_ok=True)          # a failed run must not leave older outputs behind
    param_copy = unpacked = None
    try:
        unpacked = unpack_image(image, final["cat"].parent)
        keys["CATALOG_NAME"] = path_arg(parts["cat"], "output")
        keys["CHECKIMAGE_NAME"] = ",".join(path_arg(parts[k], "output") for k in ("nb", "rms", "seg"))
        if options.flags_dir is not None or options.flag_image is not None:
            param_copy = _flag_param_file(keys, final["cat"].parent)
        argv = [executable, path_arg(unpacked or image, "image")]
        for key, value in keys.items():
            argv += [f"-{key}", str(value)]
        result = run_tool(argv)
        _check_written(parts, argv, image)
        for kind in SEXTRACTED_ROLES:               # the catalogue last
            os.replace(parts[kind], final[kind])
    finally:
        for path in parts.values():
            path.unlink(missing_ok=True)
        for temporary in (param_copy, unpacked):
            if temporary is not None:
                temporary.unlink(missing_ok=True)
    for line in tool_warnings(result.stderr):
        log.warning("%s: SExtractor: %s", image.name, line)
    return SexOutputs(image, final["cat"], final["nb"], final["rms"], final["seg"],
                      count_objects(final["cat"]), result.seconds)


def check_options(options: SexOptions) -> None:
    """Raise `InputError` for options that would fail every image (checked once, up front)."""
    clash = [k for k in _extra(options) if k in FORCED_KEYS]
    if clash:
        raise InputError(f"SExtractor option(s) {', '.join(clash)} are set by sex_dre and cannot "
                         f"be overridden (the gain: --gain, --gain-key)")
    if str(options.gain).strip().lower() not in ("counts", "cps") and header_key(options.gain) is None:
        resolve_gain({}, options.gain)
    for folder, what in ((options.flags_dir, "flag map"), (options.weights_dir, "weight map")):
        if folder is not None and not Path(folder).is_dir():
            raise InputError(f"{what} directory {folder} does not exist")
    if options.weight_type not in WEIGHT_TYPES:
        raise InputError(f"weight type {options.weight_type!r}: expected one of {', '.join(WEIGHT_TYPES)}")
    _config_files(options)


def _extra(options: SexOptions) -> dict:
    return {str(k).upper().lstrip("-"): v for k, v in options.extra.items()}


def _command_keys(stem: str, gain: float, options: SexOptions) -> dict:
    """Ordered ``KEY -> value`` of the command line (configuration files, gain, maps, overrides)."""
    keys = _config_files(options)
    keys.update(GAIN=f"{gain:.8g}", GAIN_KEY=NO_GAIN_KEY, CATALOG_TYPE="FITS_LDAC",
                CHECKIMAGE_TYPE=CHECKIMAGE_TYPES)
    if options.flag_image is not None:
        keys["FLAG_IMAGE"] = _map_file(options.flag_image, "flag map")
    elif options.flags_dir is not None:
        keys["FLAG_IMAGE"] = _ancillary(options.flags_dir, stem, "_flag.fits", "flag map")
    if options.weight_image is not None or options.weights_dir is not None:
        keys["WEIGHT_TYPE"] = options.weight_type
        keys["WEIGHT_IMAGE"] = (
            _map_file(options.weight_image, "weight map") if options.weight_image is not None
            else _ancillary(options.weights_dir, stem, "_wht.fits", "weight map"))
    keys.update(_extra(options))
    return keys


def _config_files(options: SexOptions) -> dict:
    """``-c``, PARAMETERS_NAME, FILTER_NAME, STARNNW_NAME: given, else shipped, as arguments."""
    return {"c": _file(options.config, "sextractor/dre.sex", "configuration"),
            "PARAMETERS_NAME": _file(options.param, "sextractor/dre.param", "parameter file"),
            "FILTER_NAME": _file(options.filter, "sextractor/default.conv", "filter"),
            "STARNNW_NAME": _file(options.nnw, "sextractor/default.nnw", "neural network file")}


def _file(given, shipped: str, what: str) -> str:
    path = Path(given) if given is not None else config_path(shipped)
    if not path.is_file():
        raise InputError(f"SExtractor {what} {path} does not exist")
    return path_arg(path, f"SExtractor {what}")


def _ancillary(folder, stem: str, suffix: str, what: str) -> str:
    path = Path(folder) / f"{stem}{suffix}"
    if not path.is_file():
        raise InputError(f"{what} for {stem} not found: expected {path}")
    return path_arg(path, what)


def _map_file(path, what: str) -> str:
    if not Path(path).is_file():
        raise InputError(f"{what} {path} not found")
    return path_arg(path, what)


def _flag_param_file(keys: dict, folder: Path) -> Path:
    """A copy of the parameter file with IMAFLAGS_ISO, NIMAFLAGS_ISO (a flag map needs them)."""
    text = Path(keys["PARAMETERS_NAME"]).read_text()
    missing = [p for p in FLAG_PARAMS if p not in param_names(keys["PARAMETERS_NAME"])]
    fd, name = tempfile.mkstemp(prefix=".sex_dre_", suffix=".param", dir=folder)
    with os.fdopen(fd, "w") as fh:
        fh.write(text.rstrip("\n") + "\n" + "".join(f"{p}\n" for p in missing))
    keys["PARAMETERS_NAME"] = path_arg(name, "parameter file copy")
    return Path(name)


def param_names(path) -> set:
    """Column names of a SExtractor parameter file, without ``(N)`` sizes."""
    lines = Path(path).read_text(errors="replace").splitlines()
    return {ln.split()[0].split("(")[0].upper() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")}


def _check_written(parts: dict, argv, image) -> None:
    missing = [str(p) for p in parts.values() if not p.is_file()]
    if missing:
        raise DreError(f"SExtractor exited 0 on {image} but did not write {', '.join(missing)} "
                       f"(command: {' '.join(argv)}); check the configuration's CHECKIMAGE "
                       f"and CATALOG settings")


def count_objects(catalog) -> int:
    """Number of rows over the LDAC_OBJECTS HDUs of a catalogue (headers only)."""
    from astropy.io import fits

    with fits.open(catalog, memmap=False) as hdul:
        return sum(int(h.header.get("NAXIS2", 0)) for h in hdul if h.name == "LDAC_OBJECTS")


def sextract_all(input_dir="Tiles", output_dir="Sextracted", options: SexOptions | None = None):
    """Run SExtractor on every tile of `input_dir`; a failing tile is logged and skipped.

    Returns
    -------
    done : list of SexOutputs
    failed : list of (Path, str)
        The image and the one-line error.
    """
    images = list_tile_images(input_dir)
    options = options or SexOptions()
    check_options(options)                          # what would fail every image fails once, up front
    find_tool("sextractor", options.executable)
    missing = [p for p in NEEDED_PARAMS if p not in param_names(_config_files(options)["PARAMETERS_NAME"])]
    if missing:
        log.warning("parameter file lacks %s: PSFEx or make_cuts will fail on these catalogues",
                    ", ".join(missing))
    def describe(image, out):
        return f"{image.name}: {out.n_objects} objects, {out.seconds:.1f} s -> {out.catalog}"

    return for_each_tile(images, lambda image: run_sextractor(image, output_dir, options), describe, log)
