"""Checkpoints of a chunk's fit: finished fitting units on disk, so a rerun fits only the rest.

A chunk is fitted as whole *units* (one image extension x one tile-global batch, see
`chunk_fit`); a unit's results do not depend on which rank or attempt fitted it. Each rank
appends its finished units as part files ``<chunk>.ckpt/part-r<rank>-<token>-<seq>.npz`` (written
under a temporary name, flushed to disk and renamed: a file is whole or absent), at most every
``fit.checkpoint_seconds`` and after every ``fit.checkpoint_objects`` fitted objects, and when a
stop signal arrives. Every part records the chunk's *identity* (tile, range, fit settings, the
model cube and the prep products' checksums); a rerun uses only parts of the same identity and
reports the others, so a changed config or a redone prep never mixes into the results. A part
that cannot be read (a crash of the disk, not of the job) is reported and refitted.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import sys
import time
import zipfile
from pathlib import Path

import numpy as np

PART_GLOB = "part-*.npz"


def identity_digest(fields: dict) -> str:
    """SHA-256 of the canonical JSON of `fields` (what makes two fits of a chunk the same)."""
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


class CheckpointPolicy:
    """When a rank writes its finished units: every `seconds` (0: never by time) and every
    `objects` fitted objects (None: never by count); always when stopping."""

    def __init__(self, seconds: float, objects: int | None, clock=time.monotonic):
        self.seconds, self.objects, self.clock = float(seconds), objects, clock
        self.last = clock()

    def due(self, pending_objects: int) -> bool:
        if self.objects is not None and pending_objects >= self.objects:
            return True
        return self.seconds > 0 and self.clock() - self.last >= self.seconds

    def written(self):
        self.last = self.clock()


class Checkpoint:
    """The checkpoint folder of one chunk, for one rank (`rank` names its part files)."""

    def __init__(self, folder, identity: str, rank: int = 0):
        self.folder, self.identity, self.rank = Path(folder), identity, rank
        self.token = secrets.token_hex(4)           # distinct names across attempts and rank counts
        self.parts_written = 0

    def save(self, units: dict) -> Path | None:
        """Write `units` ({uid: {column: array}}) as one part file; None when there are none."""
        if not units:
            return None
        self.folder.mkdir(parents=True, exist_ok=True)
        arrays = {"identity": np.array(self.identity), "units": np.array(sorted(units), np.int64)}
        for uid, columns in units.items():
            arrays.update({f"u{uid}.{name}": np.asarray(value) for name, value in columns.items()})
        path = self.folder / f"part-r{self.rank:04d}-{self.token}-{self.parts_written:05d}.npz"
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as handle:
            np.savez(handle, **arrays)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        self.parts_written += 1
        return path

    def load(self, expected_sizes: dict, warn=None) -> dict:
        """``{uid: {column: array}}`` of every readable part of this identity whose units are
        units of the chunk with the expected number of objects (`expected_sizes`: uid -> n)."""
        warn = warn or (lambda text: print(text, file=sys.stderr))
        units = {}
        for path in sorted(self.folder.glob(PART_GLOB)) if self.folder.is_dir() else []:
            try:
                found = _read_part(path, self.identity, expected_sizes)
            except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as exc:
                warn(f"checkpoint {path}: unreadable, its units are fitted again ({exc})")
                continue
            if found is None:
                warn(f"checkpoint {path}: from another fit of this chunk (config, cube or prep "
                     f"changed), ignored")
                continue
            units.update(found)
        return units

    def clear(self):
        """Remove the folder (the chunk's outputs are written)."""
        shutil.rmtree(self.folder, ignore_errors=True)


def _read_part(path: Path, identity: str, expected_sizes: dict):
    with np.load(path, allow_pickle=False) as part:
        if str(part["identity"]) != identity:
            return None
        found = {}
        for uid in part["units"].tolist():
            if uid not in expected_sizes:
                raise ValueError(f"unit {uid} is not a unit of this chunk")
            prefix = f"u{uid}."
            columns = {key[len(prefix):]: part[key] for key in part.files if key.startswith(prefix)}
            if not columns or any(len(v) != expected_sizes[uid] for v in columns.values()):
                raise ValueError(f"unit {uid} holds the wrong number of objects")
            found[uid] = columns
        return found
