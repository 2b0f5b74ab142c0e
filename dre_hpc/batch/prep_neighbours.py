"""The second pass of a tile's prep (``prep.neighbours``): the neighbours' light out of its cuts.

At the end of the prep, once the fits' models are convolved into the tile's model cache
(`fit_job.convolve_for_fits`), the tile's cuts are fitted once here, serially, through the fit
path of ``dre`` (`fit.tiles.fit_tile`, the run's ``fit.*`` options), into
``tiles/<tile>/FirstPass/<tile>_dre.fits``; then the tile is cut again with every fitted model
but the object's own subtracted and the background estimated again, as ``make_cuts
--neighbours`` does (`preprocess.neighbours`). The new cuts replace the first ones (same objects,
masks and rms; same chunks), and the done marker records their checksums. The fit jobs and
collate are unchanged.
"""

from __future__ import annotations

import time
from pathlib import Path

from threadpoolctl import threadpool_limits

from ..preprocess.cut_tiles import NeighbourOptions, cut_tile
from .rundir import RunDir, Tile, file_sha256, remove_path

FIRST_PASS = "FirstPass"


def second_pass(rundir: RunDir, config, tile: Tile, done: dict) -> dict:
    """Fit the tile's first cuts and cut it again without the neighbours (module docstring);
    `done`, the prep's marker content, gets the new products' checksums. Returns what the
    marker records under ``neighbours``: ``{"fitted", "subtracted", "background_change",
    "seconds"}``, or ``{"skipped": reason}`` where the prep did not convolve the models."""
    from ..cli.dre import describe_cube, load_cube
    from ..fit.model_matrix import NodeModels
    from ..fit.tiles import TileJob, fit_tile
    from .fit_job import fit_options
    from .prep_job import cuts_options, image_link, tile_products

    if "skipped" in done["models"]:
        return {"skipped": f"the prep did not convolve the models ({done['models']['skipped']})"}
    begin = time.perf_counter()
    fit, products = config["fit"], tile_products(rundir, tile)
    first = rundir.tile_dir(tile.name) / FIRST_PASS
    models = NodeModels(None, lambda: load_cube(fit["model"]), backend="cpu",
                        workers=config["resources"]["prep"]["cpus_per_task"],
                        psf_has_pixel=fit["psf_pixel"] == "included", describe=lambda: describe_cube(fit["model"]),
                        cache_dir=rundir.model_cache(tile.name))
    job = TileJob(cuts=str(products["cuts"]), psf=str(products["psf"]), summary_dir=str(first), chi_dir=None,
                  catalogs=str(products["sextracted"]), options=fit_options(config, done))
    # BLAS on the fit jobs' thread count, as `fit_job.run_fit` pins it: the first pass does not
    # depend on the machine's core count, and preps that run side by side do not oversubscribe it
    with threadpool_limits(limits=config["resources"]["fit"]["cpus_per_task"], user_api="blas"):
        fitted = fit_tile(models, Path(products["cuts"]), job)
    image = image_link(rundir, tile)
    try:
        maps = {role: Path(path) for role, path in done["maps"].items() if path}
        report = cut_tile(image, products["sextracted"], products["cuts_dir"], cuts_options(config), maps,
                          NeighbourOptions(str(first), str(products["psf"]), fit["psf_pixel"] == "included"))
    finally:
        remove_path(rundir.root, image.parent)
    for path in sorted(p for p in (products["cuts_dir"], first) for p in Path(p).iterdir() if p.is_file()):
        rel = path.relative_to(rundir.root).as_posix()
        done["outputs"][rel], done["bytes"][rel] = file_sha256(path), path.stat().st_size
    neighbours = report["neighbours"]
    return {"fitted": fitted["objects"], "subtracted": neighbours["models_subtracted"],
            "background_change": {str(k): v["median"] for k, v in neighbours["background_change"].items()},
            "seconds": round(time.perf_counter() - begin, 3)}
