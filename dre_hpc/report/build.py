"""``dre-batch report DIR``: the run report, built from the collated files of a run.

`build_report` writes ``DIR/output/report/``: ``index.html`` (one page, CSS inline, no script), the
PNG figures it shows, ``report.json`` (the summary, per-tile counts, chunk times; ``units`` names
the unit of each number that has one, `REPORT_UNITS`) and, when the tiles come from the simulator,
``validation.json``. The folder is written under a temporary name and
swapped in whole, so a page never points at a figure of an earlier report. `text_summary` gives the
headline numbers as a table for a terminal (``report --text``, which writes nothing).

Truth catalogues are looked for next to each tile image: ``<stem>_truth.fits`` in the image's folder,
in its ``Truth/`` subfolder or in a ``Truth/`` folder beside it (the layout ``dre-sim`` and ``make
demo`` write), or in ``truth_dir``.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..batch.rundir import RunDir, utc_now
from ..errors import InputError
from ..models.psf import image_stem
from . import html
from .run_data import (RunData, chunk_label_of, load_run, psf_rows, summary, tile_rows,
                       tile_warnings)
from .validation import validate

REPORT = "report"
GALLERY_SIZE = 12                   # random fits shown; as many of the worst fits
#: Units of the numbers of report.json that have one, by key path (the others are counts or fractions).
REPORT_UNITS = {"summary.chunk_seconds": "s", "summary.objects_per_chunk_second": "1 / s",
                "seconds": "s", "chunk_times.seconds": "s"}


@dataclass
class Report:
    """What `build_report` made."""

    folder: Path | None
    summary: dict
    validation: dict | None
    notes: list = field(default_factory=list)
    seconds: dict = field(default_factory=dict)

    @property
    def page(self) -> Path | None:
        return self.folder / "index.html" if self.folder else None


# -- truth -----------------------------------------------------------------------------------------
def truth_path(image, truth_dir=None) -> Path | None:
    """The truth catalogue of a tile image, or None (see the module docstring for where it looks)."""
    image = Path(image)
    name = f"{image_stem(image)}_truth.fits"
    folders = ([Path(truth_dir)] if truth_dir else []) + [image.parent, image.parent / "Truth",
                                                          image.parent.parent / "Truth"]
    return next((folder / name for folder in folders if (folder / name).is_file()), None)


def validation_of(data: RunData, truth_dir=None) -> tuple:
    """``(validation dict or None, notes)``: the fits of every tile with a truth catalogue against it."""
    from ..sim.tile import read_truth
    pairs, lacking, notes = [], [], []
    names = np.asarray(data.catalogue["TILE"])
    for tile, image in data.images.items():
        path = truth_path(image, truth_dir)
        if path is None:
            lacking.append(tile)
            continue
        try:
            pairs.append((data.catalogue[names == tile], read_truth(path)))
        except InputError as exc:
            notes.append(f"validation: {exc}")
    if not pairs:
        if truth_dir:
            notes.append(f"validation: no <tile>_truth.fits found (truth dir {truth_dir} and next to the tiles)")
        return None, notes
    if lacking:
        notes.append(f"validation: {len(lacking)} tile(s) without a truth catalogue left out: "
                     f"{', '.join(lacking[:5])}{' ...' if len(lacking) > 5 else ''}")
    result = validate(pairs, data.grid)
    result["tiles"] = len(pairs)
    return result, notes


# -- the report --------------------------------------------------------------------------------------
def _timed(seconds: dict, key: str, func, *args):
    start = time.perf_counter()
    out = func(*args)
    seconds[key] = round(time.perf_counter() - start, 3)
    return out


def build_report(run_dir, truth_dir=None, gallery: int = GALLERY_SIZE, write: bool = True) -> Report:
    """Read the collated run and, with `write`, write the report folder. Returns the `Report`."""
    seconds = {}
    data = _timed(seconds, "read", load_run, run_dir)
    head = summary(data)
    head["tiles_table"] = tile_rows(data)
    head["psf_table"], head["tile_warnings"] = psf_rows(data), tile_warnings(data)
    validation, notes = _timed(seconds, "validation", validation_of, data, truth_dir)
    report = Report(None, head, validation, data.notes + notes, seconds)
    if write:
        final = RunDir(run_dir).output_dir / REPORT
        tmp = final.with_name(f".{REPORT}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        _write_folder(tmp, data, report, gallery)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        report.folder = final
    return report


def _write_folder(out: Path, data: RunData, report: Report, gallery: int) -> None:
    from . import figures
    seconds, head, c = report.seconds, report.summary, data.catalogue
    start = time.perf_counter()
    flags = np.asarray(c["FLAGS"], np.int64)
    overview = [figures.counts_per_tile(out, head["tiles_table"]),
                figures.flag_frequency(out, head["flags"], len(c)),
                figures.parameter_histograms(out, c, flags == 0, data.grid),
                figures.grid_edge_fractions(out, head["grid_edges"]),
                figures.chi2_vs_mag(out, np.asarray(c["MAG"], float), data.chi2_dof)]
    times = [figures.chunk_times(out, [chunk_label_of(t) for t in data.chunk_times],
                                 [t.seconds for t in data.chunk_times], [t.objects for t in data.chunk_times])] \
        if data.chunk_times else []
    checks = []
    if report.validation:
        params = {name: stats for name, stats in report.validation["parameters"].items()
                  if name != "INDEX" or data.grid.index.count > 1}      # one n in the grid: no n bias
        checks = [figures.validation_bins(out, params, "by_snr", "true S/N", "validation_snr.png"),
                  figures.validation_bins(out, params, "by_size", "true log r", "validation_size.png")]
        _write_json(out / "validation.json", report.validation)
    seconds["figures"] = round(time.perf_counter() - start, 3)
    items, gallery_notes = [], []
    if gallery > 0:
        from .gallery import write_gallery
        items, gallery_notes = _timed(seconds, "gallery", write_gallery, data.root, c, out, gallery, gallery,
                                      data.seed)
    report.notes += gallery_notes
    page = html.page(f"dre-batch report: run {data.run}",
                     _sections(data, report, overview, times, checks, items))
    (out / "index.html").write_text(page, encoding="utf-8")
    _write_json(out / "report.json", {"time": utc_now(), "summary": head, "notes": report.notes,
                                       "missing": data.missing, "seconds": seconds,
                                       "chunk_times": [asdict(t) for t in data.chunk_times],
                                       "validation": "validation.json" if report.validation else None,
                                       "units": REPORT_UNITS})


def _write_json(path: Path, content: dict) -> None:
    path.write_text(json.dumps(content, indent=1, allow_nan=False) + "\n", encoding="utf-8")


def _sections(data: RunData, report: Report, overview, times, checks, items) -> list:
    head = report.summary
    numbers = html.table(["", "value"], [(k, v) for k, v in _headline_rows(head, report.validation)])
    columns = ("tile", "objects", "rows", "fitted", "clean", "flagged", "missing_chunks")
    tiles = html.table(["tile", "objects (prep)", "rows", "fitted", "clean", "flagged", "missing chunks",
                        "objects by flag"],
                       [tuple(r[c] for c in columns) + (", ".join(f"{k} {v}" for k, v in r["flags"].items()),)
                        for r in head["tiles_table"]], problem=lambda row: row[6] > 0)
    sections = [("Summary", numbers + html.notes(report.notes)), ("Tiles", tiles)]
    if head["psf_table"]:
        sections.append(("Tiles on a user or fallback PSF", html.table(
            ["tile", "PSF", "file", "why"], [(r["tile"], r["source"], r["file"], r["reason"])
                                             for r in head["psf_table"]],
            problem=lambda row: row[1] == "fallback")))
    if head["tile_warnings"]:
        sections.append(("Tile warnings", html.table(
            ["tile", "warning"], [(w["tile"], w["warning"]) for w in head["tile_warnings"]],
            problem=lambda row: True)))
    if data.missing:
        sections.append(("Missing chunks", html.table(
            ["tile", "chunk", "state", "reason"],
            [(m["tile"], m["chunk"], m["state"], m["reason"]) for m in data.missing],
            problem=lambda row: True)))
    sections.append(("Fits", "\n".join(html.figure(f) for f in overview)))
    if times:
        sections.append(("Run time", "\n".join(html.figure(f) for f in times)))
    if report.validation:
        sections.append(("Validation against simulated truth", _validation_table(report.validation) +
                         "\n".join(html.figure(f) for f in checks)))
    if items:
        sections.append(("Gallery: data, model, residual", html.gallery(items)))
    return sections


def _headline_rows(head: dict, validation: dict | None) -> list:
    rows = [("tiles", head["tiles"]), ("objects in the catalogue", head["objects"]),
            ("fitted", head["fitted"]), ("clean (no flag)", head["clean"]), ("flagged", head["flagged"]),
            ("missing chunks", head["missing_chunks"]), ("median chi2/dof", head["median chi2/dof"])]
    rows += [(f"best fits on grid edge: {k}", v) for k, v in head["grid_edges"].items()]
    if head["objects_per_chunk_second"]:
        rows.append(("objects per chunk-second", head["objects_per_chunk_second"]))
    if validation:
        rows += [("truth galaxies", validation["truth_galaxies"]), ("matched to a fit", validation["matched"]),
                 ("matched, clean", validation["matched_unflagged"])]
        rows += [(f"truth: {k}", v) for k, v in validation["headline"].items()]
    return rows


def _validation_table(validation: dict) -> str:
    rows = []
    for name, stats in validation["parameters"].items():
        overall = stats["all"]
        rows.append((name, overall["n"], overall["bias"], overall["scatter"], overall["mean"], overall["rms"]))
    table = html.table(["parameter (fitted - true; FLUX: ratio - 1)", "n", "bias (median)",
                        "scatter (1.4826 MAD)", "mean", "rms"], rows)
    refined = validation.get("refined") or {}
    if not refined:
        return table
    bins = [f"{row['lo'] or 0:g}-{row['hi']:g}" if row["hi"] is not None else f">= {row['lo']:g}"
            for row in next(iter(refined.values()))["by_snr"]]
    rows = [(f"{name}_FIT", stats["all"]["n"], stats["all"]["bias"], stats["all"]["scatter"],
             stats["all"]["coverage"], *(row["coverage"] for row in stats["by_snr"]))
            for name, stats in refined.items()]
    return table + html.table(["sub-grid estimate", "n", "bias", "scatter", "coverage of +-1 sigma (68 % if right)",
                               *(f"coverage, S/N {b}" for b in bins)], rows)


def text_summary(report: Report) -> str:
    """The headline numbers as an aligned two-column table (for ``report --text``)."""
    rows = _headline_rows(report.summary, report.validation)
    width = max(len(k) for k, _ in rows)
    lines = [f"run {report.summary['run']}"]
    for key, value in rows:
        shown = "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)
        lines.append(f"  {key:<{width}}  {shown:>9}")
    lines += [f"  note: {n}" for n in report.notes]
    lines += [f"  PSF of {r['tile']}: {r['source']} {r['file']}".rstrip() for r in report.summary["psf_table"]]
    lines += [f"  tile {w['tile']}: {w['warning']}" for w in report.summary["tile_warnings"]]
    if report.summary["missing_chunks"]:
        lines.append("  missing chunks: " + ", ".join(
            f"{t['tile']} ({t['missing_chunks']})" for t in report.summary["tiles_table"] if t["missing_chunks"]))
    return "\n".join(lines)
