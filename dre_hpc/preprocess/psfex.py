"""PSFEx on the SExtractor catalogues: one ``PSF/<img>.psf`` per tile for dre.

PSFEx names its output after the catalogue (``<img>_cat.psf``); it writes into a private
temporary directory inside the output directory and the file is renamed to ``<img>.psf`` only
after it was checked: at least one ``PSF_DATA`` HDU with ``ACCEPTED > 0``, and every HDU with
``PSF_SAMP == 1`` (the image pixel grid, what dre needs). Plots, check images and the XML report
are always switched off on the command line, whatever the configuration says.

Star selection
--------------
PSFEx's own automatic selection (``SAMPLE_AUTOSELECT Y``) takes the densest quarter of the
candidates' FWHM (2 x FLUX_RADIUS) distribution as the stellar locus. In a galaxy-dominated tile
(1,000 galaxies, 60 stars) that quarter is made of galaxies and the PSF comes out 40 % too wide.
With ``select='locus'`` (the default) the stars are found here instead: among the candidates that
pass the configuration's SAMPLE_MINSN (on SNR_WIN), SAMPLE_MAXELLIP and SAMPLE_FWHMRANGE and have
FLAGS 0, the stellar locus is the smallest-FWHM group of `LOCUS_MIN` candidates within
`LOCUS_SPREAD` of each other (stars are the most compact sources, galaxies are PSF-convolved and
wider); its median FWHM m gives PSFEx the range ``m / (1+v)**(1/3) .. m * (1+v)**(2/3)`` (v =
SAMPLE_VARIABILITY, the range PSFEx itself derives from its mode) with ``SAMPLE_AUTOSELECT N``.
Without such a group, or when the configuration says ``SAMPLE_AUTOSELECT N``, PSFEx selects.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np

from ..errors import DreError, InputError, PSFError
from ..io.catalog import read_catalog
from ..models.psf import SAMPLING_TOLERANCE, image_stem
from .layout import for_each_tile
from .tools import config_path, find_tool, path_arg, run_tool, tool_warnings

log = logging.getLogger(__name__)

CATALOG_SUFFIX = "_cat.fits"
#: Forced on the command line: no plots (PLPLOT errors), no check images, no XML.
FORCED = {"CHECKPLOT_DEV": "NULL", "CHECKPLOT_TYPE": "NONE", "CHECKIMAGE_TYPE": "NONE",
          "WRITE_XML": "N", "PSF_SUFFIX": ".psf"}
SELECT_MODES = ("locus", "psfex")
#: PSFEx 3.21's defaults of the sample-selection keys a configuration may omit.
SAMPLE_DEFAULTS = {"SAMPLE_AUTOSELECT": "Y", "SAMPLE_MINSN": "20", "SAMPLE_MAXELLIP": "0.3",
                   "SAMPLE_FWHMRANGE": "2.0,10.0", "SAMPLE_VARIABILITY": "0.2"}
#: The stellar locus: the smallest-FWHM group of LOCUS_MIN candidates within 1 + LOCUS_SPREAD.
LOCUS_MIN, LOCUS_SPREAD = 5, 0.05


def catalog_stem(catalog) -> str:
    """``<img>`` of ``<img>_cat.fits`` (other names: the name without FITS suffixes)."""
    name = Path(catalog).name
    return name[: -len(CATALOG_SUFFIX)] if name.endswith(CATALOG_SUFFIX) else image_stem(name)


def run_psfex(catalog, output_dir="PSF", config=None, executable=None, select="locus") -> Path:
    """Run PSFEx on one FITS_LDAC catalogue and return ``<output_dir>/<img>.psf``.

    Parameters
    ----------
    catalog : str or Path
        ``Sextracted/[<img>/]<img>_cat.fits``.
    output_dir : str or Path
    config : str or Path, optional
        PSFEx configuration (default: the shipped ``dre.psfex``).
    executable : str, optional
        PSFEx binary (default: `find_tool`).
    select : {'locus', 'psfex'}
        Who picks the stars: the stellar locus found here (see the module docstring) or PSFEx's
        own automatic selection.

    Raises
    ------
    InputError
        Missing catalogue or configuration.
    PSFError
        PSFEx accepted no star, or the PSF is not sampled at the image pixel scale.
    ToolNotFoundError, ToolError
        PSFEx missing or failing.
    """
    catalog = Path(catalog)
    if not catalog.is_file():
        raise InputError(f"catalogue {catalog} does not exist")
    config = checked_config(config, select)
    executable = find_tool("psfex", executable)
    sample_args = _selection_args(catalog, config) if select == "locus" else []
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    stem = catalog_stem(catalog)
    final = output_dir / f"{stem}.psf"
    final.unlink(missing_ok=True)            # a failed run must not leave an older PSF behind
    work = Path(tempfile.mkdtemp(prefix=f".psfex_{stem}_", dir=output_dir))
    try:
        argv = [executable, path_arg(catalog, "catalogue"), "-c", path_arg(config, "PSFEx configuration"),
                "-PSF_DIR", path_arg(work, "output directory")]
        for key, value in FORCED.items():
            argv += [f"-{key}", value]
        result = run_tool(argv + sample_args)
        written = work / f"{catalog.name.rsplit('.', 1)[0]}.psf"
        if not written.is_file():
            raise DreError(f"PSFEx exited 0 on {catalog} but wrote no {written.name} "
                           f"(command: {' '.join(argv)})")
        check_psf(written, catalog, result.stderr)
        os.replace(written, final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for line in tool_warnings(result.stderr):
        log.warning("%s: PSFEx: %s", catalog.name, line)
    return final


def checked_config(config, select: str = "locus") -> Path:
    """The PSFEx configuration to use (default: shipped); `InputError` if missing or bad `select`."""
    config = Path(config) if config is not None else config_path("psfex/dre.psfex")
    if not config.is_file():
        raise InputError(f"PSFEx configuration {config} does not exist")
    if select not in SELECT_MODES:
        raise InputError(f"star selection {select!r}: expected one of {', '.join(SELECT_MODES)}")
    return config


def read_config(path) -> dict:
    """``KEY -> value`` of a PSFEx/SExtractor configuration file (comments dropped)."""
    values = {}
    for line in Path(path).read_text(errors="replace").splitlines():
        words = line.split("#", 1)[0].split(None, 1)
        if words:
            values[words[0].upper()] = words[1].strip() if len(words) > 1 else ""
    return values


def star_fwhm_range(catalog, settings=None, with_mode=False):
    """FWHM range (pixels, 2 x FLUX_RADIUS) of the stars of a catalogue, or None if not found.

    Parameters
    ----------
    catalog : str or Path
        FITS_LDAC catalogue (every LDAC_OBJECTS HDU is used).
    settings : dict, optional
        SAMPLE_* values (strings, as in a configuration file); missing ones: `SAMPLE_DEFAULTS`.
    with_mode : bool
        Also return the locus's median FWHM.

    Returns
    -------
    (low, high, n_stars[, mode]) or None
    """
    conf = {**SAMPLE_DEFAULTS, **(settings or {})}
    try:
        minsn, maxellip, variability = (float(conf[k]) for k in
                                        ("SAMPLE_MINSN", "SAMPLE_MAXELLIP", "SAMPLE_VARIABILITY"))
        low, high = (float(v) for v in conf["SAMPLE_FWHMRANGE"].split(","))
    except ValueError:
        raise InputError(f"PSFEx SAMPLE_* settings {conf} are not numbers") from None
    fwhm = _candidate_fwhm(catalog, minsn, maxellip, low, high)
    n = len(fwhm) - LOCUS_MIN + 1
    tight = fwhm[LOCUS_MIN - 1:] <= fwhm[:max(n, 0)] * (1 + LOCUS_SPREAD) if n > 0 else []
    if not np.any(tight):
        return None
    start = int(np.argmax(tight))
    step = (1.0 + variability) ** (1.0 / 3.0)
    mode = np.median(fwhm[start:start + LOCUS_MIN])
    mode = np.median(fwhm[(fwhm >= mode / step) & (fwhm <= mode * step ** 2)])   # all of the locus
    lo, hi = max(mode / step, low), min(mode * step ** 2, high)
    found = lo, hi, int(np.count_nonzero((fwhm >= lo) & (fwhm <= hi)))
    return (*found, float(mode)) if with_mode else found


def locus_fwhm(catalog, config=None):
    """``(FWHM, n)``: the median FWHM (pixels, 2 x FLUX_RADIUS) of the stellar locus of a
    catalogue and its candidate count, with the SAMPLE_* settings of the PSFEx configuration
    `config` (default: shipped); None without a locus."""
    settings = {k: v for k, v in read_config(checked_config(config)).items() if k.startswith("SAMPLE_")}
    found = star_fwhm_range(catalog, settings, with_mode=True)
    return None if found is None else (found[3], found[2])


def _candidate_fwhm(catalog, minsn, maxellip, low, high) -> np.ndarray:
    """Sorted 2 x FLUX_RADIUS of the unflagged, round, bright catalogue sources within range."""
    data = read_catalog(catalog)                      # every LDAC_OBJECTS HDU, stacked
    names = set(data.colnames)
    if not {"FLUX_RADIUS", "ELONGATION", "FLAGS"} <= names:
        raise InputError(f"catalogue {catalog} lacks FLUX_RADIUS, ELONGATION or FLAGS")
    if not len(data):
        return np.zeros(0)
    first = (lambda name: np.asarray(data[name], float).reshape(len(data), -1)[:, 0])
    snr = first("SNR_WIN") if "SNR_WIN" in names else first("FLUX_APER") / first("FLUXERR_APER")
    fwhm = 2.0 * first("FLUX_RADIUS")
    keep = ((np.asarray(data["FLAGS"]) == 0) & (snr > minsn) & (fwhm >= low) & (fwhm < high)
            & (np.asarray(data["ELONGATION"]) < (1 + maxellip) / (1 - maxellip)))
    return np.sort(fwhm[keep])


def _selection_args(catalog: Path, config: Path) -> list:
    """``-SAMPLE_AUTOSELECT N -SAMPLE_FWHMRANGE lo,hi`` from the stellar locus, or nothing."""
    settings = {k: v for k, v in read_config(config).items() if k.startswith("SAMPLE_")}
    if settings.get("SAMPLE_AUTOSELECT", "Y").upper().startswith("N"):
        return []                                # the configuration gives the range itself
    found = star_fwhm_range(catalog, settings)
    if found is None:
        log.warning("%s: no stellar locus (%d sources within %.0f %% in FWHM) found; PSFEx selects "
                    "the stars itself", catalog.name, LOCUS_MIN, 100 * LOCUS_SPREAD)
        return []
    low, high, count = found
    log.debug("%s: stellar locus FWHM %.2f-%.2f px, %d candidates", catalog.name, low, high, count)
    return ["-SAMPLE_AUTOSELECT", "N", "-SAMPLE_FWHMRANGE", f"{low:.3f},{high:.3f}"]


def check_psf(path, catalog, report: str = "") -> list:
    """ACCEPTED of each PSF_DATA HDU; PSFError unless one has stars and all have PSF_SAMP 1."""
    from astropy.io import fits

    with fits.open(path, memmap=False) as hdul:
        headers = [h.header for h in hdul if h.name == "PSF_DATA"]
    if not headers:
        raise PSFError(f"PSFEx wrote no PSF_DATA HDU for {catalog}")
    accepted = [int(h.get("ACCEPTED", 0)) for h in headers]
    if max(accepted) <= 0:
        loaded = [int(h.get("LOADED", 0)) for h in headers]
        raise PSFError(f"PSFEx accepted no star in {catalog} (loaded {sum(loaded)} candidates); "
                       f"too few unflagged point sources with S/N above SAMPLE_MINSN, ellipticity "
                       f"below SAMPLE_MAXELLIP and FWHM in SAMPLE_FWHMRANGE{_summary(report)}")
    for ext, (h, n) in enumerate(zip(headers, accepted), 1):
        samp = float(h.get("PSF_SAMP", 0.0))
        if abs(samp - 1.0) > SAMPLING_TOLERANCE:
            raise PSFError(f"PSFEx PSF for {catalog} (extension {ext}) has PSF_SAMP = {samp:g}, "
                           f"not 1: set PSF_SAMPLING 1.0 in the PSFEx configuration")
        if n <= 0:
            log.warning("%s: extension %d: PSFEx accepted no star", catalog, ext)
    return accepted


def accepted_stars(psf) -> int:
    """Total ACCEPTED over the PSF_DATA HDUs of a ``.psf`` file."""
    from astropy.io import fits

    with fits.open(psf, memmap=False) as hdul:
        return sum(int(h.header.get("ACCEPTED", 0)) for h in hdul if h.name == "PSF_DATA")


def _summary(report: str) -> str:
    """PSFEx's 'accepted/total' table line(s), when present, for error messages."""
    lines = [ln.strip().lstrip("> ") for ln in report.splitlines()
             if re.search(r"\s\d+/\d+\s", ln) or "WARNING" in ln.upper()]
    lines = list(dict.fromkeys(lines))[-3:]
    return f" (PSFEx: {'; '.join(lines)})" if lines else ""


def list_catalogs(input_dir) -> list:
    """Sorted ``*_cat.fits`` of `input_dir` and its subdirectories (``--subdir`` layout)."""
    folder = Path(input_dir)
    if not folder.is_dir():
        raise InputError(f"catalogue directory {folder} does not exist (run sex_dre first, or "
                         f"give -i DIR)")
    found = {}
    for path in sorted(folder.glob(f"*{CATALOG_SUFFIX}")) + sorted(folder.glob(f"*/*{CATALOG_SUFFIX}")):
        stem = catalog_stem(path)
        if stem in found:              # like dre_hpc.io.catalog.find_catalog: the subdirectory wins
            log.warning("two catalogues for %s: %s and %s; using the second", stem, found[stem], path)
        found[stem] = path
    if not found:
        raise InputError(f"no SExtractor catalogues (*{CATALOG_SUFFIX}) in {folder} or its "
                         f"subdirectories")
    return [found[stem] for stem in sorted(found)]


def psfex_all(input_dir="Sextracted", output_dir="PSF", config=None, executable=None, select="locus"):
    """Run PSFEx on every catalogue of `input_dir`; a failing catalogue is logged and skipped.

    Returns
    -------
    done : list of Path
        The ``.psf`` files written.
    failed : list of (Path, str)
        The catalogue and the one-line error.
    """
    catalogs = list_catalogs(input_dir)
    config = checked_config(config, select)           # what would fail every catalogue fails once,
    executable = find_tool("psfex", executable)       # up front
    def work(catalog):
        return run_psfex(catalog, output_dir, config, executable, select)

    def describe(catalog, psf):
        return f"{catalog.name} -> {psf}: {accepted_stars(psf)} stars accepted"

    return for_each_tile(catalogs, work, describe, log)
