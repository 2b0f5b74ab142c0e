"""Permissions of what a run creates, and archives that cannot reach outside (issue 7).

- umask 077: every file and folder that setup, run, collate, link, report (``--gallery 0``) and
  archive create has no group or other bits (the user's umask is obeyed, mkstemp's 0600 is not
  left behind, scripts stay executable for the owner).
- umask 000: nothing is world-writable (dre-batch and its jobs always add ``o+w`` to the umask).
- archive: a run whose ``logs`` and ``chunks`` are symbolic links to folders outside packs none of
  the outside content, and removing ``chunks`` afterwards removes the link, never the folder.
- extract: a tar with a symlink and then a file through it, a hard link to an absolute outside
  file, or a target that already holds a link out writes nothing outside the target.
  (`tests/test_archive.py` covers ``../``, absolute names, links out, link chains, devices.)
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from batch_fixtures import complete_run
from batch_helpers import sim_tiles, write_config  # noqa: F401  (sim_tiles: a fixture)
from dre_hpc.batch.archive import ArchiveError, archive, extract_archive
from dre_hpc.batch.collate import collate
from dre_hpc.batch.rundir import RunDir, current_umask, mask_world_writable, write_atomic
from test_archive import make_tar

HAVE_TOOLS = shutil.which("psfex") is not None and (shutil.which("source-extractor") or shutil.which("sex"))
STEPS = (("setup",), ("run",), ("collate",), ("link",), ("report", "--gallery", "0"), ("archive",))


def batch(*args, umask: int, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dre_hpc.cli.dre_batch", *map(str, args)], text=True,
                          capture_output=True, timeout=timeout, umask=umask)


def modes(root: Path) -> dict:
    """``{path: mode bits}`` of every file and folder below `root` (root included; links skipped:
    their own mode means nothing)."""
    found = {root: stat.S_IMODE(root.lstat().st_mode)}
    for path in root.rglob("*"):
        if not path.is_symlink():
            found[path] = stat.S_IMODE(path.lstat().st_mode)
    return found


def run_all_steps(tmp_path, tiles_file, umask) -> Path:
    """One tile, one chunk, every step under `umask`; the run directory."""
    one = tmp_path / "one_tile.txt"
    one.write_text(Path(tiles_file).read_text().splitlines()[0] + "\n")
    config = write_config(tmp_path / "run.yaml", chunks_per_tile=1)
    run_dir = tmp_path / "run"
    truth = Path(tiles_file).parent / "Truth"
    for step in STEPS:
        args = (step[0], config, one, "--run-dir", run_dir) if step[0] == "setup" else (step[0], run_dir, *step[1:])
        if step[0] == "report":
            args += ("--truth-dir", truth)
        proc = batch(*args, umask=umask)
        assert proc.returncode == 0, f"{step} exited {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    assert (run_dir / "output" / "report").is_dir() and list(run_dir.glob("*_archive.tar.gz"))
    return run_dir


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_TOOLS, reason="SExtractor/PSFEx not installed")
def test_umask_077_gives_private_files(tmp_path, sim_tiles, default_cube_file):   # noqa: F811
    run_dir = run_all_steps(tmp_path, sim_tiles, 0o077)
    found = modes(run_dir)
    assert len(found) > 20
    loose = {str(p.relative_to(run_dir)): oct(m) for p, m in found.items() if m & 0o077}
    assert not loose, f"group/other bits with umask 077: {loose}"
    assert found[run_dir / "scripts" / "prep.sh"] & 0o100 and found[run_dir / "config.yaml"] & 0o600 == 0o600


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_TOOLS, reason="SExtractor/PSFEx not installed")
def test_umask_000_nothing_world_writable(tmp_path, sim_tiles, default_cube_file):   # noqa: F811
    run_dir = run_all_steps(tmp_path, sim_tiles, 0o000)
    found = modes(run_dir)
    writable = {str(p.relative_to(run_dir)): oct(m) for p, m in found.items() if m & 0o002}
    assert not writable, f"world-writable with umask 000: {writable}"
    assert found[run_dir / "config.yaml"] & 0o060 == 0o060          # the rest of the umask is obeyed


def test_mask_world_writable_and_write_atomic(tmp_path):
    old = os.umask(0o000)
    try:
        write_atomic(tmp_path / "a.txt", "x")
        assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o664     # o+w masked by the writer
        assert mask_world_writable() == 0o002 and current_umask() == 0o002
        os.umask(0o027)
        assert mask_world_writable() == 0o027
    finally:
        os.umask(old)


# -- archive and extraction -------------------------------------------------------------------------
def test_archive_never_follows_linked_folders_out(tmp_path):
    """``logs`` is a link to a folder outside: nothing of it is packed, and the removal after
    packing removes the link, never the folder."""
    run = complete_run(tmp_path / "run", {"tileA": 4}, chunks_per_tile=2)
    collate(run)
    outside = tmp_path / "outside_logs"
    outside.mkdir()
    (outside / "secret.txt").write_text("outside secret")
    shutil.rmtree(run.root / "logs", ignore_errors=True)
    os.symlink(outside, run.root / "logs")
    report = archive(run)
    with tarfile.open(report.path) as tar:
        names = tar.getnames()
        data = b"".join(tar.extractfile(m).read() for m in tar.getmembers() if m.isreg())
    assert b"outside secret" not in data and not any(n == "logs" or n.startswith("logs/") for n in names)
    assert any("logs" in s and "outside the run directory" in s for s in report.skipped)
    assert not os.path.lexists(run.root / "logs")
    assert (outside / "secret.txt").read_text() == "outside secret"


def test_archive_refuses_a_link_as_archive_path(tmp_path):
    run = complete_run(tmp_path / "run", {"tileA": 4}, chunks_per_tile=1)
    collate(run)
    outside = tmp_path / "outside.tar.gz"
    outside.write_text("sentinel")
    os.symlink(outside, run.root / "testrun_archive.tar.gz")
    with pytest.raises(Exception, match="symbolic link"):
        archive(run)
    assert outside.read_text() == "sentinel" and (run.root / "chunks").is_dir()


@pytest.mark.parametrize("members", [
    [("d", tarfile.SYMTYPE, "{outside}"), ("d/evil.txt", tarfile.REGTYPE, "")],        # link, then a file through it
    [("d", tarfile.SYMTYPE, "../outside"), ("d/evil.txt", tarfile.REGTYPE, "")],
    [("h", tarfile.LNKTYPE, "{outside}/victim.txt")],                                   # hard link to an outside file
    [("h", tarfile.LNKTYPE, "../outside/victim.txt")],
], ids=["symlink-abs-then-file", "symlink-rel-then-file", "hardlink-abs", "hardlink-rel"])
def test_extract_writes_nothing_outside(tmp_path, members):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim.txt").write_text("sentinel")
    members = [(n, k, link.replace("{outside}", str(outside))) for n, k, link in members]
    path = make_tar(tmp_path / "bad.tar.gz", [("fine.txt", tarfile.REGTYPE, "")] + members)
    with pytest.raises(ArchiveError):
        extract_archive(path, tmp_path / "target")
    assert sorted(p.name for p in outside.iterdir()) == ["victim.txt"]
    assert (outside / "victim.txt").read_text() == "sentinel"


def test_extract_into_target_holding_a_link_out(tmp_path):
    """The target already has ``d -> outside``; a member ``d/evil.txt`` must not land there."""
    outside = tmp_path / "outside"
    outside.mkdir()
    target = tmp_path / "target"
    target.mkdir()
    os.symlink(outside, target / "d")
    path = make_tar(tmp_path / "t.tar.gz", [("d/evil.txt", tarfile.REGTYPE, "")])
    if not hasattr(tarfile, "data_filter"):
        pytest.skip("this Python's tarfile has no data filter")
    with pytest.raises(ArchiveError):
        extract_archive(path, target)
    assert not list(outside.iterdir())


def test_rundir_writers_refuse_links(tmp_path):
    rundir = RunDir(tmp_path / "run")
    (rundir.root / "markers").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, rundir.root / "markers" / "prep")
    with pytest.raises(Exception, match="symbolic link"):
        rundir.write_marker("prep", "tile", None, "done", {})
    assert not list(outside.iterdir())
