"""Run directories built by hand for the status, collate and archive tests (and the benchmark).

Everything is real: config.yaml from `resolve(...).to_yaml()`, a manifest as in the batch spec,
chunk outputs written with `write_summary` / `write_chi` (the fit job's writers), done markers with
the files' real SHA-256 and byte counts, failed markers, logs and submission records through
`RunDir`. Only the fit itself is skipped: the summary values are synthetic but deterministic in
(tile, object index), so tests can check row order after collation.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from dre_hpc import __version__
from dre_hpc.batch.chunking import chunk_range
from dre_hpc.batch.config import resolve
from dre_hpc.batch.prep_job import prep_digest
from dre_hpc.batch.rundir import RunDir, file_sha256, write_json
from dre_hpc.fit.subgrid import FIT_COLUMNS
from dre_hpc.io.cuts import empty_objects, object_name
from dre_hpc.io.outputs import summary_table, write_chi, write_summary
from dre_hpc.models.grid import ModelGrid

FLOAT_COLUMNS = ["CHI", "CHI_STD", "LOGR_CHI", "LOGR_VAR", "LOGR_CHI_VAR", "LOGR_PARAB", "LOGR_STD",
                 "INDEX", "LOGR", "AX_RATIO", "ANGLE", "FLUX", "FLUX_ERR", "CHI2", "INDEX_MEAN",
                 "INDEX_ERR", "AX_RATIO_MEAN", "AX_RATIO_ERR", "ANGLE_MEAN", "ANGLE_ERR", "LOGR_MEAN",
                 "LOGR_ERR", *(name + suffix for name in FIT_COLUMNS for suffix in ("", "_ERR"))]


def make_run(root, tiles: dict, chunks_per_tile: int | None = 2, known: bool = True, name="testrun",
             scheduler="local") -> RunDir:
    """A set-up run in `root`: `tiles` maps tile names to object counts (manifest order).
    With `known` False the manifest has ``n_chunks`` null (objects_per_chunk, before prep)."""
    chunking = ["chunking.chunks_per_tile=%d" % chunks_per_tile] if chunks_per_tile else []
    config = resolve(None, [f"run.name={name}", "run.seed=7", f"scheduler.name={scheduler}"] + chunking,
                     site=True)
    rundir = RunDir(root)
    rundir.root.mkdir(parents=True, exist_ok=True)
    rundir.config.write_text(config.to_yaml(), encoding="utf-8")
    write_json(rundir.provenance, {"run": name, "seed": 7, "config_hash": config.hash(),
                                   "versions": {"dre_hpc": __version__}})
    n_chunks = chunks_per_tile if chunks_per_tile and known else None
    entries = [{"index": i, "name": t, "image": f"/data/{t}.fits", "n_chunks": n_chunks}
               for i, t in enumerate(tiles)]
    write_json(rundir.manifest, {"run": name, "scheduler": scheduler, "config_hash": config.hash(),
                                 "created": "2026-01-01T00:00:00", "tiles": entries})
    for script in ("prep", "fit"):
        rundir.script(script).parent.mkdir(parents=True, exist_ok=True)
        rundir.script(script).write_text(f"#!/bin/bash\necho {script}\n")
    return rundir


def chunk_table(tile_index: int, start: int, stop: int):
    """A Summary table (the `dre` command's columns and dtypes) for objects [start, stop)."""
    n = stop - start
    base = np.arange(start, stop, dtype=float) + 1000.0 * tile_index
    results = {c: base + j / 100.0 for j, c in enumerate(FLOAT_COLUMNS)}
    results.update(MODEL_IDX=np.zeros((n, 4), np.int16), DOF=np.full(n, 100, np.int64),
                   NPIX=np.full(n, 120, np.int64), FLAGS=np.zeros(n, np.int64))
    objects = empty_objects(n)
    objects["NUMBER"] = np.arange(start, stop) + 1
    objects["EXT_NUMBER"] = 1
    objects["X_IMAGE"] = base
    table = summary_table(results, objects, zero_point=25.0, meta={"STATISTC": "wls"})
    table["ROW"] = np.arange(start, stop)
    return table


def write_chunk_outputs(rundir: RunDir, tile: str, tile_index: int, start: int, stop: int, k: int,
                        grid: ModelGrid | None = None) -> dict:
    """Write chunk `k`'s FITS and HDF5 files; ``{kind: {"path", "sha256", "bytes"}}``."""
    grid = grid or ModelGrid.default()
    paths = rundir.chunk_outputs(tile, k)
    write_summary(paths["dre"], chunk_table(tile_index, start, stop))
    names = [object_name(1, i + 1) for i in range(start, stop)]
    surfaces = (np.arange(stop - start, dtype=np.float32)[:, None] + start
                + np.zeros((1, grid.size), np.float32))
    write_chi(paths["chi"], names, surfaces, grid, "wls", compression="none")
    return {kind: {"path": p.relative_to(rundir.root).as_posix(), "sha256": file_sha256(p),
                   "bytes": p.stat().st_size} for kind, p in paths.items()}


def done_prep(rundir: RunDir, tile: str, n_objects: int, n_chunks: int) -> None:
    rundir.write_marker("prep", tile, None, "done", {
        "tile": tile, "n_objects": n_objects, "n_chunks": n_chunks, "seconds": 1.0, "job_id": "1",
        "host": "test", "time": "2026-01-01T00:00:00", "outputs": {}})


def done_chunk(rundir: RunDir, tile: str, tile_index: int, n_objects: int, k: int, n_chunks: int,
               write_outputs: bool = True) -> dict:
    """Write chunk `k`'s outputs and its done marker (with real checksums); the marker content."""
    start, stop = chunk_range(n_objects, k, n_chunks)
    outputs = write_chunk_outputs(rundir, tile, tile_index, start, stop, k) if write_outputs else {}
    content = {"tile": tile, "chunk": k, "n_chunks": n_chunks, "start": start, "stop": stop,
               "rows": stop - start, "outputs": outputs, "seconds": 0.1, "job_id": "2",
               "host": "test", "time": "2026-01-01T00:00:00", "config_hash": "x",
               "prep_digest": prep_digest(rundir.read_marker("prep", tile)[1] or {})}
    rundir.write_marker("fit", tile, k, "done", content)
    rundir.log("fit", tile, k).parent.mkdir(parents=True, exist_ok=True)
    rundir.log("fit", tile, k).write_text(f"fit {tile} {k}\n")
    return content


def failed(rundir: RunDir, stage: str, tile: str, k: int | None, reason: str) -> None:
    rundir.write_marker(stage, tile, k, "failed", {
        "reason": reason, "traceback": None, "exit_code": 1, "retryable": True, "job_id": "3",
        "host": "test", "time": "2026-01-01T00:00:00"})


def complete_run(root, tiles: dict, chunks_per_tile: int = 2, name="testrun") -> RunDir:
    """A run whose every prep and chunk is done, with real chunk outputs."""
    rundir = make_run(root, tiles, chunks_per_tile, name=name)
    for index, (tile, n) in enumerate(tiles.items()):
        done_prep(rundir, tile, n, chunks_per_tile)
        rundir.log("prep", tile).parent.mkdir(parents=True, exist_ok=True)
        rundir.log("prep", tile).write_text(f"prep {tile}\n")
        for k in range(chunks_per_tile):
            done_chunk(rundir, tile, index, n, k, chunks_per_tile)
    return rundir


def submit(rundir: RunDir, stage: str, tile: str | None, indices, job_id: str, scheduler="slurm"):
    """A submission record as `dre-batch run` writes it."""
    return rundir.record_submission({"stage": stage, "tile": tile, "indices": list(indices),
                                     "job_id": job_id, "scheduler": scheduler,
                                     "command": ["sbatch", "scripts/%s.sh" % stage],
                                     "time": "2026-01-01T00:00:00"})


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())
