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
    config = resolve(None, list(overrides), source="make_run")
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
