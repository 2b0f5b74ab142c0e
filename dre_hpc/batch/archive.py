"""The end of a run: link the final files, archive the bookkeeping, clean the intermediates.

* `link` puts the collated files, ``provenance.json`` and ``config.yaml`` into ``DIR/output/`` as
  symlinks with relative targets (copies where symlinks cannot be made); it needs a collate.
* `archive` packs ``logs/``, ``scripts/``, ``markers/``, ``jobs/``, the config, provenance, manifest
  and the collate record into ``DIR/<run>_archive.tar.gz``, reads the archive back and compares
  every member, and only then removes ``chunks/`` and the packed ``logs/`` and ``markers/``. It needs
  a *verified* collate: ``collated/collate.json`` exists, no chunk was missing, the collated files
  still have the checksums recorded there, and no chunk was redone since. Otherwise it refuses and
  removes nothing. Symlinks are never followed: one pointing inside the run directory is stored as
  a symlink, one pointing outside is left out (and listed).
* `clean` removes ``tiles/`` (prep products) and/or ``chunks/`` of a run with a verified collate.
* `extract_archive` unpacks an archive and refuses members that would land outside the target
  (absolute names, ``..``, links pointing outside, device files).
"""

from __future__ import annotations

import os
import shutil
import tarfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from dre_hpc.batch.collate import MISSING, RECORD, read_record
from dre_hpc.batch.rundir import (CONFIG, MANIFEST, PROVENANCE, RunDir, file_sha256, stream_sha256,
                                  utc_now, write_json)
from dre_hpc.batch.status import ARCHIVE_RECORD
from dre_hpc.errors import DreError

PACKED = ("logs", "scripts", "markers", "jobs", CONFIG, PROVENANCE, MANIFEST, f"collated/{RECORD}")
REMOVED_AFTER = ("chunks", "logs", "markers")
#: What `clean` removes: prep products (and the model cache), chunk outputs, the fit kernels' cache.
CLEANABLE = ("tiles", "chunks", ".cache")


class ArchiveError(DreError):
    """Link, archive, clean or extract refused: the message says why; nothing was removed."""


@dataclass
class ArchiveReport:
    """The archive written, its member count, what was left out (outside links, special files)
    and what was removed afterwards."""

    path: Path
    members: int
    skipped: list = field(default_factory=list)
    removed: list = field(default_factory=list)


def _rundir(rundir) -> RunDir:
    return (rundir if isinstance(rundir, RunDir) else RunDir(rundir)).require()


def verified_record(rundir: RunDir) -> dict:
    """The collate record, after checking that collate was complete, that the collated files still
    have their recorded SHA-256, and that no chunk's done marker changed since; else ArchiveError."""
    try:
        record = read_record(rundir)
    except DreError as exc:
        raise ArchiveError(str(exc)) from None
    if record.get("missing"):
        raise ArchiveError(f"{rundir.collated(RECORD)}: collate ran with --allow-missing "
                           f"({record['missing']} chunks missing); finish the run and collate again")
    for rel, expected in record.get("outputs", {}).items():
        path = rundir.root / rel
        if not path.is_file() or file_sha256(path) != expected.get("sha256"):
            raise ArchiveError(f"{path}: collated file missing or changed since collate; "
                               f"run dre-batch collate again")
    for tile, entry in record.get("tiles", {}).items():
        if not rundir.marker_dir("fit", tile).is_dir():     # archived: the markers are packed
            continue
        for chunk in entry.get("chunks", []):
            _, marker = rundir.read_marker("fit", tile, chunk["chunk"])
            current = {k: v.get("sha256") for k, v in ((marker or {}).get("outputs") or {}).items()}
            if current != chunk["sha256"]:
                raise ArchiveError(f"tile {tile} chunk {chunk['chunk']} changed since collate "
                                   f"(rerun?); run dre-batch collate again")
    return record


def _final_files(rundir: RunDir, record: dict) -> list:
    files = [rundir.root / rel for rel in record.get("outputs", {})]
    files += [rundir.provenance, rundir.config]
    if rundir.collated(MISSING).is_file():
        files.append(rundir.collated(MISSING))
    return files


def link(rundir) -> list:
    """Symlinks (relative targets; copies where symlinks fail) in ``output/`` to the final files."""
    rundir = _rundir(rundir)
    try:
        record = read_record(rundir)
    except DreError as exc:
        raise ArchiveError(str(exc)) from None
    out = rundir.check_inside(rundir.output_dir)      # a link there would put the links elsewhere
    out.mkdir(exist_ok=True)
    made = []
    for target in _final_files(rundir, record):
        if not target.is_file():
            raise ArchiveError(f"{target}: listed by the collate record but missing; "
                               f"run dre-batch collate again")
        made.append(_link_one(target, out / target.name))
    return made


def _link_one(target: Path, destination: Path) -> Path:
    tmp = destination.with_name(f".{destination.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.symlink(os.path.relpath(target, destination.parent), tmp)
    except OSError:                      # e.g. a file system without symlinks
        shutil.copy2(target, tmp)
    os.replace(tmp, destination)
    return destination


def _outside_link(root: Path, path: Path) -> bool:
    """Whether symlink `path` points outside `root` (absolute targets count as outside)."""
    target = os.readlink(path)
    if os.path.isabs(target):
        return True
    lexical = os.path.normpath(os.path.join(os.path.dirname(path.relative_to(root)), target))
    real = os.path.realpath(path)
    real_root = os.path.realpath(root)
    return lexical.split(os.sep)[0] == ".." or os.path.commonpath([real, real_root]) != real_root


def _entries(root: Path, skipped: list):
    """(path, arcname) of everything under the packed names, without following any symlink."""
    for name in PACKED:
        top = root / name
        if not os.path.lexists(top):
            continue
        stack = [top]
        while stack:
            path = stack.pop()
            rel = path.relative_to(root).as_posix()
            if path.is_symlink():
                if _outside_link(root, path):
                    skipped.append(f"{rel} (symlink to {os.readlink(path)}, outside the run directory)")
                    continue
                yield path, rel
            elif path.is_dir():
                yield path, rel
                stack.extend(sorted(path.iterdir(), reverse=True))
            elif path.is_file():
                yield path, rel
            else:
                skipped.append(f"{rel} (not a regular file, directory or symlink)")


def _sha256_member(tar: tarfile.TarFile, member: tarfile.TarInfo) -> str:
    return stream_sha256(tar.extractfile(member))


def _verify_archive(path: Path, expected: dict) -> None:
    """Every member is there, with the same type and (files) the same SHA-256; else ArchiveError."""
    try:
        with tarfile.open(path, "r:gz") as tar:
            found = {}
            for member in tar:
                found[member.name] = _sha256_member(tar, member) if member.isreg() else member.type
    except (OSError, tarfile.TarError, EOFError) as exc:
        raise ArchiveError(f"{path}: the archive cannot be read back ({exc}); nothing was removed") from None
    if found != expected:
        bad = sorted(set(found.items()) ^ set(expected.items()))[:5]
        raise ArchiveError(f"{path}: the archive read back differs from the run ({bad}); nothing was removed")


def _pack(rundir: RunDir, path: Path) -> tuple:
    """Write the archive at a temporary name, verify it, rename it; (members, skipped)."""
    skipped, expected = [], {}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)                   # a link planted at the temporary name goes first
    try:
        with tarfile.open(tmp, "w:gz", format=tarfile.PAX_FORMAT) as tar:
            for source, arcname in _entries(rundir.root, skipped):
                info = tar.gettarinfo(str(source), arcname)
                if info.isreg():
                    with open(source, "rb") as handle:
                        tar.addfile(info, handle)
                    expected[arcname] = file_sha256(source)
                else:
                    tar.addfile(info)
                    expected[arcname] = info.type
        _verify_archive(tmp, expected)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return len(expected), skipped


def _remove(path: Path) -> bool:
    """Remove a file, symlink (never its target) or directory tree; whether something was there."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)
    else:
        return False
    return True


def archive_path(rundir: RunDir, run: str) -> Path:
    return rundir.root / f"{run}_archive.tar.gz"


def archive(rundir) -> ArchiveReport:
    """Pack the bookkeeping of a run with a verified collate, then remove the intermediates."""
    rundir = _rundir(rundir)
    run = rundir.read_manifest().get("run", rundir.root.name)
    path = rundir.check_inside(archive_path(rundir, run))
    if rundir.collated(ARCHIVE_RECORD).is_file() and path.is_file():
        raise ArchiveError(f"{path}: the run is already archived (see {rundir.collated(ARCHIVE_RECORD)})")
    verified_record(rundir)
    members, skipped = _pack(rundir, path)
    write_json(rundir.collated(ARCHIVE_RECORD), {
        "archive": path.name, "sha256": file_sha256(path), "bytes": path.stat().st_size,
        "members": members, "skipped": skipped, "removed": list(REMOVED_AFTER),
        "time": utc_now()})
    removed = [name for name in REMOVED_AFTER if _remove(rundir.root / name)]
    return ArchiveReport(path, members, skipped, removed)


def clean(rundir, what=("tiles",)) -> list:
    """Remove `what` (``tiles``: prep products and their model cache, ``chunks``: chunk outputs,
    ``.cache``: Numba's compiled kernels) of a run with a verified collate; the names of what was
    removed."""
    rundir = _rundir(rundir)
    unknown = [w for w in what if w not in CLEANABLE]
    if unknown:
        raise ArchiveError(f"clean: unknown part {unknown[0]!r}; choose from {', '.join(CLEANABLE)}")
    verified_record(rundir)
    return [name for name in what if _remove(rundir.root / name)]


def _unsafe(member: tarfile.TarInfo, has_filter: bool) -> str | None:
    """Why `member` could write outside the extraction target, or None."""
    name = PurePosixPath(member.name)
    if name.is_absolute() or member.name.startswith(("/", "\\")) or ":" in name.parts[0]:
        return "absolute path"
    if ".." in name.parts:
        return "'..' in the path"
    if not (member.isreg() or member.isdir() or member.issym() or member.islnk()):
        return "device, FIFO or other special file"
    if member.issym() or member.islnk():
        link = PurePosixPath(member.linkname)
        base = name.parent if member.issym() else PurePosixPath(".")
        resolved = os.path.normpath(str(base / link))
        if link.is_absolute() or resolved.split("/")[0] == "..":
            return f"link to {member.linkname}, outside the target"
        if not has_filter and ".." in link.parts:
            return f"link through '..' ({member.linkname})"
    return None


def extract_archive(path, target) -> list:
    """Extract the archive `path` into `target` (created if needed). A member that could land
    outside `target` is refused with an ArchiveError naming it: by name before anything is
    extracted, and (where tarfile has the ``data`` filter) through chains of links while
    extracting. Returns the member names."""
    target = Path(target)
    has_filter = hasattr(tarfile, "data_filter")        # Python >= 3.11.4 / 3.12: realpath checks
    try:
        with tarfile.open(path, "r:*") as tar:
            members = tar.getmembers()
            for member in members:
                reason = _unsafe(member, has_filter)
                if reason:
                    raise ArchiveError(f"{path}: refusing member {member.name!r}: {reason}")
            target.mkdir(parents=True, exist_ok=True)
            if has_filter:
                tar.extractall(target, members=members, filter="data")
            else:
                tar.extractall(target, members=members)
    except (OSError, tarfile.TarError) as exc:
        raise ArchiveError(f"{path}: cannot extract into {target}: {exc}") from None
    return [m.name for m in members]
