"""The report's gallery: data, model and residual of a random sample of fits and of the worst fits.

Each object's model is redone as the fit made it, for that object only: its best cell's unique stamp
is read from the memory-mapped cube file (64 kB, not the 165 MB cube), convolved with its extension's
PSF as the fit convolved it (`model_matrix.convolved_stamps`: pixel response removed and the
cores computed without aliasing when ``fit.psf_pixel`` is ``included``) and scaled by
the cell's amplitude as the fit sets it, so that its chi-square is the catalogue's CHI2 (FLUX is
interpolated between cells: FLUX x this stamp fits worse, by up to tens of per cent in chi-square).
The cutouts go through the fit's own preparation (`engine.prepare_cutouts`), so data, rms and mask are
what the fit saw. With ``fit.gain`` the Poisson variance comes from the drawn cell; the fit took it
from its first pass's best cell: the same numbers unless its second pass moved to another cell.
What cannot be shown (prep products cleaned, an object without a fit) goes to notes, never raises.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..batch.config import load_config
from ..batch.fit_job import fit_options
from ..batch.prep_job import tile_products
from ..batch.rundir import RunDir
from ..errors import DreError
from ..fit.engine import prepare_cutouts, poisson_weights
from ..fit.model_matrix import convolved_stamps
from ..fit.units import psf_index
from ..io.catalog import offsets_from_catalog, read_catalog
from ..io.cuts import CutoutSet, read_cuts
from ..io.fits_check import check_fits
from ..models.cube_io import first_image_hdu, grid_header, match_shape
from ..models.grid import ModelGrid
from ..models.psf import read_psf

@dataclass
class GalleryItem:
    """One drawn object; `png` is a file name relative to the gallery's folder."""

    tile: str
    row: int
    number: int
    kind: str                  # "random" or "worst"
    chi2_dof: float
    flags: int
    png: str


@dataclass
class Mosaic:
    """One object's arrays, (B, B) each, centred like the fit: `data`, `rms` (with ``fit.gain``, the
    Poisson term of the drawn model), `mask` (usable pixels), `stamp` (unit-flux convolved best
    cell), `model` (`amplitude` x stamp) and `residual` (data - model). `amplitude` is the best
    cell's amplitude as the fit sets it (its chi-square is the catalogue's CHI2); `flux` is the
    catalogue's FLUX, interpolated between cells (`fit.refine`), a few per cent away from it."""

    data: np.ndarray
    rms: np.ndarray
    mask: np.ndarray
    stamp: np.ndarray
    amplitude: float
    flux: float
    model: np.ndarray
    residual: np.ndarray


def _column(catalogue, name, dtype=float, fill=np.nan) -> np.ndarray:
    col = catalogue[name]
    return np.asarray(col.filled(fill) if getattr(col, "mask", None) is not None else col, dtype=dtype)


def pick_gallery(catalogue, n_random=12, n_worst=12, seed=0) -> list:
    """``[(catalogue row index, kind)]``: the `n_worst` highest CHI2/DOF (worst first), then a sample
    of `n_random` fitted objects (finite CHI2, DOF > 0, MODEL_IDX >= 0 where given) drawn with
    `seed` from all of them, in catalogue order; one drawn among the worst is shown once, as worst."""
    chi2, dof = _column(catalogue, "CHI2"), _column(catalogue, "DOF", fill=0)
    fitted = np.isfinite(chi2) & (dof > 0)
    if "MODEL_IDX" in catalogue.colnames:
        fitted &= _column(catalogue, "MODEL_IDX", np.int64, -1).reshape(len(catalogue), -1)[:, 0] >= 0
    rows = np.flatnonzero(fitted)
    ratio = chi2[rows] / dof[rows]
    worst = rows[np.argsort(-ratio, kind="stable")[:max(int(n_worst), 0)]]
    drawn = np.random.default_rng(seed).choice(rows, size=min(max(int(n_random), 0), rows.size), replace=False)
    random = np.sort(np.setdiff1d(drawn, worst))
    return [(int(r), "worst") for r in worst] + [(int(r), "random") for r in random]


class CubeFile:
    """A model cube file opened memory-mapped: its grid and single stamps read on demand."""

    def __init__(self, path: Path):
        from astropy.io import fits
        self.hdul = fits.open(path, memmap=True)
        try:
            hdu = first_image_hdu(self.hdul, path)
            self.grid = ModelGrid.from_header(grid_header(self.hdul[0].header, hdu.header), str(path))
            nn, nq, na, nr = self.grid.shape
            box = self.grid.boxsize
            self.tiles = match_shape(hdu.data, self.grid, path).reshape(nn, nq, na, box, nr, box)
        except BaseException:
            self.hdul.close()
            raise

    def close(self) -> None:
        self.hdul.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def stamps(self, full_cells) -> np.ndarray:
        """Unit-flux stamps (K, B, B) float32 of the fit's unique models of `full_cells`."""
        representatives, inverse = self.grid.unique_models()
        index = np.unravel_index(representatives[inverse[np.asarray(full_cells)]], self.grid.shape)
        return np.stack([np.asarray(self.tiles[n, q, a, :, r, :], dtype=np.float32) for n, q, a, r in zip(*index)])


def cube_path(run_dir: Path, model) -> Path:
    """The cube file of ``fit.model`` (null or a preset: the preset's cache path; never generated here)."""
    from ..models.generate import DEFAULT_PRESET, PRESETS, preset_path
    if not model or model in PRESETS:
        return preset_path(model or DEFAULT_PRESET)
    path = Path(model)
    return path if path.is_absolute() or path.exists() else Path(run_dir) / path


def mosaic_arrays(run_dir, catalogue, rows) -> tuple:
    """``({catalogue row: Mosaic}, notes)`` for the catalogue rows `rows`; rows that cannot be drawn
    are left out, with a reason in `notes`."""
    rundir = RunDir(run_dir)
    config = load_config(rundir.config)
    options, fit = fit_options(config), config["fit"]
    path = cube_path(rundir.root, fit["model"])
    if not path.is_file():
        return {}, [f"gallery: model cube {path} not found; no mosaics drawn"]
    tiles = {t.name: t for t in rundir.tiles()}
    rows = [int(r) for r in rows]
    sub = catalogue[rows] if rows else catalogue[:0]
    wanted = {"TILE": [str(t).strip() for t in sub["TILE"]], "NUMBER": _column(sub, "NUMBER", np.int64),
              "ROW": _column(sub, "ROW", np.int64), "FLAGS": _column(sub, "FLAGS", np.int64, 0),
              "MODEL_IDX": _column(sub, "MODEL_IDX", np.int64, -1).reshape(len(sub), -1),
              "FLUX": _column(sub, "FLUX") if "FLUX" in sub.colnames else np.full(len(sub), np.nan)}
    out, notes = {}, []
    try:
        check_fits(path, f"model cube {path}")        # astropy can hang or over-allocate on a bad header
        cube = CubeFile(path)
    except (DreError, OSError, ValueError) as exc:
        return {}, [f"gallery: {exc}; no mosaics drawn"]
    with cube:
        for name in dict.fromkeys(wanted["TILE"]):
            members = [i for i, t in enumerate(wanted["TILE"]) if t == name]
            try:
                if name not in tiles:
                    raise DreError("not a tile of the run's manifest")
                drawn = _tile_mosaics(rundir, tiles[name], wanted, members, cube, options, fit, notes)
                out.update({rows[i]: m for i, m in drawn.items()})
            except (DreError, OSError, ValueError) as exc:
                notes.append(f"gallery: tile {name}: {len(members)} objects not shown: {exc}")
    return out, notes


def _tile_mosaics(rundir, tile, wanted, members, cube, options, fit, notes) -> dict:
    """``{position in wanted: Mosaic}`` of one tile's objects `members` (positions in `wanted`)."""
    products = tile_products(rundir, tile)
    for role in ("cuts", "psf"):
        if not products[role].is_file():
            raise DreError(f"{role} file {products[role].relative_to(rundir.root)} not found (prep "
                           f"products removed by dre-batch clean?)")
    catalog, drawn, cuts = None, [], []
    for i in members:
        number, index = int(wanted["NUMBER"][i]), int(wanted["ROW"][i])
        if wanted["MODEL_IDX"][i, 0] < 0:
            notes.append(f"gallery: {tile.name} object {number}: no fit (FLAGS {wanted['FLAGS'][i]})")
            continue
        cut = read_cuts(products["cuts"], index, index + 1, boxsize=cube.grid.boxsize)
        if len(cut) != 1 or int(cut.objects["NUMBER"][0]) != number:
            notes.append(f"gallery: {tile.name} object {number}: row {index} of the cuts file is another "
                         f"object (cuts file changed since the fit?)")
            continue
        if not np.isfinite(cut.offsets).all() and products["catalog"].is_file():    # as the fit job does
            catalog = read_catalog(products["catalog"]) if catalog is None else catalog
            offsets_from_catalog(cut.objects, catalog, cube.grid.boxsize)
        drawn.append(i)
        cuts.append(cut)
    out = {}
    ext = np.array([int(c.objects["EXT_NUMBER"][0]) for c in cuts])
    for value in np.unique(ext):
        psf = read_psf(products["psf"], ext_number=psf_index(value))
        picked = np.flatnonzero(ext == value)
        which = [drawn[k] for k in picked]
        cells = np.ravel_multi_index(wanted["MODEL_IDX"][which].T, cube.grid.shape)
        batch = CutoutSet(*(np.concatenate([getattr(cuts[k], a) for k in picked])
                            for a in ("data", "mask", "rms", "objects")))
        stamps = convolved_stamps(cube.grid, cube.stamps(cells), cells, psf, fit["psf_pixel"] == "included")
        mosaics = _mosaics(batch, stamps, wanted["FLUX"][which], options)
        out.update(zip(which, mosaics))
    return out


def _mosaics(cuts, stamps, flux, options) -> list:
    """Mosaics of one extension's objects from the fit's own preparation of their cutouts."""
    n, shape = len(cuts), stamps.shape
    d, w, r, usable, _, _, shrink = prepare_cutouts(np, cuts, options)
    d, m = d.astype(np.float64), stamps.reshape(n, -1).astype(np.float64)
    amp = best_amplitude(options.statistic, d, w, usable, m)
    if options.gain:        # the Poisson term of the fit's second pass, from this model
        w = poisson_weights(np, m, amp, w, r, options.gain / shrink)
        if options.statistic == "wls":
            amp = best_amplitude("wls", d, w, usable, m)
    rms = np.where(w > 0, 1 / np.sqrt(np.where(w > 0, w, 1)), r).reshape(shape)
    data, mask, models = d.reshape(shape), usable.reshape(shape), amp[:, None, None] * m.reshape(shape)
    return [Mosaic(data[i], rms[i], mask[i], stamps[i], float(amp[i]), float(flux[i]), models[i],
                   data[i] - models[i]) for i in range(n)]


def best_amplitude(statistic, data, weights, usable, models) -> np.ndarray:
    """(N,) amplitude of each object's model (N, P) as the fit sets it: ``wls`` the weighted least
    squares one, clamped at 0; ``dre`` the flux match over the usable pixels, sum d / sum m."""
    if statistic == "dre":
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.nan_to_num((data * usable).sum(axis=1) / (models * usable).sum(axis=1))
    b = (weights * models * models).sum(axis=1)
    return np.where(b > 0, np.maximum((weights * data * models).sum(axis=1), 0) / np.where(b > 0, b, 1), 0.0)


def write_gallery(run_dir, catalogue, out_dir, n_random=12, n_worst=12, seed=0) -> tuple:
    """One PNG per picked object (`pick_gallery`) in `out_dir`, named ``mosaic_<kind>_<i>.png``.
    Returns ``([GalleryItem], notes)``; objects that cannot be drawn are in the notes."""
    picks = pick_gallery(catalogue, n_random, n_worst, seed)
    mosaics, notes = mosaic_arrays(run_dir, catalogue, [row for row, _ in picks])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    items, counts = [], {"worst": 0, "random": 0}
    for row, kind in picks:
        i, counts[kind] = counts[kind], counts[kind] + 1
        if row not in mosaics:
            continue
        dof = float(catalogue["DOF"][row])
        item = GalleryItem(str(catalogue["TILE"][row]).strip(), row, int(catalogue["NUMBER"][row]), kind,
                           float(catalogue["CHI2"][row]) / dof, int(catalogue["FLAGS"][row]),
                           f"mosaic_{kind}_{i:03d}.png")
        draw_mosaic(out_dir / item.png, mosaics[row], f"{item.tile[:24]} #{item.number}  "
                    f"chi2/dof {item.chi2_dof:.2f}  flags {item.flags}")
        items.append(item)
    return items, notes


def crop_window(mask, least: int = 16) -> slice:
    """Rows (and columns) of the square window around the stamp's centre that shows the object:
    1.5 times the mask's reach from the centre, at least `least` pixels either side."""
    centre = mask.shape[0] // 2
    reach = np.abs(np.argwhere(mask) - centre).max() if mask.any() else centre
    half = int(np.clip(1.5 * reach + 4, least, centre))
    return slice(centre - half, centre + half)


def mosaic_rgb(mosaic: Mosaic, gap: int = 2) -> np.ndarray:
    """Data | model | residual, cropped to `crop_window`, as one RGB image: data and model on one grey
    scale (0.5 and 99.5 percentiles of the data), the residual red-blue on a symmetric scale (99th
    percentile of its absolute value in the mask), the mask's edge drawn on it in grey."""
    from matplotlib import colormaps
    w = crop_window(mosaic.mask)
    data, model, resid, m = (a[w, w] for a in (mosaic.data, mosaic.model, mosaic.residual, mosaic.mask))
    lo, hi = np.percentile(data, [0.5, 99.5])
    hi = hi if hi > lo else lo + 1.0
    lim = float(np.percentile(np.abs(resid[m] if m.any() else resid), 99)) or 1.0
    grey = colormaps["gray"]
    panels = [grey(np.clip((image - lo) / (hi - lo), 0, 1))[..., :3] for image in (data, model)]
    panels.append(colormaps["RdBu_r"](np.clip(0.5 + resid / (2 * lim), 0, 1))[..., :3])
    edge = m & ~(np.roll(m, 1, 0) & np.roll(m, -1, 0) & np.roll(m, 1, 1) & np.roll(m, -1, 1))
    panels[2][edge] = 0.35
    space = np.ones((m.shape[0], gap, 3))
    return np.concatenate([panels[0], space, panels[1], space, panels[2]], axis=1)


def draw_mosaic(path, mosaic: Mosaic, title: str) -> None:
    """`mosaic_rgb` as a small PNG (3.6 x 1.45 in, 70 dpi) with panel labels and `title`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(3.6, 1.45))
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.01, 0.01, 0.98, 0.8))
    ax.imshow(mosaic_rgb(mosaic), origin="lower", interpolation="antialiased")
    ax.set_axis_off()
    for k, label in enumerate(("data", "model", "residual")):
        fig.text(0.01 + 0.98 * (k + 0.5) / 3, 0.82, label, fontsize=7, ha="center", va="bottom")
    fig.text(0.5, 0.98, title, fontsize=7, ha="center", va="top")
    fig.savefig(path, dpi=70)
