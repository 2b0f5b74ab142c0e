"""The PSF of one tile in its prep: the user's, PSFEx's, or the fallback; and the record of which.

`tile_psf` writes the tile's PSF product (``tiles/<tile>/PSF/<tile>.psf``, whatever its format:
`read_psf` tells a PSFEx file from a FITS image by its content) and returns what the prep done
marker records under ``psf``: ``source`` (``user``, ``psfex``, ``fallback`` or ``none``) with the
file it came from, PSFEx's accepted stars, or why PSFEx was not enough. The fit jobs' table headers
(``PSFSRC``), collate's TILES extension and the report repeat it.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import PSFError
from ..preprocess.psfex import accepted_stars, run_psfex
from .tile_inputs import install_psf

SOURCES = ("user", "psfex", "fallback", "none")
HINT = ("set prep.psf_fallback to a PSF file for such tiles, or give the tile's PSF (prep.psf, or "
        "psf=PATH on its line of the tiles file)")


def tile_psf(config, paths: dict, own_psf, origin, n_objects: int, measured=None) -> dict:
    """Write the tile's PSF product (`paths` from `prep_job.tile_products`) and return its record.

    `own_psf`, `origin`: the user's PSF and the option that gave it (`tile_inputs.user_psf`), or
    None: PSFEx runs on the catalogue, and where it accepts no star (or its PSF fails the checks)
    ``prep.psf_fallback`` is used; without one a `PSFError` names both options. A tile without an
    object to fit (`n_objects` 0) needs no PSF: none is written. `measured`: the PSF PSFEx already
    wrote there (it measured the seeing, `seeing.tile_seeing`).
    """
    prep = config["prep"]
    if measured is not None:            # PSFEx already ran (it measured the seeing)
        return {"source": "psfex", "stars": accepted_stars(measured)}
    if not n_objects:
        return {"source": "none", "reason": "no object to fit"}
    if own_psf is not None:
        install_psf(own_psf, paths["psf"], origin)
        return {"source": "user", "file": str(own_psf), "origin": origin}
    try:
        psf = run_psfex(paths["catalog"], paths["psf_dir"], config=prep["psfex_config"])
    except PSFError as exc:
        if prep["psf_fallback"] is None:
            raise PSFError(f"{exc}; {HINT}") from None
        install_psf(prep["psf_fallback"], paths["psf"], "prep.psf_fallback")
        return {"source": "fallback", "file": str(Path(prep["psf_fallback"])), "reason": str(exc)}
    return {"source": "psfex", "stars": accepted_stars(psf)}
