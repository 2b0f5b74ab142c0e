"""dre-batch link, archive, clean and safe extraction on hand-built, collated run directories."""

from __future__ import annotations

import io
import os
import tarfile

import pytest

from batch_fixtures import complete_run, done_chunk, read_json
from dre_hpc.batch import status
from dre_hpc.batch.archive import ArchiveError, archive, clean, extract_archive, link
from dre_hpc.batch.collate import collate
from dre_hpc.batch.rundir import RunDirError

TILES = {"tileA": 5, "tileB": 3}


@pytest.fixture
def run(tmp_path):
    return complete_run(tmp_path / "run", TILES, chunks_per_tile=2)


def snapshot(root):
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))


def test_archive_refused_before_collate_removes_nothing(run):
    before = snapshot(run.root)
    with pytest.raises(ArchiveError, match="has not been collated"):
        archive(run)
    with pytest.raises(ArchiveError, match="has not been collated"):
        clean(run, ("tiles", "chunks"))
    with pytest.raises(ArchiveError, match="has not been collated"):
        link(run)
    assert snapshot(run.root) == before


def test_archive_refused_when_collated_file_changed(run):
    collate(run)
    path = run.collated("tileA_dre.fits")
    path.write_bytes(path.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(ArchiveError, match="changed since collate"):
        archive(run)
    assert (run.root / "chunks").is_dir() and (run.root / "markers").is_dir()


def test_archive_refused_when_chunk_redone_after_collate(run):
    collate(run)
    done_chunk(run, "tileB", 1, 3, 0, 2)              # a rerun: same files, new marker
    marker = read_json(run.marker("fit", "tileB", 0))
    marker["outputs"]["dre"]["sha256"] = "0" * 64
    run.write_marker("fit", "tileB", 0, "done", marker)
    with pytest.raises(ArchiveError, match="tile tileB chunk 0 changed since collate"):
        archive(run)


def test_link_makes_relative_symlinks(run):
    collate(run)
    made = link(run)
    names = sorted(p.name for p in made)
    assert names == sorted(["tileA_dre.fits", "tileA_chi.h5", "tileB_dre.fits", "tileB_chi.h5",
                            "testrun_dre.fits", "provenance.json", "config.yaml"])
    flat = run.output_dir / "testrun_dre.fits"
    assert flat.is_symlink() and os.readlink(flat) == "../collated/testrun_dre.fits"
    assert flat.read_bytes() == run.collated("testrun_dre.fits").read_bytes()
    assert len(link(run)) == 7                               # again: replaced, not an error


def test_archive_extract_round_trip(run, tmp_path):
    collate(run)
    logs = {p.relative_to(run.root).as_posix(): p.read_bytes() for p in (run.root / "logs").rglob("*.log")}
    report = archive(run)
    assert report.path == run.root / "testrun_archive.tar.gz" and report.path.is_file()
    assert sorted(report.removed) == ["chunks", "logs", "markers"]
    for gone in ("chunks", "logs", "markers"):
        assert not (run.root / gone).exists()
    assert (run.root / "scripts" / "fit.sh").is_file() and run.manifest.is_file()
    assert run.collated("testrun_dre.fits").is_file()         # the final files stay
    with pytest.raises(RunDirError, match="archived into testrun_archive.tar.gz"):
        status.collect(run)
    with pytest.raises(ArchiveError, match="already archived"):
        archive(run)

    names = extract_archive(report.path, tmp_path / "restored")
    restored = tmp_path / "restored"
    assert "markers/fit/tileA/00001.done" in names and "collated/collate.json" in names
    assert {rel: (restored / rel).read_bytes() for rel in logs} == logs
    assert (restored / "config.yaml").read_text() == run.config.read_text()


def test_archive_does_not_follow_symlinks_outside(run, tmp_path):
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "token.txt").write_text("do not pack me")
    os.symlink(secret, run.root / "logs" / "outside_dir")
    os.symlink(secret / "token.txt", run.root / "logs" / "outside_file")
    os.symlink("../scripts/fit.sh", run.root / "logs" / "inside_link")
    collate(run)
    report = archive(run)
    with tarfile.open(report.path) as tar:
        members = {m.name: m for m in tar.getmembers()}
        contents = b"".join(tar.extractfile(m).read() for m in members.values() if m.isreg())
    assert b"do not pack me" not in contents
    assert "logs/outside_dir" not in members and "logs/outside_file" not in members
    assert members["logs/inside_link"].issym() and members["logs/inside_link"].linkname == "../scripts/fit.sh"
    assert len(report.skipped) == 2 and all("outside the run directory" in s for s in report.skipped)
    assert (secret / "token.txt").read_text() == "do not pack me"    # removal did not follow it


def test_clean(run):
    (run.tile_dir("tileA") / "Cuts").mkdir(parents=True)
    (run.tile_dir("tileA") / "Cuts" / "tileA_cuts.h5").write_bytes(b"x")
    collate(run)
    assert clean(run, ("tiles",)) == ["tiles"]
    assert not (run.root / "tiles").exists() and (run.root / "chunks").is_dir()
    assert clean(run, ("chunks",)) == ["chunks"] and not (run.root / "chunks").exists()
    (run.root / ".cache" / "numba").mkdir(parents=True)
    assert clean(run, (".cache",)) == [".cache"] and not (run.root / ".cache").exists()
    assert clean(run, ("tiles", "chunks", ".cache")) == []
    with pytest.raises(ArchiveError, match="unknown part 'logs'"):
        clean(run, ("logs",))


def test_collate_with_missing_chunks_is_not_archived(tmp_path):
    run = complete_run(tmp_path / "run", TILES, chunks_per_tile=2)
    run.marker("fit", "tileB", 1, "done").unlink()
    collate(run, allow_missing=True)
    with pytest.raises(ArchiveError, match="allow-missing"):
        archive(run)
    assert (run.root / "chunks").is_dir()


def make_tar(path, members):
    """A tar.gz with hand-made members: (name, type, linkname)."""
    with tarfile.open(path, "w:gz") as tar:
        for name, kind, linkname in members:
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, linkname
            data = b"payload" if kind == tarfile.REGTYPE else b""
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.parametrize("members, reason", [
    ([("../evil.txt", tarfile.REGTYPE, "")], "'..' in the path"),
    ([("ok/../../evil.txt", tarfile.REGTYPE, "")], "'..' in the path"),
    ([("/tmp/evil.txt", tarfile.REGTYPE, "")], "absolute path"),
    ([("link", tarfile.SYMTYPE, "/etc")], "outside the target"),
    ([("a/link", tarfile.SYMTYPE, "../../x")], "outside the target"),
    ([("hard", tarfile.LNKTYPE, "../outside")], "outside the target"),
    ([("dev", tarfile.CHRTYPE, "")], "special file"),
])
def test_extract_refuses_escaping_members(tmp_path, members, reason):
    path = make_tar(tmp_path / "bad.tar.gz", [("fine.txt", tarfile.REGTYPE, "")] + members)
    target = tmp_path / "target"
    with pytest.raises(ArchiveError, match=reason):
        extract_archive(path, target)
    assert not (tmp_path / "evil.txt").exists() and not target.exists()   # nothing extracted


def test_extract_refuses_link_chain_escape(tmp_path):
    """Each link alone stays inside, together they lead out: caught by the data filter."""
    path = make_tar(tmp_path / "chain.tar.gz", [("s", tarfile.SYMTYPE, "."),
                                                  ("t", tarfile.SYMTYPE, "s/.."),
                                                  ("t/evil.txt", tarfile.REGTYPE, "")])
    with pytest.raises(ArchiveError):
        extract_archive(path, tmp_path / "target")
    assert not (tmp_path / "evil.txt").exists()
