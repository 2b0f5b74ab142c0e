"""The report's figures: one function per PNG, each taking plain arrays and returning a `Figure`.

Matplotlib runs headless (Agg). Figures stay legible for 10 objects and fast for 100,000: scatter
plots become density plots (``hexbin``) above `DENSE` points, per-chunk bars become a histogram above
`BARS` chunks, per-tile bars above `BARS` tiles keep the tiles with most problems.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

DENSE = 5000          # points above which a scatter plot is drawn as a density
BARS = 60             # bars above which per-item bar charts are summarised
DPI = 80


@dataclass
class Figure:
    """A written PNG: its file name (inside the report folder), title and caption."""

    name: str
    title: str
    caption: str


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, out_dir: Path, name: str) -> str:
    fig.savefig(Path(out_dir) / name, dpi=DPI)
    _pyplot().close(fig)
    return name


def _finite(values) -> np.ndarray:
    values = np.asarray(values, float)
    return values[np.isfinite(values)]


def counts_per_tile(out_dir, rows: list) -> Figure:
    """Stacked bars per tile: clean fits, flagged fits, objects in missing chunks."""
    plt = _pyplot()
    shown = sorted(rows, key=lambda r: (-(r["missing_chunks"]), -r["flagged"]))[:BARS] \
        if len(rows) > BARS else rows
    names = [r["tile"] for r in shown]
    clean = np.array([r["clean"] for r in shown])
    flagged = np.array([r["flagged"] for r in shown])
    lost = np.array([max((r["objects"] or 0) - r["rows"], 0) for r in shown])
    fig, ax = plt.subplots(figsize=(max(5, 0.25 * len(shown) + 2), 3.4), layout="constrained")
    x = np.arange(len(shown))
    ax.bar(x, clean, color="tab:green", label="clean fits")
    ax.bar(x, flagged, bottom=clean, color="tab:orange", label="flagged fits")
    ax.bar(x, lost, bottom=clean + flagged, color="tab:red", label="in missing chunks")
    ax.set_xticks(x, names, rotation=60 if len(shown) > 4 else 0, ha="right" if len(shown) > 4 else "center",
                  fontsize=7)
    ax.set_ylabel("objects")
    ax.legend(fontsize=7)
    more = f" ({len(shown)} of {len(rows)} tiles: those with most missing and flagged objects)" \
        if len(rows) > len(shown) else ""
    return Figure(_save(fig, out_dir, "counts_per_tile.png"), "Objects per tile",
                  "Clean fits (no flag), flagged fits and objects of chunks that are missing" + more + ".")


def flag_frequency(out_dir, counts: dict, total: int) -> Figure:
    """Horizontal bars: fraction of objects with each flag."""
    plt = _pyplot()
    names = list(counts)
    frac = np.array([counts[n] / total if total else 0.0 for n in names])
    fig, ax = plt.subplots(figsize=(5.5, 0.25 * len(names) + 1), layout="constrained")
    ax.barh(np.arange(len(names)), frac, color="tab:orange")
    ax.set_yticks(np.arange(len(names)), names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("fraction of objects")
    ax.set_xlim(0, max(0.05, float(frac.max(initial=0)) * 1.15))
    return Figure(_save(fig, out_dir, "flags.png"), "Flags",
                  f"Fraction of the {total} objects with each flag set (an object may have several).")


def parameter_histograms(out_dir, catalogue, clean, grid) -> Figure:
    """Histograms of b/a, angle, log r, Sersic n and magnitude; all fits and clean fits."""
    plt = _pyplot()
    panels = (("AX_RATIO", "b/a", grid.ax_ratio), ("ANGLE", "angle (deg)", grid.angle),
              ("LOGR", "log r (pixels)", grid.logr), ("INDEX", "Sersic n", grid.index), ("MAG", "magnitude", None))
    fig, axes = plt.subplots(1, 5, figsize=(13, 2.8), layout="constrained")
    for ax, (column, label, axis) in zip(axes, panels):
        values = np.asarray(catalogue[column], float)
        if axis is not None:      # one bin per grid value, centred on it
            edges = axis.start + axis.step * (np.arange(axis.count + 1) - 0.5) if axis.step > 0 \
                else np.array([axis.start - 0.5, axis.start + 0.5])
        else:
            finite = _finite(values)
            edges = np.linspace(*(np.percentile(finite, [0.5, 99.5]) if finite.size else (0, 1)), 31)
        ax.hist(_finite(values), bins=edges, color="0.7", label="all")
        ax.hist(_finite(values[clean]), bins=edges, histtype="step", color="tab:blue", label="clean")
        ax.set_xlabel(label)
    axes[0].set_ylabel("objects")
    axes[0].legend(fontsize=7)
    return Figure(_save(fig, out_dir, "parameters.png"), "Parameter distributions",
                  "Best-fit b/a, position angle, log r and Sersic n (one bin per grid value) and "
                  "magnitude; grey: all fits, blue: clean fits.")


def grid_edge_fractions(out_dir, edges: dict) -> Figure:
    """Bars: fraction of best fits on each grid edge."""
    plt = _pyplot()
    names = list(edges)
    frac = np.array([edges[n] or 0.0 for n in names])
    fig, ax = plt.subplots(figsize=(5, 2.8), layout="constrained")
    ax.bar(np.arange(len(names)), frac, color="tab:purple")
    ax.set_xticks(np.arange(len(names)), names, fontsize=8)
    ax.set_ylabel("fraction of fits")
    ax.set_ylim(0, max(0.05, float(frac.max(initial=0)) * 1.2))
    for x, f in enumerate(frac):
        ax.text(x, f, f"{f:.3f}", ha="center", va="bottom", fontsize=7)
    return Figure(_save(fig, out_dir, "grid_edges.png"), "Best fits on the grid edges",
                  "Fraction of fitted objects whose best model is the smallest or largest value of a grid "
                  "axis (the angle axis is periodic). A pile-up says the grid should be wider there, "
                  "unless the edge is a physical limit (b/a = 1: round objects).")


def chi2_vs_mag(out_dir, mag, chi2_dof) -> Figure:
    """chi2/dof against magnitude (log scale), with the running median."""
    plt = _pyplot()
    ok = np.isfinite(mag) & np.isfinite(chi2_dof) & (chi2_dof > 0)
    mag, chi = np.asarray(mag)[ok], np.asarray(chi2_dof)[ok]
    fig, ax = plt.subplots(figsize=(5.5, 3.4), layout="constrained")
    if mag.size > DENSE:
        hb = ax.hexbin(mag, np.log10(chi), gridsize=60, bins="log", cmap="Greys", mincnt=1)
        fig.colorbar(hb, ax=ax, label="objects")
    else:
        ax.scatter(mag, np.log10(chi), s=6, color="0.4")
    if mag.size >= 10:
        edges = np.unique(np.percentile(mag, np.linspace(0, 100, 11)))
        centre, median = [], []
        for lo, hi in zip(edges[:-1], edges[1:]):
            inside = (mag >= lo) & (mag <= hi)
            if inside.any():
                centre.append(0.5 * (lo + hi))
                median.append(np.median(np.log10(chi[inside])))
        ax.plot(centre, median, "o-", color="tab:red", label="median")
        ax.legend(fontsize=7)
    ax.axhline(0.0, color="tab:blue", lw=0.8, ls="--")
    ax.set_xlabel("magnitude")
    ax.set_ylabel("log10 chi2/dof")
    return Figure(_save(fig, out_dir, "chi2_vs_mag.png"), "Goodness of fit against magnitude",
                  "chi-square per degree of freedom of the best model (dashed: 1). Bright objects are "
                  "where the model's limits show first.")


def chunk_times(out_dir, labels: list, seconds, objects) -> Figure:
    """Run time per chunk: bars (few chunks) or a histogram of seconds per chunk."""
    plt = _pyplot()
    seconds, objects = np.asarray(seconds, float), np.asarray(objects, float)
    fig, ax = plt.subplots(figsize=(max(5, 0.22 * min(len(labels), BARS) + 2), 3.2), layout="constrained")
    if len(labels) <= BARS:
        ax.bar(np.arange(len(labels)), seconds, color="tab:cyan")
        ax.set_xticks(np.arange(len(labels)), labels, rotation=60, ha="right", fontsize=6)
        ax.set_ylabel("seconds")
    else:
        ax.hist(seconds, bins=40, color="tab:cyan")
        ax.set_xlabel("seconds per chunk")
        ax.set_ylabel("chunks")
    total = seconds.sum()
    rate = objects.sum() / total if total > 0 else float("nan")
    return Figure(_save(fig, out_dir, "chunk_times.png"), "Run time per chunk",
                  f"{len(labels)} chunks, {total:.1f} s in all (the fit jobs' own timing, from their done "
                  f"markers), {rate:.0f} objects per chunk-second.")


def validation_bins(out_dir, parameters: dict, key: str, xlabel: str, name: str) -> Figure:
    """Bias (points) and scatter (error bars) of each parameter against truth, per bin of `key`."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(parameters), figsize=(2.7 * len(parameters), 2.8), layout="constrained")
    for ax, (param, stats) in zip(np.atleast_1d(axes), parameters.items()):
        bins = [b for b in stats[key] if b["n"]]
        x = [_bin_centre(b) for b in bins]
        ax.errorbar(x, [b["bias"] for b in bins], yerr=[b["scatter"] for b in bins], fmt="o", capsize=3)
        ax.axhline(0.0, color="0.5", lw=0.8)
        ax.set_title(param if param != "FLUX" else "FLUX (ratio - 1)", fontsize=9)
        ax.set_xlabel(xlabel)
        if key == "by_snr":
            from matplotlib.ticker import NullFormatter, ScalarFormatter
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(ScalarFormatter())
            ax.xaxis.set_minor_formatter(NullFormatter())
    np.atleast_1d(axes)[0].set_ylabel("fitted - true")
    return Figure(_save(fig, out_dir, name), f"Bias and scatter against truth, by {xlabel}",
                  "Median difference (point) and 1.4826 x MAD (bar) of clean fits matched to simulated "
                  f"galaxies, in bins of {xlabel}; an open-ended bin is drawn at its finite edge.")


def _bin_centre(b) -> float:
    lo, hi = b["lo"], b["hi"]
    if lo is None:
        return hi
    if hi is None:
        return lo
    return 0.5 * (lo + hi) if lo > 0 or hi <= 0 else 0.5 * hi
