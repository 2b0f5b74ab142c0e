"""The prep job of one tile: SExtractor, cuts and PSF into ``DIR/tiles/<tile>/``.

The same library functions as ``sex_dre``, ``make_cuts`` and ``psfex_dre``, with their options
built from the run config (``prep.*``) and the tile's own inputs (`tile_inputs`: weight and flag
maps, a user PSF, header photometry) instead of command-line arguments. The PSF (`prep_psf`)
comes last and only when the cuts hold an object: a tile with nothing to fit needs none and is
done with 0 objects. Products (file names
after the tile's safe name, which is the image's stem unless that held blanks, quotes, ``;``,
``$``, non-ASCII or other characters outside ``[A-Za-z0-9_.+-]``)::

    tiles/<tile>/Sextracted/<tile>_{cat,nb,rms,seg}.fits
    tiles/<tile>/PSF/<tile>.psf
    tiles/<tile>/Cuts/<tile>_cuts.h5, <tile>_cuts.json

SExtractor and PSFEx split file names at blanks, commas and ``;``, so the tools never see the
image's own name: they read ``tiles/<tile>/input/<tile><suffix>``, a symbolic link to the image
(relative to the run directory, where jobs run), removed again when the prep ends.

A prep run starts by removing the tile's folder (products of an earlier attempt; a symbolic link
there is removed itself, never followed) and the tile's fit chunks (outputs, checkpoints, markers:
they were fitted on the products being replaced), and removes its folder again when it fails, so
that only a prep with a done marker has products; the done marker is the only sign of completion.
It records every product's SHA-256 and size: each fit checks them before it reads anything
(`check_products`) and records `prep_digest` in its own done marker, which collate compares.
Nothing is written through a link out of the run directory (`rundir.check_inside`). `run_prep`
returns the marker's tile-specific content; writing markers is the worker's job.
"""

from __future__ import annotations

import sys
import time
from dataclasses import replace
from pathlib import Path

from ..errors import InputError, PSFError
from ..models.psf import image_stem
from ..preprocess.cut_tiles import cut_tile
from ..preprocess.cuts import CutsOptions
from ..preprocess.psfex import run_psfex
from ..preprocess.seeing import seeing_keys, tile_seeing
from ..preprocess.sextractor import SexOptions, run_sextractor
from ..preprocess.tools import read_image_header
from .checkpoint import identity_digest
from .chunking import chunk_range, n_chunks_for
from .prep_psf import tile_psf
from .rundir import RunDir, Tile, file_sha256, remove_path
from .tile_inputs import health_warnings, image_health, tile_maps, tile_photometry, user_psf

REHASHED = ("catalog", "psf")   # products every fit reads whole: their SHA-256 is checked again;
                                # the others (the cuts: ~150 kB per object; check images) by size


class PrepChanged(InputError):
    """A prep product is missing or differs from what the tile's prep done marker records: the
    fit's failed marker says ``redo_prep``, and ``run --failed-only`` redoes the tile's prep."""

    redo_prep = True


def tile_products(rundir: RunDir, tile: Tile) -> dict:
    """Paths of a tile's prep products by role: ``sextracted``, ``psf_dir``, ``cuts_dir``
    (folders), ``catalog``, ``psf`` and ``cuts`` (files read by the fit jobs)."""
    base, stem = rundir.tile_dir(tile.name), tile.name
    return {"sextracted": base / "Sextracted", "psf_dir": base / "PSF", "cuts_dir": base / "Cuts",
            "catalog": base / "Sextracted" / f"{stem}_cat.fits", "psf": base / "PSF" / f"{stem}.psf",
            "cuts": base / "Cuts" / f"{stem}_cuts.h5"}


def sex_options(config, maps=None) -> SexOptions:
    """SExtractor options from ``prep.*`` (as ``sex_dre -c -p --gain`` would build them) and the
    tile's weight and flag maps (`tile_inputs.tile_maps`)."""
    prep, maps = config["prep"], maps or {}
    return SexOptions(config=prep["sextractor_config"], param=prep["sextractor_param"], gain=prep["gain"],
                      weight_image=maps.get("weight"), flag_image=maps.get("flags"),
                      weight_type=prep["weight_type"])


def cuts_options(config) -> CutsOptions:
    """Cut options from ``prep.*`` (as ``make_cuts --margin --max-stellarity -f --layout
    --compression`` would build them)."""
    prep = config["prep"]
    return CutsOptions(margin=prep["margin"], max_stellarity=prep["max_stellarity"],
                       filters=tuple(tuple(f) for f in prep["filters"]), layout=prep["layout"],
                       compression=prep["compression"], weight_type=prep["weight_type"])


def chunk_count(config, manifest_chunks, n_objects: int, unit: int = 1) -> int:
    """The tile's chunk count: the manifest's when setup knew it (``chunks_per_tile``), else
    from ``chunking.objects_per_chunk`` and the objects counted (no more than the tile's fitting
    units of `unit` objects)."""
    if manifest_chunks is not None:
        return int(manifest_chunks)
    chunking = config["chunking"]
    if chunking["objects_per_chunk"] is not None:
        return n_chunks_for(n_objects, objects_per_chunk=chunking["objects_per_chunk"], unit=unit)
    return n_chunks_for(n_objects, chunks_per_tile=chunking["chunks_per_tile"])


def fitting_unit(config) -> int:
    """Objects per fitting unit, of which chunks hold whole ones: ``fit.batch_size``, or the
    automatic batch size of ``fit.model``'s grid (read from the cube's header)."""
    size = config["fit"]["batch_size"]
    if size is None:
        from ..cli.dre import describe_cube
        from ..fit.engine import auto_batch_size
        size = auto_batch_size(describe_cube(config["fit"]["model"])[0])
    return int(size)


def run_prep(rundir: RunDir, config, tile: Tile, manifest_chunks=None) -> dict:
    """SExtractor (twice with ``prep.seeing: auto``: the first pass measures the seeing), the
    cuts and the PSF of `tile`; returns ``{"tile", "n_objects", "unit_size", "n_chunks", "seconds",
    "outputs", "bytes", "psf", "seeing", "photometry", "maps", "image", "warnings"}`` (outputs:
    path relative to the run directory -> sha256, bytes: -> size).

    The tile's earlier fit chunks are removed first (`void_fits`). On any exception the tile's
    folder is removed and the exception propagates.
    """
    start = time.perf_counter()
    paths = tile_products(rundir, tile)
    folder = rundir.tile_dir(tile.name)
    entry = rundir.read_manifest()["tiles"][tile.index]
    void_fits(rundir, tile)
    remove_path(rundir.root, folder)            # a link there goes, its target stays untouched
    try:
        header = read_image_header(tile.image)
        photometry = tile_photometry(config, header, tile.image)     # a missing key fails first
        health, maps = image_health(tile.image), tile_maps(config, entry)
        own_psf, origin = user_psf(config, entry)
        image = image_link(rundir, tile)
        try:
            seeing, report, measured = _sextract_and_cut(config, image, (header, tile.image), paths,
                                                         maps, own_psf or config["prep"]["psf_fallback"])
        finally:
            remove_path(rundir.root, image.parent)
        n_objects = int(report["cut"])
        try:
            psf = tile_psf(config, paths, own_psf, origin, n_objects, measured)
        except PSFError as exc:
            if not health_warnings(health):
                raise
            raise PSFError(f"{exc} (note: {health_warnings(health)[0]})") from None
        outputs = product_checksums(rundir, tile)
        sizes = {rel: (rundir.root / rel).stat().st_size for rel in outputs}
    except BaseException:
        remove_path(rundir.root, folder)
        raise
    notes = health_warnings(health) + ([] if n_objects else [_no_object(report)])
    for note in notes:
        print(f"prep {tile.name}: {note}", file=sys.stderr)
    unit = fitting_unit(config)
    return {"tile": tile.name, "n_objects": n_objects, "unit_size": unit,
            "n_chunks": chunk_count(config, manifest_chunks, n_objects, unit),
            "seconds": round(time.perf_counter() - start, 3), "outputs": outputs, "bytes": sizes,
            "psf": psf, "seeing": seeing, "photometry": photometry,
            "maps": {k: str(v) if v else None for k, v in maps.items()}, "image": health,
            "warnings": notes}


def _sextract_and_cut(config, image, header, paths, maps, psf) -> tuple:
    """SExtractor with the tile's seeing (a first pass measures it with ``auto``), then the cuts
    (pixels flagged or of zero weight masked); ``(seeing record, cuts report, PSFEx PSF of the
    first pass or None)``: a PSFEx run that measured the seeing is the tile's PSF. `header`:
    ``(image header, the image to name in errors)`` (SExtractor reads `image`, a link)."""
    options = sex_options(config, maps)
    first, measured = [], []

    def first_pass():
        first.append(run_sextractor(image, paths["sextracted"], options))
        return first[-1].catalog

    seeing = tile_seeing(config["prep"]["seeing"], *header, first_pass, psf,
                         config["prep"]["psfex_config"], lambda catalog: _psfex(config, paths, measured))
    keys = seeing_keys(seeing)
    if keys or not first:                  # the first pass is final when it keeps the config's seeing
        run_sextractor(image, paths["sextracted"], replace(options, extra={**options.extra, **keys}))
    report = cut_tile(image, paths["sextracted"], paths["cuts_dir"], cuts_options(config), maps)
    return seeing, report, (measured[0] if measured else None)


def _psfex(config, paths, measured: list):
    """PSFEx on the tile's catalogue (CLASS_STAR plays no part in it: the first pass's PSF is the
    final one); the PSF, also appended to `measured`, or None where it accepts no star."""
    try:
        measured.append(run_psfex(paths["catalog"], paths["psf_dir"], config=config["prep"]["psfex_config"]))
    except PSFError:
        return None
    return measured[0]


def _no_object(report: dict) -> str:
    """Why a tile has nothing to fit."""
    if not report["catalogue_objects"]:
        return "SExtractor detected no object: the tile is done with 0 objects"
    rejected = ", ".join(f"{n} by {why}" for why, n in report["rejected"].items() if n)
    return (f"no galaxy left after the cuts ({report['catalogue_objects']} detected; rejected: "
            f"{rejected or 'none'}): the tile is done with 0 objects")


def void_fits(rundir: RunDir, tile: Tile) -> None:
    """Remove the tile's fit chunks (``chunks/<tile>``: outputs and checkpoints) and their markers:
    a new prep replaces the products they were fitted on. Links are removed, never followed."""
    remove_path(rundir.root, rundir.chunk_dir(tile.name))
    remove_path(rundir.root, rundir.marker_dir("fit", tile.name))


def image_link(rundir: RunDir, tile: Tile) -> Path:
    """``tiles/<tile>/input/<tile><suffix>`` (relative to the run directory): a fresh symbolic link
    to the tile's image, named after the safe tile name with the image's FITS suffixes."""
    name = Path(tile.image).name
    stem = image_stem(name)
    suffix = name[len(stem):] if name.startswith(stem) else ""
    link = rundir.tile_dir(tile.name) / "input" / f"{tile.name}{suffix}"
    rundir.check_inside(link)
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(Path(tile.image).absolute())
    return link


def product_checksums(rundir: RunDir, tile: Tile) -> dict:
    """``{path relative to the run directory: sha256}`` of every file in the tile's folder."""
    folder = rundir.tile_dir(tile.name)
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return {Path(p).relative_to(rundir.root).as_posix(): file_sha256(p) for p in files}


def prep_chunk_range(prep: dict, k: int, n_chunks: int) -> tuple:
    """Objects ``[start, stop)`` of chunk `k` of `n_chunks` of the tile that `prep` (its done
    marker) describes, in the fitting units it recorded; a marker written before units were
    recorded keeps the ranges of single objects that its chunks were fitted with."""
    return chunk_range(prep["n_objects"], k, n_chunks, int(prep.get("unit_size", 1)))


def prep_digest(prep: dict) -> str:
    """SHA-256 of a prep done marker's product checksums: which prep a fit used."""
    return identity_digest(prep.get("outputs") or {})


def check_products(rundir: RunDir, tile: Tile, prep: dict) -> None:
    """A `PrepChanged` error, naming the file, when a product the prep done marker `prep`
    records is missing or another file now: its size (when recorded) and, for the products a fit
    reads whole (`REHASHED`), its SHA-256. A fit calls it before it reads anything."""
    sizes = prep.get("bytes") or {}
    products = tile_products(rundir, tile)
    rehashed = {products[role].relative_to(rundir.root).as_posix() for role in REHASHED}
    redo = "`dre-batch run --failed-only` redoes the tile's prep and its fits"
    for rel, digest in sorted((prep.get("outputs") or {}).items()):
        path = rundir.root / rel
        if path.is_symlink() or not path.is_file():
            raise PrepChanged(f"{path}: product of the prep of tile {tile.name} is missing (or not a "
                              f"regular file); {redo}")
        size = path.stat().st_size
        if rel in sizes and size != sizes[rel]:
            raise PrepChanged(f"{path}: changed since the prep of tile {tile.name} ({size} bytes, its "
                              f"done marker records {sizes[rel]}); {redo}")
        if rel in rehashed and file_sha256(path) != digest:
            raise PrepChanged(f"{path}: changed since the prep of tile {tile.name} (its SHA-256 differs "
                              f"from the done marker's); {redo}")
