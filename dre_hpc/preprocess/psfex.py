"""PSFEx on the SExtractor catalogues: one ``PSF/<img>.psf`` per tile for dre.

PSFEx names its output after the catalogue (``<img>_cat.psf``); it writes into a private
temporary directory inside the output directory and the file is renamed to ``<img>.psf`` only
after it was checked: at least one ``PSF_DATA`` HDU with ``ACCEPTED > 0``, and every HDU with
``PSF_SAMP == 1`` (the image pixel grid, what dre needs). Plots, check images and the XML report
are always switched off on the command line, whatever the configuration says.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from ..errors import DreError, InputError, PSFError
from ..models.psf import SAMPLING_TOLERANCE, image_stem
from .tools import config_path, find_tool, path_arg, run_tool, tool_warnings

log = logging.getLogger(__name__)

CATALOG_SUFFIX = "_cat.fits"
#: Forced on the command line: no plots (PLPLOT errors), no check images, no XML.
FORCED = {"CHECKPLOT_DEV": "NULL", "CHECKPLOT_TYPE": "NONE", "CHECKIMAGE_TYPE": "NONE",
          "WRITE_XML": "N", "PSF_SUFFIX": ".psf"}


def catalog_stem(catalog) -> str:
    """``<img>`` of ``<img>_cat.fits`` (other names: the name without FITS suffixes)."""
    name = Path(catalog).name
    return name[: -len(CATALOG_SUFFIX)] if name.endswith(CATALOG_SUFFIX) else image_stem(name)


def run_psfex(catalog, output_dir="PSF", config=None, executable=None) -> Path:
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
    config = Path(config) if config is not None else config_path("psfex/dre.psfex")
    if not config.is_file():
        raise InputError(f"PSFEx configuration {config} does not exist")
    executable = find_tool("psfex", executable)
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
        result = run_tool(argv)
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
                       f"too few unsaturated point sources with S/N above SAMPLE_MINSN and FWHM in "
                       f"SAMPLE_FWHMRANGE{_summary(report)}")
    for ext, (h, n) in enumerate(zip(headers, accepted), 1):
        samp = float(h.get("PSF_SAMP", 0.0))
        if abs(samp - 1.0) > SAMPLING_TOLERANCE:
            raise PSFError(f"PSFEx PSF for {catalog} (extension {ext}) has PSF_SAMP = {samp:g}, "
                           f"not 1: set PSF_SAMPLING 1.0 in the PSFEx configuration")
        if n <= 0:
            log.warning("%s: extension %d: PSFEx accepted no star", catalog, ext)
    return accepted


def _summary(report: str) -> str:
    """PSFEx's 'accepted/total' table line(s), when present, for error messages."""
    lines = [ln.strip() for ln in report.splitlines() if "/" in ln and ".fits" in ln]
    return f" (PSFEx: {'; '.join(lines[-3:])})" if lines else ""


def list_catalogs(input_dir) -> list:
    """Sorted ``*_cat.fits`` of `input_dir` and its subdirectories (``--subdir`` layout)."""
    folder = Path(input_dir)
    if not folder.is_dir():
        raise InputError(f"catalogue directory {folder} does not exist (run sex_dre first, or "
                         f"give -i DIR)")
    found = sorted(set(folder.glob(f"*{CATALOG_SUFFIX}")) | set(folder.glob(f"*/*{CATALOG_SUFFIX}")))
    if not found:
        raise InputError(f"no SExtractor catalogues (*{CATALOG_SUFFIX}) in {folder} or its "
                         f"subdirectories")
    return found


def psfex_all(input_dir="Sextracted", output_dir="PSF", config=None, executable=None):
    """Run PSFEx on every catalogue of `input_dir`; a failing catalogue is logged and skipped.

    Returns
    -------
    done : list of Path
        The ``.psf`` files written.
    failed : list of (Path, str)
        The catalogue and the one-line error.
    """
    catalogs = list_catalogs(input_dir)
    executable = find_tool("psfex", executable)       # a missing program fails once, up front
    done, failed = [], []
    for k, catalog in enumerate(catalogs, 1):
        try:
            psf = run_psfex(catalog, output_dir, config, executable)
        except DreError as exc:
            log.error("(%d/%d) %s: failed: %s", k, len(catalogs), catalog.name, exc)
            failed.append((catalog, str(exc)))
            continue
        log.info("(%d/%d) %s -> %s", k, len(catalogs), catalog.name, psf)
        done.append(psf)
    return done, failed
