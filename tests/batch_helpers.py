"""Helpers for the dre-batch tests: a run directory written by hand (no `dre-batch setup`).

`make_run` writes only what the jobs read: ``config.yaml`` (the resolved config, as setup writes
it) and ``manifest.json`` with the fields of the batch contract, so the worker can be tested
independently of setup, templates and schedulers.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

from dre_hpc.batch.config import resolve
from dre_hpc.batch.rundir import RunDir, safe_tile_name
from dre_hpc.models.psf import image_stem


def make_run(tmp_path, images, overrides=(), name="run") -> RunDir:
    """A run directory ``tmp_path/<name>`` over `images` with the config of `overrides`
    (``section.key=value`` strings); tiles named after the images' stems, in the given order."""
    config = resolve(None, list(overrides), source="make_run", site=True)
    root = Path(tmp_path) / name
    root.mkdir(parents=True)
    rundir = RunDir(root)
    rundir.config.write_text(config.to_yaml())
    n_chunks = config["chunking"]["chunks_per_tile"]
    tiles = [{"index": i, "name": safe_tile_name(image_stem(image)), "image": str(Path(image).resolve()),
              "n_chunks": n_chunks} for i, image in enumerate(images)]
    assert len({t["name"] for t in tiles}) == len(tiles), "tile names must be unique"
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    manifest = {"run": config["run"]["name"], "scheduler": config["scheduler"]["name"],
                "config_hash": config.hash(), "created": created, "tiles": tiles}
    rundir.manifest.write_text(json.dumps(manifest, indent=1) + "\n")
    return rundir


# -- end-to-end runs through the dre-batch command ---------------------------------------------------
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import yaml  # noqa: E402


@pytest.fixture(scope="session")
def sim_tiles(tmp_path_factory):
    """Two tiny simulated tiles (``tile_a``, ``tile_b``) and a tiles file listing them."""
    from dre_hpc.sim.tile import TileSpec, simulate_tile
    root = tmp_path_factory.mktemp("batch_tiles")
    for seed, name in ((3, "tile_a"), (4, "tile_b")):
        spec = TileSpec(size=512, n_galaxies=15, n_stars=30, seed=seed)
        simulate_tile(spec, root / "Tiles" / f"{name}.fits", root / "Truth" / f"{name}_truth.fits")
    tiles = root / "tiles.txt"
    tiles.write_text("".join(f"{root / 'Tiles' / n}.fits\n" for n in ("tile_a", "tile_b")))
    return tiles


def write_config(path, chunks_per_tile=None, objects_per_chunk=None, scheduler="local", **sections):
    """A run config file for the tests: run ``batch_test``, 2 local jobs at once, small resources;
    `sections` (e.g. ``resources={"fit": {...}}``) are merged on top."""
    chunking = ({"chunks_per_tile": chunks_per_tile} if chunks_per_tile
                else {"objects_per_chunk": objects_per_chunk or 1000})
    config = {"run": {"name": "batch_test", "seed": 11}, "fit": {"batch_size": 8}, "chunking": chunking,
              "scheduler": {"name": scheduler, "max_parallel": 2},
              "resources": {stage: {"mem_gb": 1, "walltime": "00:10:00"} for stage in ("prep", "fit")}}
    for section, values in sections.items():
        for key, value in values.items():
            if isinstance(value, dict):
                config.setdefault(section, {}).setdefault(key, {}).update(value)
            else:
                config.setdefault(section, {})[key] = value
    Path(path).write_text(yaml.safe_dump(config))
    return path


def dre_batch(*args, env=None, timeout=300, cwd=None):
    """``dre-batch ARGS`` as a user runs it (a subprocess); the CompletedProcess (text)."""
    return subprocess.run([sys.executable, "-m", "dre_hpc.cli.dre_batch", *map(str, args)], text=True,
                          capture_output=True, env=env, timeout=timeout, cwd=cwd)


def assert_same_catalogue(path_a, path_b):
    """The two FITS tables have the same columns and exactly the same values (NaN equal to NaN);
    headers (times, hosts) are not compared."""
    from astropy.io import fits
    import numpy as np
    a, b = fits.getdata(path_a, 1), fits.getdata(path_b, 1)
    assert a.names == b.names and len(a) == len(b)
    for name in a.names:
        x, y = np.asarray(a[name]), np.asarray(b[name])
        equal_nan = x.dtype.kind in "fc"
        assert np.array_equal(x, y, equal_nan=equal_nan), f"column {name} differs"


def assert_collates_as_reference(run_dir, reference_dir):
    """`run_dir` is all done and collates to exactly the catalogue of `reference_dir` (the
    uninterrupted run, collated here if it was not yet)."""
    assert dre_batch("status", run_dir).returncode == 0
    assert dre_batch("collate", run_dir).returncode == 0
    if not flat_path(reference_dir).exists():
        assert dre_batch("collate", reference_dir).returncode == 0
    assert_same_catalogue(flat_path(run_dir), flat_path(reference_dir))


def chunk_process(tile_index: int, chunk: int, argv_matches):
    """PID of a running process of one chunk (from /proc): its environment holds the chunk's
    ``DRE_TILE`` and ``DRE_ARRAY_INDEX`` and ``argv_matches(argv)`` (a list of bytes) is true."""
    wanted = (f"DRE_TILE={tile_index}".encode(), f"DRE_ARRAY_INDEX={chunk}".encode())
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            env = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if all(w in env for w in wanted) and argv_matches(argv):
            return int(entry.name)
    return None


def signal_when_started(run_dir, tile: str, tile_index: int, chunk: int, sig, argv_matches,
                        timeout=120.0) -> None:
    """Once chunk `chunk` of `tile` has written its started marker, send `sig` to its process
    that `argv_matches` (see `chunk_process`); AssertionError if it never starts."""
    import os
    import time
    marker = Path(run_dir) / "markers" / "fit" / tile / f"{chunk:05d}.started"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if marker.exists():
            pid = chunk_process(tile_index, chunk, argv_matches)
            if pid:
                os.kill(pid, sig)
                return
        time.sleep(0.005)
    raise AssertionError(f"chunk {chunk} of {tile} never started")


def collated_copy(reference_dir, run_dir) -> Path:
    """A copy of a finished run at `run_dir`, collated there (the reference run is left as it is)."""
    import shutil
    shutil.copytree(reference_dir, run_dir, symlinks=True)
    result = dre_batch("collate", run_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    return Path(run_dir)


def flat_path(run_dir) -> Path:
    """The flat catalogue that collate writes: ``collated/<run>_dre.fits``."""
    name = json.loads((Path(run_dir) / "manifest.json").read_text())["run"]
    return Path(run_dir) / "collated" / f"{name}_dre.fits"


@pytest.fixture(scope="session")
def local_reference(tmp_path_factory, sim_tiles, default_cube_file):
    """One uninterrupted local run of the two tiles (2 chunks each), set up in one directory and
    moved to another before running (paths are relative): ``(run_dir, CompletedProcess of run)``."""
    import shutil
    root = tmp_path_factory.mktemp("batch_local")
    config = write_config(root / "run.yaml", chunks_per_tile=2)
    setup = dre_batch("setup", config, sim_tiles, "--run-dir", root / "staged")
    assert setup.returncode == 0, setup.stderr
    shutil.move(root / "staged", root / "run")
    result = dre_batch("run", root / "run")
    assert result.returncode == 0, result.stdout + result.stderr
    return root / "run", result


def run_with_broken_tile(tmp_path, images=()):
    """Set up and run (local scheduler, 2 chunks a tile) `images` and then a tile ``broken`` whose
    image is garbage: its prep fails. Returns ``(run_dir, CompletedProcess of run)``."""
    broken = Path(tmp_path) / "broken.fits"
    broken.write_bytes(b"SIMPLE  =                    T" + b"\x00garbage" * 100)
    tiles = Path(tmp_path) / "tiles.txt"
    tiles.write_text("".join(f"{image}\n" for image in (*images, broken)))
    run_dir = Path(tmp_path) / "run"
    assert dre_batch("setup", write_config(Path(tmp_path) / "run.yaml", chunks_per_tile=2), tiles,
                     "--run-dir", run_dir).returncode == 0
    result = dre_batch("run", run_dir)
    assert result.returncode == 1 and "prep broken: failed" in result.stdout, result.stdout
    return run_dir, result
