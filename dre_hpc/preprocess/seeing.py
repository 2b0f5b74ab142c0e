"""The seeing of a tile for SExtractor's star/galaxy separation (``SEEING_FWHM``, CLASS_STAR).

SExtractor's neural network gives CLASS_STAR near 1 to point sources only when ``SEEING_FWHM``
is the tile's real stellar FWHM. `tile_seeing` finds it, in pixels, from one of:

- ``auto``: the stellar locus of a first SExtractor pass (`psfex.locus_fwhm`: the most compact
  tight group of bright, round, unflagged sources; CLASS_STAR plays no part in it), else the FWHM
  of the PSF the tile will use (the user's or the fallback, else PSFEx's from the first pass: a
  crowded field has stars but no tight locus), else the configuration's value;
- a number of pixels; ``header:KEY`` (pixels) from the image header;
- ``config``: the SExtractor configuration's own SEEING_FWHM.

`seeing_keys` turns it into command-line keys: ``PIXEL_SCALE 1`` makes SEEING_FWHM a pixel value.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .header_keys import header_key, header_number


def psf_fwhm(path, sub: int = 5) -> float:
    """FWHM in pixels of a PSF file (``.psf`` or FITS image) as SExtractor measures it for stars:
    twice the radius holding half the flux (exact for a Gaussian), each pixel split into
    `sub` x `sub` parts so that the radius is not a whole pixel."""
    from ..models.psf import read_psf

    psf = read_psf(path)
    fine = np.repeat(np.repeat(psf, sub, axis=0), sub, axis=1) / sub ** 2
    y, x = (np.indices(fine.shape, dtype=float) + 0.5) / sub
    total = fine.sum()
    cy, cx = (fine * y).sum() / total, (fine * x).sum() / total
    radius = np.hypot(y - cy, x - cx).ravel()
    order = np.argsort(radius)
    cumulative = np.cumsum(fine.ravel()[order]) / total
    return float(2.0 * np.interp(0.5, cumulative, radius[order]))


def tile_seeing(setting, header, source, first_pass=None, psf=None, psfex_config=None,
                psfex=None) -> dict:
    """``{"fwhm_pixels", "source"}`` of a tile (fwhm None: keep the configuration's value).

    Parameters
    ----------
    setting : 'auto', 'config', float or 'header:KEY'
        ``prep.seeing``.
    header : mapping
        The image header (for ``header:KEY``).
    source : str or Path
        The image, named in errors.
    first_pass : callable, optional
        Returns a catalogue of the tile (a first SExtractor pass); called only for ``auto``.
    psf : str or Path, optional
        The PSF the tile will use when not PSFEx's (``auto`` without a stellar locus).
    psfex_config : str or Path, optional
        Its SAMPLE_* settings select the locus candidates.
    psfex : callable, optional
        ``psfex(catalog)``: a PSFEx PSF of the tile, or None; tried for ``auto`` when there is no
        locus (a crowded field) and no `psf`.
    """
    from .psfex import locus_fwhm

    if setting == "config":
        return {"fwhm_pixels": None, "source": "config"}
    key = header_key(setting)
    if key is not None:
        return {"fwhm_pixels": header_number(header, key, source, "prep.seeing"), "source": setting}
    if setting != "auto":
        return {"fwhm_pixels": float(setting), "source": "prep.seeing"}
    catalog = first_pass() if first_pass is not None else None
    found = locus_fwhm(catalog, psfex_config) if catalog is not None else None
    if found is not None:
        return {"fwhm_pixels": round(found[0], 4), "source": f"stellar locus ({found[1]} stars)"}
    if psf is None and psfex is not None and catalog is not None:
        psf = psfex(catalog)
    if psf is not None:
        return {"fwhm_pixels": round(psf_fwhm(psf), 4), "source": f"PSF {Path(psf).name}"}
    return {"fwhm_pixels": None, "source": "config (no stellar locus, no PSF)"}


def seeing_keys(seeing: dict) -> dict:
    """SExtractor command-line keys that set the seeing of `seeing` (none to keep the config's)."""
    fwhm = seeing.get("fwhm_pixels")
    return {} if fwhm is None else {"PIXEL_SCALE": "1.0", "SEEING_FWHM": f"{fwhm:.4g}"}
