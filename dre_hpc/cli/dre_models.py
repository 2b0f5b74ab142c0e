"""dre-models: generate a model cube in the original DRE FITS format.

Each axis is ``START STEP COUNT`` (values ``START + STEP * arange(COUNT)``); the defaults are the
default grid (n = 4; q = 0.1..1.0; angle = 0..165 step 15; log10 r_e = -0.70..1.70 step 0.12).
Giving ``--index`` writes the NINDEX axis; without it the file has n = 4 only, like the original.
``--preset bulge|sersic`` takes the grid of a preset (``sersic``: n = 0.5..6 step 0.5); without
``-o`` it makes the preset's cached cube (what ``dre -m PRESET`` reads) and prints its path.
The distinct models are rendered by ``--workers`` processes (default: the usable CPUs, at most 8).
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from pathlib import Path

from ..errors import InputError
from ..models.cube_io import write_cube
from ..models.generate import PRESETS, ensure_preset, generator_cards, make_cube, preset_grid
from ..models.grid import Axis, ModelGrid
from ..models.sersic import MAX_DEFAULT_WORKERS, default_workers
from .common import run_main

log = logging.getLogger(__name__)

#: Accepted value ranges per axis option (inclusive), with what they mean.
LIMITS = {
    "index": (0.2, 10.0, "Sersic index n"),
    "ax_ratio": (0.05, 1.0, "axis ratio b/a"),
    "angle": (-360.0, 360.0, "position angle in degrees"),
    "logr": (-2.0, 3.0, "log10 half-light radius in pixels"),
}
BOXSIZE_RANGE = (8, 1024)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dre-models", description=__doc__.split("\n\n")[0])
    default = ModelGrid.default()
    for name, axis in zip(("index", "ax-ratio", "angle", "logr"), default.axes):
        help_text = f"{LIMITS[name.replace('-', '_')][2]} axis"
        if name == "index":
            help_text += "; given, the cube gets the NINDEX axis (default: n = 4 only, no NINDEX)"
        else:
            help_text += f" (default: {axis.start:g} {axis.step:g} {axis.count})"
        parser.add_argument(f"--{name}", nargs=3, metavar=("START", "STEP", "COUNT"), help=help_text)
    parser.add_argument("--boxsize", help=f"stamp side in pixels (default: {default.boxsize})")
    parser.add_argument("--preset", choices=PRESETS, help="the grid of a preset: bulge (the default "
                        "grid, n = 4) or sersic (n = 0.5..6 step 0.5 and the default q, angle and "
                        "radius axes); not with the axis options or --boxsize. Without -o: make the "
                        "preset's cached cube and print its path")
    parser.add_argument("-o", "--output", help="output FITS file (required unless --preset)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    parser.add_argument("--workers", help="processes rendering the models (default: the usable "
                        f"CPUs, at most {MAX_DEFAULT_WORKERS}); the cube does not depend on it")
    return parser


def parse_axis(option: str, values, default: Axis) -> Axis:
    """An `Axis` from ``START STEP COUNT`` strings (``None``: the default), range-checked."""
    if values is None:
        return default
    start, step = (_number(option, label, text) for label, text in zip(("START", "STEP"), values))
    try:
        count = int(values[2])
    except ValueError:
        raise InputError(f"--{option}: COUNT must be a whole number, got {values[2]!r}") from None
    if count < 1:
        raise InputError(f"--{option}: COUNT must be >= 1, got {count}")
    if count > 1 and not step > 0:
        raise InputError(f"--{option}: STEP must be > 0 when COUNT > 1, got {step:g}")
    low, high, what = LIMITS[option.replace("-", "_")]
    last = start + step * (count - 1)
    if start < low - 1e-9 or last > high + 1e-9 or (option == "ax-ratio" and start <= 0):
        raise InputError(f"--{option}: {what} must lie in [{low:g}, {high:g}], "
                         f"but the axis runs from {start:g} to {last:g}")
    return Axis(default.name, start, step, count)


def _number(option, label, text) -> float:
    try:
        value = float(text)
    except ValueError:
        raise InputError(f"--{option}: {label} must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise InputError(f"--{option}: {label} must be finite, got {text!r}")
    return value


def grid_from_args(args) -> ModelGrid:
    """The `ModelGrid` the options describe."""
    if getattr(args, "preset", None):
        given = [f"--{name}" for name in ("index", "ax-ratio", "angle", "logr")
                 if getattr(args, name.replace("-", "_")) is not None]
        if args.boxsize is not None:
            given.append("--boxsize")
        if given:
            raise InputError(f"--preset {args.preset} sets the whole grid; it cannot be combined "
                             f"with {', '.join(given)}")
        return preset_grid(args.preset)
    default = ModelGrid.default()
    text = str(default.boxsize) if args.boxsize is None else args.boxsize
    try:
        boxsize = int(text)
    except ValueError:
        raise InputError(f"--boxsize must be a whole number, got {text!r}") from None
    if not BOXSIZE_RANGE[0] <= boxsize <= BOXSIZE_RANGE[1]:
        raise InputError(f"--boxsize must lie in [{BOXSIZE_RANGE[0]}, {BOXSIZE_RANGE[1]}], got {boxsize}")
    axes = [parse_axis(option, getattr(args, option.replace("-", "_")), axis)
            for option, axis in zip(("index", "ax-ratio", "angle", "logr"), default.axes)]
    return ModelGrid(*axes, boxsize=boxsize, has_index_axis=args.index is not None)


def workers_from_args(args) -> int:
    """``--workers`` as a count of processes (default: `default_workers`)."""
    if args.workers is None:
        return default_workers()
    try:
        workers = int(args.workers)
    except ValueError:
        raise InputError(f"--workers must be a whole number, got {args.workers!r}") from None
    if workers < 1:
        raise InputError(f"--workers must be >= 1, got {workers}")
    return workers


def driver(argv=None) -> int:
    args = build_parser().parse_args(argv)
    grid = grid_from_args(args)
    workers = workers_from_args(args)
    if args.output is None:
        if not args.preset:
            raise InputError("-o/--output is required (or --preset NAME alone, to make the "
                             "preset's cached cube)")
        start = time.perf_counter()
        path = ensure_preset(args.preset, workers=workers)
        log.info("%s cube: %s (%.1f MB, %.1f s)", args.preset, path, path.stat().st_size / 1e6,
                 time.perf_counter() - start)
        print(path)
        return 0
    output = Path(args.output)
    if output.exists() and not args.overwrite:
        raise InputError(f"{output} already exists; use --overwrite to replace it")
    output.parent.mkdir(parents=True, exist_ok=True)
    log.info("grid %s x %dx%d px: n %s, q %s, angle %s, log10 r_e %s", "x".join(map(str, grid.shape)),
             grid.boxsize, grid.boxsize, *(_describe(a) for a in grid.axes))
    start = time.perf_counter()
    cube, grid = make_cube(grid, workers=workers)
    write_cube(output, cube, grid, overwrite=args.overwrite, extra_cards=generator_cards())
    del cube
    log.info("wrote %s (%d models, %.1f MB) in %.1f s", output, grid.size,
             output.stat().st_size / 1e6, time.perf_counter() - start)
    return 0


def _describe(axis: Axis) -> str:
    return f"{axis.values[0]:g}" if axis.count == 1 else \
        f"{axis.values[0]:g}..{axis.values[-1]:g} ({axis.count})"


def main(argv=None) -> int:
    return run_main("dre-models", driver, argv)


if __name__ == "__main__":
    raise SystemExit(main())
