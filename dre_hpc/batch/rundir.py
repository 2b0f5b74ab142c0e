"""The run directory of dre-batch: where every file of a run lives, the manifest, and the markers.

Every path inside a run is relative to the run directory (job scripts ``cd`` into it first), so
a run directory can be moved. Layout::

    DIR/config.yaml                      the resolved run config (RunConfig.to_yaml)
    DIR/provenance.json                  versions, seed, config hash, command line, time
    DIR/manifest.json                    tiles: index, name, image, n_chunks (null until prep)
    DIR/scripts/{prep,fit,collate}.sh    rendered job scripts (one per stage, array jobs)
    DIR/tiles/<tile>/{Sextracted,PSF,Cuts}/   prep products of a tile
    DIR/chunks/<tile>/<k>_dre.fits, <k>_chi.h5 chunk outputs (k zero-padded to 5 digits)
    DIR/markers/prep/<tile>.{started,done,failed}     written by the prep job itself
    DIR/markers/fit/<tile>/<k>.{started,done,failed}  written by the fit job itself
    DIR/logs/prep/<tile>.log, DIR/logs/fit/<tile>/<k>.log
    DIR/jobs/<n>.json                    one record per submission (stage, tile, indices, job id)
    DIR/collated/<tile>_dre.fits, <tile>_chi.h5, <run>_dre.fits
    DIR/output/                          `dre-batch link`: the final files
    DIR/.run.lock                        held by `dre-batch run` while it submits or runs

Markers are small JSON files written atomically (temporary name in the same folder, then
``os.replace``). A job writes ``started`` when it begins and ``done`` or ``failed`` when it ends;
writing one of these removes the others, so a chunk has at most one marker. ``started`` without a
job the scheduler still runs means the job died without saying why (SIGKILL, node loss).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from dre_hpc.errors import DreError

CONFIG = "config.yaml"
PROVENANCE = "provenance.json"
MANIFEST = "manifest.json"
#: Numba's cache of the fit's compiled kernels, shared by the run's fit jobs (`compiled.cache_in`).
NUMBA_CACHE = ".cache/numba"
STAGES = ("prep", "fit", "collate")
OUTCOMES = ("done", "failed")                 # final outcomes; "started" is written first
MARKER_KINDS = OUTCOMES + ("started",)
_SAFE = re.compile(r"[^A-Za-z0-9_.+-]")
MAX_TILE_NAME = 64


class RunDirError(DreError):
    """A run directory that is missing, incomplete or not a dre-batch run."""


def chunk_label(k: int) -> str:
    """The file-name label of chunk `k`: zero-padded to 5 digits (sorts in chunk order)."""
    return f"{int(k):05d}"


def safe_tile_name(stem: str) -> str:
    """A tile name usable as one path component and as one shell word: characters outside
    ``[A-Za-z0-9_.+-]`` (blanks, quotes, ``$``, ``;``, newlines, non-ASCII, ``/``...) become ``_``
    and leading dots and dashes are dropped (never ``..``, an option-like ``-x`` or empty:
    ``tile`` then). A name longer than `MAX_TILE_NAME` characters is cut and ends in ``_`` and 8 hex
    digits of the stem's SHA-1 (SExtractor and PSFEx overflow their buffers on long paths, and a
    product name must stay below the file system's 255 bytes). The manifest records the name with
    the image it came from."""
    name = _SAFE.sub("_", str(stem)).lstrip(".-") or "tile"
    if len(name) > MAX_TILE_NAME:
        digest = hashlib.sha1(str(stem).encode("utf-8", "surrogateescape")).hexdigest()[:8]
        name = f"{name[:MAX_TILE_NAME - 9]}_{digest}"
    return name


def is_safe_tile_name(name) -> bool:
    """Whether `name` is one harmless path component: what `safe_tile_name` makes of it."""
    return isinstance(name, str) and safe_tile_name(name) == name


def current_umask() -> int:
    """The process umask (read by setting and restoring it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def mask_world_writable() -> int:
    """Add ``o+w`` to the process umask (dre-batch and its jobs never create world-writable files
    or folders, whatever the user's umask); returns the umask now in force."""
    mask = current_umask() | 0o002
    os.umask(mask)
    return mask


def check_inside(root, path) -> Path:
    """`path` if it lies lexically below `root` and none of its existing components below `root`
    is a symbolic link; else a RunDirError. Writers call it before writing or removing anything,
    so that no link planted in a run directory can send a job's output (or a removal) outside."""
    root, path = Path(root), Path(path)
    try:
        relative = path.relative_to(root)
    except ValueError:
        raise RunDirError(f"{path}: not inside the run directory {root}") from None
    if any(part in ("..", "") for part in relative.parts):
        raise RunDirError(f"{path}: not inside the run directory {root} ('..' in the path)")
    current = root
    for part in relative.parts:
        current = current / part
        if current.is_symlink():
            raise RunDirError(f"{current} is a symbolic link: dre-batch never writes or removes through "
                              f"links in a run directory (remove the link)")
        if not current.exists():
            break
    return path


def remove_path(root, path) -> None:
    """Remove `path` (a file, a link: the link itself, never its target; a folder: its tree, links
    inside it removed, not followed) after `check_inside` has checked its parents."""
    path = Path(path)
    check_inside(root, path.parent)
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.is_dir():
        shutil.rmtree(path)


def write_atomic(path: Path, text: str, mode: int = 0o666) -> None:
    """Write `text` to `path` through a temporary file in the same folder and a rename; the file
    gets `mode` less the umask and never ``o+w`` (mkstemp alone would leave it 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode & ~current_umask() & ~0o002)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, content: dict) -> None:
    """`content` as indented JSON, atomically."""
    write_atomic(path, json.dumps(content, indent=1, sort_keys=False) + "\n")


def read_json(path: Path, what: str) -> dict:
    """A JSON object from `path`, or a RunDirError naming the file and `what` it should be."""
    try:
        with open(path, encoding="utf-8") as handle:
            content = json.load(handle)
    except FileNotFoundError:
        raise RunDirError(f"{path}: {what} not found") from None
    except (OSError, ValueError) as exc:
        raise RunDirError(f"{path}: cannot read {what}: {exc}") from None
    if not isinstance(content, dict):
        raise RunDirError(f"{path}: {what} is not a JSON object")
    return content


def utc_now() -> str:
    """The current UTC time, ISO 8601 to the second: the time stamp of every run record."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def stream_sha256(handle, block: int = 1 << 20) -> str:
    """SHA-256 (hex) of what a binary file object yields, read in `block`-byte pieces."""
    digest = hashlib.sha256()
    for piece in iter(lambda: handle.read(block), b""):
        digest.update(piece)
    return digest.hexdigest()


def file_sha256(path: Path, block: int = 1 << 20) -> str:
    """SHA-256 (hex) of a file's bytes, read in `block`-byte pieces."""
    with open(path, "rb") as handle:
        return stream_sha256(handle, block)


@dataclass(frozen=True)
class Tile:
    """One tile of a run: its position in the manifest (the prep array index), its name (a safe
    path component, unique in the run), its image (absolute path) and its chunk count (None until
    prep has counted the objects, when the run uses ``objects_per_chunk``)."""

    index: int
    name: str
    image: str
    n_chunks: int | None


class RunDir:
    """Paths and records of one run directory (nothing is created until a writer is called)."""

    def __init__(self, root):
        self.root = Path(root)

    # -- fixed files -------------------------------------------------------------------------
    @property
    def config(self) -> Path:
        return self.root / CONFIG

    @property
    def provenance(self) -> Path:
        return self.root / PROVENANCE

    @property
    def manifest(self) -> Path:
        return self.root / MANIFEST

    @property
    def lock(self) -> Path:
        return self.root / ".run.lock"

    def script(self, stage: str) -> Path:
        return self.root / "scripts" / f"{stage}.sh"

    def exists(self) -> bool:
        """Whether `root` holds a run (its manifest)."""
        return self.manifest.is_file()

    def require(self) -> "RunDir":
        """Self, or a RunDirError when `root` is not a set-up run directory."""
        if not self.root.is_dir():
            raise RunDirError(f"{self.root}: run directory not found (create it with dre-batch setup)")
        if not self.exists():
            raise RunDirError(f"{self.root}: not a dre-batch run directory (no {MANIFEST}; "
                              f"create it with dre-batch setup)")
        return self

    def check_inside(self, path) -> Path:
        """`path`, checked by `check_inside` against this run directory (no link on the way)."""
        return check_inside(self.root, path)

    # -- per tile and chunk --------------------------------------------------------------------
    def tile_dir(self, tile: str) -> Path:
        return self.root / "tiles" / tile

    def chunk_dir(self, tile: str) -> Path:
        return self.root / "chunks" / tile

    def chunk_outputs(self, tile: str, k: int) -> dict:
        """Paths of chunk `k` of `tile` by kind: ``dre`` (FITS summary) and ``chi`` (HDF5)."""
        base = self.chunk_dir(tile) / chunk_label(k)
        return {"dre": base.with_name(base.name + "_dre.fits"), "chi": base.with_name(base.name + "_chi.h5")}

    def checkpoint_dir(self, tile: str, k: int) -> Path:
        """Where the fit of chunk `k` of `tile` keeps its checkpoint files until it is done."""
        return self.chunk_dir(tile) / f"{chunk_label(k)}.ckpt"

    def model_cache(self, tile: str) -> Path:
        """Where the models convolved with the tile's PSFs are kept for its fit jobs (beside the
        prep products: a new prep removes them with the rest, and archive cleans them)."""
        return self.tile_dir(tile) / "models"

    def marker_dir(self, stage: str, tile: str | None = None) -> Path:
        """``markers/prep`` or ``markers/fit/<tile>``."""
        folder = self.root / "markers" / stage
        return folder / tile if stage == "fit" else folder

    def marker(self, stage: str, tile: str, k: int | None = None, outcome: str = "done") -> Path:
        """The `outcome` marker (done, failed, started) of a tile's prep (k None) or of chunk `k`."""
        if outcome not in MARKER_KINDS:
            raise ValueError(f"outcome must be one of {MARKER_KINDS}, got {outcome!r}")
        if stage == "prep":
            return self.marker_dir("prep") / f"{tile}.{outcome}"
        return self.marker_dir("fit", tile) / f"{chunk_label(k)}.{outcome}"

    def log(self, stage: str, tile: str, k: int | None = None) -> Path:
        if stage == "prep":
            return self.root / "logs" / "prep" / f"{tile}.log"
        return self.root / "logs" / "fit" / tile / f"{chunk_label(k)}.log"

    def collated(self, name: str) -> Path:
        return self.root / "collated" / name

    @property
    def output_dir(self) -> Path:
        return self.root / "output"

    @property
    def jobs_dir(self) -> Path:
        return self.root / "jobs"

    # -- records -------------------------------------------------------------------------------
    def write_marker(self, stage: str, tile: str, k: int | None, outcome: str, content: dict) -> Path:
        """Write the `outcome` marker atomically and remove the other kinds."""
        path = self.marker(stage, tile, k, outcome)
        self.check_inside(path)
        write_json(path, content)
        for other in MARKER_KINDS:
            if other != outcome:
                self.marker(stage, tile, k, other).unlink(missing_ok=True)
        return path

    def read_marker(self, stage: str, tile: str, k: int | None = None) -> tuple:
        """``(kind, content)`` of a tile's prep or chunk (done, failed or started), or ``(None, None)``
        without a marker. A marker that cannot be read is reported as failed with the reason."""
        for outcome in MARKER_KINDS:
            path = self.marker(stage, tile, k, outcome)
            if path.exists():
                try:
                    return outcome, read_json(path, f"{stage} {outcome} marker")
                except RunDirError as exc:
                    return "failed", {"reason": str(exc)}
        return None, None

    def read_manifest(self) -> dict:
        return read_json(self.require().manifest, "run manifest")

    def tiles(self) -> list:
        """The run's tiles, in manifest (prep array) order, with chunk counts filled in from the
        prep done markers where setup could not know them."""
        tiles = []
        for entry in self.read_manifest()["tiles"]:
            if not is_safe_tile_name(entry.get("name")):
                raise RunDirError(f"{self.manifest}: tile name {entry.get('name')!r} is not a safe path "
                                  f"component (letters, digits, _ . + -, no leading dot or dash); "
                                  f"set the run up again with dre-batch setup")
            n_chunks = entry["n_chunks"]
            if n_chunks is None:
                outcome, content = self.read_marker("prep", entry["name"])
                if outcome == "done":
                    n_chunks = content.get("n_chunks")
            tiles.append(Tile(entry["index"], entry["name"], entry["image"], n_chunks))
        return tiles

    def tile(self, index: int) -> Tile:
        """The tile at manifest `index` (a RunDirError for an index outside the manifest)."""
        tiles = self.tiles()
        if not 0 <= index < len(tiles):
            raise RunDirError(f"{self.manifest}: no tile with index {index} (the run has {len(tiles)})")
        return tiles[index]

    def record_submission(self, record: dict) -> Path:
        """Save one submission record as ``jobs/<n>.json`` (n: one more than the highest so far;
        exclusive creation, so concurrent writers never overwrite each other)."""
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        n = max((int(p.stem) for p in self.jobs_dir.glob("*.json") if p.stem.isdigit()), default=-1) + 1
        while True:
            path = self.jobs_dir / f"{n:06d}.json"
            try:
                with open(path, "x", encoding="utf-8") as handle:
                    json.dump(record, handle, indent=1)
                    handle.write("\n")
                return path
            except FileExistsError:
                n += 1

    def submissions(self) -> list:
        """All submission records, oldest first."""
        if not self.jobs_dir.is_dir():
            return []
        return [read_json(p, "submission record") for p in sorted(self.jobs_dir.glob("*.json"))]
