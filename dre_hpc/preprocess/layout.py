"""The original DRE working-directory layout: which files are tiles, where a tile's products go.

``Tiles/<img>.fits`` -> ``Sextracted/[<img>/]<img>_{cat,nb,rms,seg}.fits`` -> ``PSF/<img>.psf``
-> ``Cuts/<img>_cuts.h5``. The optional ``<img>/`` level is the ``--subdir`` layout.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import InputError
from ..models.psf import image_stem

TILE_SUFFIXES = (".fits", ".fit", ".fts", ".fits.fz", ".fits.gz")
SEXTRACTED_ROLES = ("cat", "nb", "rms", "seg")


def list_tile_images(tiles_dir) -> list:
    """FITS images of a tiles directory (sorted); an error when there is none."""
    tiles = Path(tiles_dir)
    if tiles.is_file():
        return [tiles]
    if not tiles.is_dir():
        raise InputError(f"tiles directory {tiles} does not exist")
    images = sorted(p for p in tiles.iterdir()
                    if p.is_file() and p.name.lower().endswith(TILE_SUFFIXES))
    if not images:
        raise InputError(f"no FITS images ({', '.join('*' + s for s in TILE_SUFFIXES)}) in {tiles}")
    return images


def sextracted_base(sextracted_dir, name: str, subdir: bool | None = None) -> Path:
    """``<dir>/<name>/<name>`` (subdir layout) or ``<dir>/<name>``; None: whichever exists."""
    nested = Path(sextracted_dir) / name
    if subdir is None:
        subdir = nested.is_dir()
    return nested / name if subdir else Path(sextracted_dir) / name


def sextracted_files(sextracted_dir, name: str, subdir: bool | None = None) -> dict:
    """Paths of a tile's SExtractor products by role (cat, nb, rms, seg)."""
    base = sextracted_base(sextracted_dir, name, subdir)
    return {role: base.with_name(f"{base.name}_{role}.fits") for role in SEXTRACTED_ROLES}


def tile_name(image) -> str:
    """The ``<img>`` of a tile image path."""
    return image_stem(image)
