"""``make_cuts`` over a working directory: every tile's cuts file and its integrity report.

For ``Tiles/<img>.fits`` with SExtractor products in ``Sextracted/[<img>/]<img>_*.fits`` it writes
``Cuts/<img>_cuts.h5`` (stacked layout by default, or the original's ``--layout dre``) and
``Cuts/<img>_cuts.json``: counts of selected and rejected objects and of each integrity flag, and
the ids of flagged objects (kept in the cuts file with their flags, never dropped). A tile that
fails is reported and the others are still cut.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .. import __version__
from ..errors import InputError
from ..flags import CutFlag
from ..io.catalog import read_catalog
from ..io.cuts import write_cuts
from ..models.psf import psf_path_for_image
from .cuts import CutsOptions, TileImages, cut_objects, ext_numbers, select_objects
from .layout import for_each_tile, list_tile_images, sextracted_files, tile_name
from .neighbours import subtract_neighbours

log = logging.getLogger(__name__)


def tile_inputs(image, sextracted_dir) -> dict:
    """The tile image and its SExtractor products; an error naming the first missing one."""
    name = tile_name(image)
    paths = {"image": Path(image), **sextracted_files(sextracted_dir, name)}
    for role, path in paths.items():
        if not path.is_file():
            raise InputError(f"{path} does not exist (the {role} file of tile {name}); "
                             "run sex_dre on the tile first")
    return paths


@dataclass(frozen=True)
class NeighbourOptions:
    """A second pass (`neighbours`): the first fit's summaries (``<summaries>/<img>_dre.fits``), the
    PSF they were fitted with (``dre --psf``: a file, or a directory of ``<img>.psf``) and
    whether it holds the pixel response (``dre --psf-pixel``)."""

    summaries: str
    psf: str = "PSF"
    psf_has_pixel: bool = True

    def inputs(self, name: str) -> tuple:
        """The tile's first-pass summary and PSF files; an error naming a missing one."""
        summary = Path(self.summaries) / f"{name}_dre.fits"
        if not summary.is_file():
            raise InputError(f"--neighbours: {summary} does not exist (the first pass's fit of tile {name}); "
                             f"run dre on the tile's cuts with -o {self.summaries} first")
        return summary, psf_path_for_image(self.psf, name)


def cut_tile(image, sextracted_dir, output_dir, options: CutsOptions, maps=None, neighbours=None) -> dict:
    """Cut one tile; write ``<output>/<img>_cuts.h5`` and its JSON report; return the report.

    `maps`: ``{"weight": path, "flags": path}`` (either may be None): pixels whose weight is not
    a positive finite number, or whose flag is not 0, are left out of every object's mask.
    `neighbours`: a `NeighbourOptions` to cut with the first fit's models of the neighbours
    subtracted (`neighbours.subtract_neighbours`)."""
    start = time.perf_counter()
    paths = tile_inputs(image, sextracted_dir)
    second = neighbours.inputs(tile_name(image)) if neighbours is not None else None
    extra = {role: Path(p) for role, p in (maps or {}).items() if p is not None}
    table = read_catalog(paths["cat"])
    for column in ("X_IMAGE", "Y_IMAGE"):
        if column not in table.colnames:
            raise InputError(f"catalogue {paths['cat']}: no {column} column")
    images = TileImages({**{k: v for k, v in paths.items() if k != "cat"}, **extra})
    try:
        selection = select_objects(table, images.shapes(ext_numbers(table)), options)
        cuts = cut_objects(table, selection.rows, images, options)
        if second is not None:
            second = subtract_neighbours(cuts, images, *second, neighbours.psf_has_pixel)
    finally:
        images.close()
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    name = tile_name(image)
    cuts_path = output / f"{name}_cuts.h5"
    write_cuts(cuts_path, cuts, layout=options.layout, compression=options.compression)
    report = integrity_report(name, {**paths, **extra}, table, selection, cuts, options,
                              time.perf_counter() - start)
    report["cuts_file"] = str(cuts_path)
    if second is not None:
        report["neighbours"] = second
    _write_json(output / f"{name}_cuts.json", report)
    return report


def integrity_report(name, paths, table, selection, cuts, options, seconds) -> dict:
    """What was selected, cut and flagged in one tile (the JSON report's content)."""
    flags = cuts.objects["CUT_FLAGS"]
    flagged = np.flatnonzero(flags)
    return {
        "tile": name,
        "inputs": {role: str(path) for role, path in paths.items()},
        "catalogue_objects": len(table),
        "rejected": selection.rejected,
        "cut": len(cuts),
        "flag_counts": {f.name: int(np.count_nonzero(flags & int(f))) for f in CutFlag},
        "flagged_objects": [{"EXT_NUMBER": int(cuts.objects["EXT_NUMBER"][i]),
                             "NUMBER": int(cuts.objects["NUMBER"][i]),
                             "flags": [f.name for f in CutFlag if flags[i] & int(f)]} for i in flagged],
        "options": {k: (list(map(list, v)) if k == "filters" else v) for k, v in asdict(options).items()},
        "dre_hpc_version": __version__,
        "seconds": round(seconds, 3),
    }


def _write_json(path: Path, content: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(content, indent=1) + "\n")
    tmp.replace(path)


def cut_all_tiles(tiles_dir, sextracted_dir, output_dir, options: CutsOptions, neighbours=None) -> tuple:
    """Cut every tile; returns (reports, failed) where failed are ``(image, message)``."""
    return for_each_tile(list_tile_images(tiles_dir),
                         lambda image: cut_tile(image, sextracted_dir, output_dir, options, neighbours=neighbours),
                         _describe, log)


def _describe(image, report) -> str:
    counts = ", ".join(f"{n} {c}" for n, c in report["flag_counts"].items() if c)
    return (f"{report['tile']}: {report['cut']} of {report['catalogue_objects']} objects cut"
            f"{'; flagged: ' + counts if counts else ''} ({report['seconds']:.1f} s)")
