"""The original DRE working-directory layout: which files are tiles, where a tile's products go.

``Tiles/<img>.fits`` -> ``Sextracted/[<img>/]<img>_{cat,nb,rms,seg}.fits`` -> ``PSF/<img>.psf``
-> ``Cuts/<img>_cuts.h5``. The optional ``<img>/`` level is the ``--subdir`` layout.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import DreError, InputError
from ..models.psf import image_stem

TILE_PATTERNS = ("*.fits", "*.fit", "*.fits.fz")
ANCILLARY_SUFFIXES = ("_flag", "_wht")          # flag and weight maps beside the tiles
SEXTRACTED_ROLES = ("nb", "rms", "seg", "cat")      # the catalogue last: written last, it means done


def list_tile_images(tiles_dir) -> list:
    """Sorted tiles of a directory (``*.fits``, ``*.fit``, ``*.fits.fz``, without ``*_flag`` and
    ``*_wht`` maps), or the one file given; an error when there is none."""
    folder = Path(tiles_dir)
    if folder.is_file():
        return [folder]
    if not folder.is_dir():
        raise InputError(f"input directory {folder} does not exist (give -i DIR with the tiles)")
    found = {p for pattern in TILE_PATTERNS for p in folder.glob(pattern) if p.is_file()}
    images = sorted(p for p in found if not image_stem(p).endswith(ANCILLARY_SUFFIXES))
    if not images:
        raise InputError(f"no images ({', '.join(TILE_PATTERNS)}; *_flag/*_wht skipped) in {folder}")
    return images


def for_each_tile(items, work, describe, logger) -> tuple:
    """``work(item)`` for every tile (image or catalogue); a tile whose work raises a `DreError` or
    an `OSError` is logged in one line and skipped, the others go on.

    ``describe(item, result)`` gives the text of the success line. Returns ``(results, failed)``
    with ``failed`` a list of ``(item, message)``.
    """
    done, failed = [], []
    for k, item in enumerate(items, 1):
        try:
            result = work(item)
        except (DreError, OSError) as exc:      # OSError: e.g. an unwritable output
            logger.error("(%d/%d) %s: failed: %s", k, len(items), Path(item).name, exc)
            failed.append((item, str(exc)))
            continue
        logger.info("(%d/%d) %s", k, len(items), describe(item, result))
        done.append(result)
    return done, failed


def sextracted_base(sextracted_dir, name: str, subdir: bool | None = None) -> Path:
    """``<dir>/<name>/<name>`` (subdir layout) or ``<dir>/<name>``; None: whichever exists."""
    nested = Path(sextracted_dir) / name
    if subdir is None:
        subdir = nested.is_dir()
    return nested / name if subdir else Path(sextracted_dir) / name


def sextracted_files(sextracted_dir, name: str, subdir: bool | None = None) -> dict:
    """Paths of a tile's SExtractor products by role (nb, rms, seg, cat: in this order)."""
    base = sextracted_base(sextracted_dir, name, subdir)
    return {role: base.with_name(f"{base.name}_{role}.fits") for role in SEXTRACTED_ROLES}


def tile_name(image) -> str:
    """The ``<img>`` of a tile image path."""
    return image_stem(image)
