"""Finding and running the external programs of the preprocessing: SExtractor and PSFEx.

One runner (`run_tool`) starts a program without a shell, records its command line, exit code,
stdout, stderr and wall time, and turns a failure into a `ToolError` that carries all of them;
`find_tool` locates the binaries (configured path, environment variable, then ``PATH``),
`config_path` the configuration files shipped in ``dre_hpc/data``; `read_image_header` and
`unpack_image` make sure an image is one SExtractor can read before it is started.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import tempfile
import time
import warnings
from dataclasses import dataclass
from functools import lru_cache
from importlib.resources import files
from pathlib import Path

from ..errors import InputError, ToolError, ToolNotFoundError

#: Names tried on ``PATH``, in order (Debian calls SExtractor ``source-extractor``).
TOOL_NAMES = {"sextractor": ("source-extractor", "sex", "sextractor"), "psfex": ("psfex",)}
#: Environment variable that names the binary; it wins over ``PATH`` (not over an argument).
TOOL_ENV = {"sextractor": "DRE_SEXTRACTOR", "psfex": "DRE_PSFEX"}
#: What ``<binary> -v`` prints for the real program (``sex`` may be something else entirely).
TOOL_SIGNATURES = {"sextractor": ("sextractor", "source extractor"), "psfex": ("psfex",)}
INSTALL_HINT = ("install it with `apt-get install source-extractor psfex` (Debian/Ubuntu), run "
                "inside the dre_hpc container, or give its path")

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_UNSAFE = re.compile(r"[\s,]")


@dataclass
class ToolResult:
    """What one run of an external program did."""

    command: list
    returncode: int
    stdout: str
    stderr: str
    seconds: float


def find_tool(kind: str, configured=None) -> str:
    """Path of the SExtractor (`kind` 'sextractor') or PSFEx ('psfex') binary.

    Parameters
    ----------
    kind : {'sextractor', 'psfex'}
    configured : str or Path, optional
        A path or command name given by the user; it wins, then the environment variable
        ``DRE_SEXTRACTOR`` / ``DRE_PSFEX``, then the names of `TOOL_NAMES` on ``PATH``
        (each checked with ``-v`` to be the real program).

    Raises
    ------
    ToolNotFoundError
        The configured binary does not exist or is not executable, or no name was found.
    """
    if kind not in TOOL_NAMES:
        raise ValueError(f"unknown tool kind {kind!r}; expected one of {sorted(TOOL_NAMES)}")
    label = "SExtractor" if kind == "sextractor" else "PSFEx"
    for given, source in ((configured, "the configured path"), (os.environ.get(TOOL_ENV[kind]),
                                                                 f"${TOOL_ENV[kind]}")):
        if given:
            return _check_configured(str(given), label, source)
    for name in TOOL_NAMES[kind]:
        path = shutil.which(name)
        if path and _is_genuine(path, TOOL_SIGNATURES[kind]):
            return path
    raise ToolNotFoundError(f"{label} not found: tried {', '.join(TOOL_NAMES[kind])} on PATH "
                            f"(and ${TOOL_ENV[kind]}); {INSTALL_HINT}")


def _check_configured(given: str, label: str, source: str) -> str:
    """`given` (a path, or a bare name looked up on PATH) if it is an executable file."""
    path = given if os.sep in given else (shutil.which(given) or given)
    if not os.path.isfile(path):
        raise ToolNotFoundError(f"{label} binary {given!r} ({source}) does not exist; {INSTALL_HINT}")
    if not os.access(path, os.X_OK):
        raise ToolNotFoundError(f"{label} binary {path} ({source}) is not executable (chmod +x?)")
    return str(path)


@lru_cache(maxsize=None)
def _is_genuine(path: str, signatures: tuple) -> bool:
    """True if ``path -v`` names the expected program."""
    try:
        out = subprocess.run([path, "-v"], capture_output=True, text=True, timeout=10,
                             stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):
        return False
    text = (out.stdout + out.stderr).lower()
    return any(s in text for s in signatures)


def run_tool(argv, cwd=None, log_file=None) -> ToolResult:
    """Run `argv` (no shell), capture its output, raise `ToolError` unless it exits 0.

    Parameters
    ----------
    argv : sequence of str or Path
        The program and its arguments.
    cwd : str or Path, optional
        Working directory of the program.
    log_file : str or Path, optional
        Append the command line, exit code, stdout and stderr here.

    Returns
    -------
    ToolResult
        Terminal escape sequences are removed from stdout and stderr.
    """
    command = [str(a) for a in argv]
    start = time.perf_counter()
    try:
        proc = subprocess.run(command, cwd=cwd, capture_output=True, stdin=subprocess.DEVNULL)
    except OSError as exc:
        raise ToolError(command, 127, f"cannot execute {command[0]}: {exc}") from None
    result = ToolResult(command, proc.returncode, _clean(proc.stdout), _clean(proc.stderr),
                        time.perf_counter() - start)
    if log_file is not None:
        _append_log(log_file, result)
    if result.returncode != 0:
        raise ToolError(command, result.returncode, result.stderr or result.stdout)
    return result


def tool_warnings(text: str) -> list:
    """The warning lines of a SExtractor/PSFEx output, without the leading ``>``."""
    return [line.lstrip("> ").strip() for line in text.splitlines() if "WARNING" in line.upper()]


def path_arg(path, what: str) -> str:
    """`path` as SExtractor/PSFEx can take it on a command line.

    Both programs split file names at blanks and commas (lists of files), so the path is given
    absolute, or relative to the working directory when only that avoids them.

    Raises
    ------
    InputError
        Both forms contain a blank or a comma.
    """
    absolute = os.path.abspath(path)
    for candidate in (absolute, os.path.relpath(absolute)):
        if not _UNSAFE.search(candidate):
            return candidate
    raise InputError(f"{what} {absolute}: SExtractor and PSFEx split file names at blanks and "
                     f"commas; rename it or move it (or run from a directory below which its "
                     f"path has none)")


def config_path(name) -> Path:
    """Path of a configuration file shipped in ``dre_hpc/data``, e.g. ``'sextractor/dre.sex'``."""
    resource = files("dre_hpc").joinpath("data", *Path(name).parts)
    path = Path(str(resource))
    if not path.is_file():
        raise ToolNotFoundError(f"shipped configuration {name} is missing from the dre_hpc "
                                f"package (looked at {path}); reinstall dre_hpc")
    return path


def read_image_header(image) -> dict:
    """Header of the first 2-D image HDU merged over the primary header's keys.

    Raises
    ------
    InputError
        Missing file, not a readable FITS file, truncated, or no 2-D image in it.
    """
    from astropy.io import fits

    image = Path(image)
    if not image.is_file():
        raise InputError(f"image {image} does not exist")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with fits.open(image, memmap=False, lazy_load_hdus=False) as hdul:
                headers = [h.header for h in hdul if h.is_image and h.header.get("NAXIS", 0) >= 2]
                merged = dict(hdul[0].header)
                merged.update(headers[0] if headers else {})
    except Exception as exc:  # astropy raises OSError, ValueError, TypeError... on garbage
        raise InputError(f"image {image} is not a readable FITS file ({exc})") from None
    truncated = [str(w.message) for w in caught if "truncated" in str(w.message)]
    if truncated:
        raise InputError(f"image {image} is truncated ({truncated[0]})")
    if not headers:
        raise InputError(f"image {image} holds no 2-D image HDU")
    return merged


def unpack_image(image, folder) -> Path | None:
    """A plain FITS copy of a tile-compressed image in `folder`, or None if it is not compressed.

    One image HDU gives a single-HDU file (like an uncompressed tile), several a multi-extension
    file in the same order, so SExtractor's EXT_NUMBER is the same as for the uncompressed image.
    """
    from astropy.io import fits

    try:
        with fits.open(image, memmap=False) as hdul:
            if not any(isinstance(h, fits.CompImageHDU) for h in hdul):
                return None
            images = [h for h in hdul if h.is_image and h.header.get("NAXIS", 0) >= 2]
            hdus = ([fits.PrimaryHDU(images[0].data, images[0].header)] if len(images) == 1 else
                    [fits.PrimaryHDU(header=hdul[0].header)]
                    + [fits.ImageHDU(h.data, h.header) for h in images])
    except Exception as exc:  # astropy raises OSError, ValueError, zlib errors... on bad data
        raise InputError(f"image {image} cannot be decompressed ({exc})") from None
    fd, name = tempfile.mkstemp(prefix=f".{Path(image).name.split('.')[0]}_", suffix=".fits", dir=folder)
    os.close(fd)
    try:
        fits.HDUList(hdus).writeto(name, overwrite=True)
    except OSError as exc:
        os.unlink(name)
        raise InputError(f"cannot write the unpacked copy of {image} to {name} ({exc})") from None
    return Path(name)


def _clean(raw: bytes) -> str:
    """Decoded text without terminal control sequences or carriage returns."""
    text = raw.decode("utf-8", errors="replace").replace("\r", "\n")
    return _ANSI.sub("", text)


def _append_log(log_file, result: ToolResult) -> None:
    with open(log_file, "a", encoding="utf-8") as fh:
        fh.write(f"$ {shlex.join(result.command)}\n# exit code {result.returncode}, "
                 f"{result.seconds:.2f} s\n")
        for label, text in (("stdout", result.stdout), ("stderr", result.stderr)):
            if text.strip():
                fh.write(f"# {label}:\n{text.rstrip()}\n")
