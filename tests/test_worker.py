"""The dre-batch worker (python -m dre_hpc.batch.worker) with the real SExtractor and PSFEx.

A run directory is written by hand (`batch_helpers.make_run`: config.yaml and manifest.json only)
over one tiny simulated tile (512x512, 15 galaxies, 30 stars: 14 objects cut with a 40-pixel
margin), made once per session. The worker runs as a subprocess where the job scripts' view
matters (cwd = run directory, indices from the environment) and as function calls elsewhere.
``fit.batch_size=4`` makes the tile's 14 objects span four fitting units, so that chunkings group
them differently (and, for a prep marker of before chunks held whole units, cut through them)
and the chunking-independence test has something to prove.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table, vstack
from batch_helpers import make_run

from dre_hpc.batch import fit_job
from dre_hpc.batch.chunking import chunk_range, n_chunks_for
from dre_hpc.batch.prep_job import prep_digest, tile_products
from dre_hpc.batch.rundir import file_sha256
from dre_hpc.batch.worker import finish, main, run_stage
from dre_hpc.fit import compiled
from dre_hpc.io.cuts import count_cuts

pytestmark = pytest.mark.skipif(shutil.which("psfex") is None or (shutil.which("source-extractor") or
                                                                  shutil.which("sex")) is None,
                                reason="SExtractor/PSFEx not installed (bin/install-system-packages)")

BASE = ["prep.margin=40", "fit.batch_size=4"]
PREP_DONE_KEYS = {"tile", "n_objects", "unit_size", "n_chunks", "seconds", "job_id", "host", "time", "outputs", "models",
                  "bytes", "attempt", "psf", "seeing", "photometry", "maps", "image", "warnings"}
FIT_DONE_KEYS = {"tile", "chunk", "n_chunks", "start", "stop", "rows", "outputs", "seconds", "job_id",
                 "host", "time", "config_hash", "prep_digest", "attempt", "ranks", "schedule", "resumed_objects",
                 "fitted_objects", "checkpoints", "per_rank"}
FAILED_KEYS = {"reason", "traceback", "exit_code", "retryable", "job_id", "host", "time", "attempt"}


@pytest.fixture(scope="session")
def tiny_tile(tmp_path_factory):
    """One tiny simulated tile per session: ``Tiles/tiny.fits``."""
    from dre_hpc.sim.tile import TileSpec, simulate_tile
    root = tmp_path_factory.mktemp("worker_tile")
    spec = TileSpec(size=512, n_galaxies=15, n_stars=30, seed=3)
    return simulate_tile(spec, root / "Tiles" / "tiny.fits", root / "truth.fits")[0]


@pytest.fixture
def run(tmp_path, tiny_tile, default_cube_file):
    """A run over the tiny tile (default cube, 5 objects per chunk), not yet prepared."""
    return make_run(tmp_path, [tiny_tile], BASE + ["chunking.objects_per_chunk=5"])


def _worker(args, cwd, **env):
    """``python -m dre_hpc.batch.worker ARGS`` as a job script runs it."""
    return subprocess.run([sys.executable, "-m", "dre_hpc.batch.worker", *args], cwd=cwd, text=True,
                          capture_output=True, env={**os.environ, **env}, timeout=120)


def _chunk_files(run):
    folder = run.chunk_dir("tiny")
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def test_prep_writes_products_and_a_done_marker_with_checksums(run):
    assert run_stage("prep", run.root, tile=0) == 0
    kind, done = run.read_marker("prep", "tiny")
    assert kind == "done" and set(done) == PREP_DONE_KEYS
    assert done["psf"]["source"] == "psfex" and done["seeing"]["fwhm_pixels"] > 0
    # the prep convolved the fits' models (one PSF extension) into the tile's model cache
    assert done["models"]["convolved"] == 1 and len(list(run.model_cache("tiny").glob("models-*"))) == 1
    cuts = run.tile_dir("tiny") / "Cuts" / "tiny_cuts.h5"
    assert done["tile"] == "tiny" and done["n_objects"] == count_cuts(cuts) == 14
    assert done["n_chunks"] == n_chunks_for(14, objects_per_chunk=5) == 3
    assert {"tiles/tiny/Cuts/tiny_cuts.h5", "tiles/tiny/PSF/tiny.psf",
            "tiles/tiny/Sextracted/tiny_cat.fits"} <= set(done["outputs"])
    assert set(done["bytes"]) == set(done["outputs"])
    for rel, digest in done["outputs"].items():
        assert file_sha256(run.root / rel) == digest, rel
        assert (run.root / rel).stat().st_size == done["bytes"][rel], rel
    assert not run.marker("prep", "tiny", outcome="started").exists()
    assert run.tiles()[0].n_chunks == 3                     # RunDir fills it in from the marker


def test_fit_subprocess_from_the_job_environment(run):
    assert _worker(["prep", ".", "--tile", "0"], cwd=run.root).returncode == 0
    proc = _worker(["fit", "."], cwd=run.root, DRE_TILE="0", DRE_ARRAY_INDEX="1", DRE_JOB_ID="77_1")
    assert proc.returncode == 0, proc.stderr
    kind, done = run.read_marker("fit", "tiny", 1)
    assert kind == "done" and set(done) == FIT_DONE_KEYS
    start, stop = chunk_range(14, 1, 3, unit=4)
    assert (start, stop) == (4, 8)                  # whole fitting units of fit.batch_size objects
    assert [done[k] for k in ("chunk", "n_chunks", "start", "stop", "rows")] == [1, 3, start, stop, 4]
    assert done["job_id"] == "77_1" and done["config_hash"] == run.read_manifest()["config_hash"]
    paths = run.chunk_outputs("tiny", 1)
    for kind_, path in paths.items():
        entry = done["outputs"][kind_]
        assert entry["path"] == path.relative_to(run.root).as_posix()
        assert entry["sha256"] == file_sha256(path) and entry["bytes"] == path.stat().st_size
    table = Table.read(paths["dre"])
    assert list(table["ROW"]) == list(range(start, stop))    # tile object indices, in order
    header = fits.getheader(paths["dre"], 1)
    assert [header[k] for k in ("TILE", "CHUNK", "OBJSTART", "OBJSTOP")] == ["tiny", 1, start, stop]
    assert header["CFGHASH"] == done["config_hash"] and header["RUN"] == "dre_run" and "DRE_VER" in header
    with h5py.File(paths["chi"]) as h5:
        assert len(h5) == stop - start
    assert _chunk_files(run) == ["00001_chi.h5", "00001_dre.fits"]


def _fit_all(tmp_path, image, overrides, name, legacy=False):
    """Prep and every fit chunk of a run; the concatenated tables and chi surfaces. `legacy`: the
    prep marker loses its ``unit_size`` (as written before chunks held whole units), so that the
    chunks cut through fitting units and fit them whole."""
    run = make_run(tmp_path, [image], BASE + overrides, name=name)
    assert run_stage("prep", run.root, tile=0) == 0
    prep = run.read_marker("prep", "tiny")[1]
    assert prep["unit_size"] == 4
    if legacy:
        del prep["unit_size"]
        run.write_marker("prep", "tiny", None, "done", prep)
    n = prep["n_chunks"]
    tables, surfaces = [], []
    for k in range(n):
        assert run_stage("fit", run.root, tile=0, chunk=k) == 0
        assert compiled._worth_loading is False      # a few objects: the array code, no Numba load
        paths = run.chunk_outputs("tiny", k)
        tables.append(Table.read(paths["dre"]))
        with h5py.File(paths["chi"]) as h5:
            surfaces += [(key, h5[key][()]) for key in h5]
    return run, n, vstack(tables, metadata_conflicts="silent"), surfaces


def test_results_do_not_depend_on_chunking(tmp_path, tiny_tile, default_cube_file):
    runs = {label: _fit_all(tmp_path, tiny_tile, [override], label, legacy=label == "cut") for label, override in
            (("one", "chunking.chunks_per_tile=1"), ("three", "chunking.chunks_per_tile=3"),
             ("single", "chunking.objects_per_chunk=1"), ("twenty", "chunking.chunks_per_tile=20"),
             ("cut", "chunking.chunks_per_tile=3"))}
    # objects_per_chunk=1: one chunk per unit of 4 (14 objects: 4 units), not 14
    assert [runs[k][1] for k in runs] == [1, 3, 4, 20, 3]
    assert [runs["cut"][0].read_marker("fit", "tiny", k)[1]["start"] for k in range(3)] == [0, 4, 9]
    _, _, reference, ref_surfaces = runs["one"]
    assert len(reference) == 14 and list(reference["ROW"]) == list(range(14))
    for label in ("three", "single", "twenty", "cut"):
        _, _, table, surfaces = runs[label]
        assert table.colnames == reference.colnames
        for name in reference.colnames:
            a, b = (np.asarray(t[name]).astype(t[name].dtype.newbyteorder("=")) for t in (reference, table))
            assert a.dtype == b.dtype and np.array_equal(a, b, equal_nan=a.dtype.kind == "f"), (label, name)
        assert [k for k, _ in surfaces] == [k for k, _ in ref_surfaces]
        assert all(np.array_equal(s, r, equal_nan=True) for (_, s), (_, r) in zip(surfaces, ref_surfaces))
    # 20 chunks of 14 objects: empty chunks are done with a 0-row table and a 0-object chi file
    twenty = runs["twenty"][0]
    empty = [k for k in range(20) if chunk_range(14, k, 20, 4)[0] == chunk_range(14, k, 20, 4)[1]]
    assert empty and all(twenty.read_marker("fit", "tiny", k)[1]["rows"] == 0 for k in empty)
    paths = twenty.chunk_outputs("tiny", empty[0])
    assert len(Table.read(paths["dre"])) == 0 and Table.read(paths["dre"]).colnames == reference.colnames
    with h5py.File(paths["chi"]) as h5:
        assert len(h5) == 0


def _write_corrupt(tmp_path):
    bad = tmp_path / "Tiles" / "bad.fits"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"SIMPLE  =  this is not a FITS file" * 10)
    return bad


def test_prep_of_a_corrupt_image_fails_and_blocks_its_fits(tmp_path, default_cube_file):
    run = make_run(tmp_path, [_write_corrupt(tmp_path)], BASE)
    assert main(["prep", str(run.root), "--tile", "0"]) == 1
    kind, failed = run.read_marker("prep", "bad")
    assert kind == "failed" and set(failed) == FAILED_KEYS
    assert "bad.fits" in failed["reason"] and "\n" not in failed["reason"]
    assert "Traceback" in failed["traceback"] and failed["exit_code"] == 1 and failed["retryable"] is False
    assert not run.tile_dir("bad").exists()                  # no half products
    assert main(["fit", str(run.root), "--tile", "0", "--chunk", "0"]) == 1
    kind, fit_failed = run.read_marker("fit", "bad", 0)
    assert kind == "failed" and fit_failed["reason"] == f"prep of tile bad is not done: {failed['reason']}"
    assert not run.chunk_dir("bad").exists()


def test_fit_without_prep_says_so(run):
    assert run_stage("fit", run.root, tile=0, chunk=0) == 1
    assert run.read_marker("fit", "tiny", 0)[1]["reason"] == "prep of tile tiny is not done: no marker"


def test_prep_leaves_the_convolution_to_the_fits_without_the_memory(tmp_path, tiny_tile, default_cube_file,
                                                                    monkeypatch):
    """With 0.8 GB of prep memory the models (about 0.45 GB x 2) are not convolved in the prep: the
    marker says why, and the first fit job convolves them (and caches them for the others)."""
    monkeypatch.setattr(fit_job, "_MODELS", {})      # a fresh process: no models in memory
    run = make_run(tmp_path, [tiny_tile], BASE + ["chunking.objects_per_chunk=5", "resources.prep.mem_gb=0.8"])
    assert run_stage("prep", run.root, tile=0) == 0
    skipped = run.read_marker("prep", "tiny")[1]["models"]["skipped"]
    assert "the models need about 0.5 GB, more than half of resources.prep.mem_gb (0.8)" in skipped
    assert not run.model_cache("tiny").exists()
    assert run_stage("fit", run.root, tile=0, chunk=0) == 0
    assert sum(r["convolutions"] for r in run.read_marker("fit", "tiny", 0)[1]["per_rank"]) == 1
    assert len(list(run.model_cache("tiny").glob("models-*"))) == 1


def test_a_fit_that_raises_midway_leaves_no_chunk_files(run, monkeypatch):
    assert run_stage("prep", run.root, tile=0) == 0
    def broken(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(fit_job, "write_chi", broken)        # after the _dre.fits was written
    assert run_stage("fit", run.root, tile=0, chunk=2) == 1
    kind, failed = run.read_marker("fit", "tiny", 2)
    assert kind == "failed" and failed["reason"] == "OSError: disk full" and "broken" in failed["traceback"]
    assert _chunk_files(run) == []


def _fit_fails(run, k, *fragments):
    """Fit chunk `k`: it fails (not retryable) with a reason holding `fragments`, and no outputs."""
    assert run_stage("fit", run.root, tile=0, chunk=k) == 1
    kind, failed = run.read_marker("fit", "tiny", k)
    assert kind == "failed" and failed["retryable"] is False and failed["redo_prep"] is True, failed
    assert all(f in failed["reason"] for f in fragments), failed["reason"]
    assert not any(p.exists() for p in run.chunk_outputs("tiny", k).values())


def test_fit_refuses_prep_products_changed_since_the_prep(run):
    """Each fit checks the products its tile's prep done marker records before it reads any:
    a small file (catalogue, PSF) by SHA-256, the cuts by size; missing ones too."""
    assert run_stage("prep", run.root, tile=0) == 0
    redo = "`dre-batch run --failed-only` redoes the tile's prep and its fits"
    products = tile_products(run, run.tiles()[0])
    catalog, cuts, psf = products["catalog"], products["cuts"], products["psf"]
    original = catalog.read_bytes()
    damaged = bytearray(original)
    damaged[-10] ^= 0xFF                              # same size, one byte of the table data
    catalog.write_bytes(bytes(damaged))
    _fit_fails(run, 0, str(catalog), "SHA-256 differs", redo)
    catalog.write_bytes(original)
    with open(cuts, "ab") as handle:
        handle.write(b"\0" * 8)
    size = cuts.stat().st_size
    _fit_fails(run, 1, str(cuts), f"({size} bytes, its done marker records {size - 8})", redo)
    with open(cuts, "r+b") as handle:
        handle.truncate(size - 8)
    psf.unlink()
    _fit_fails(run, 2, str(psf), "is missing", redo)
    assert run_stage("prep", run.root, tile=0) == 0
    assert run_stage("fit", run.root, tile=0, chunk=2) == 0
    prep = run.read_marker("prep", "tiny")[1]
    assert run.read_marker("fit", "tiny", 2)[1]["prep_digest"] == prep_digest(prep)


def test_a_new_prep_removes_the_tiles_earlier_fits(run):
    """Chunks fitted on the products a prep replaces go with them: outputs, checkpoints, markers."""
    assert run_stage("prep", run.root, tile=0) == 0
    assert run_stage("fit", run.root, tile=0, chunk=0) == 0
    run.checkpoint_dir("tiny", 1).mkdir()
    assert run.read_marker("fit", "tiny", 0)[0] == "done" and _chunk_files(run)
    assert run_stage("prep", run.root, tile=0) == 0
    assert run.read_marker("fit", "tiny", 0) == (None, None)
    assert not run.chunk_dir("tiny").exists() and not run.marker_dir("fit", "tiny").exists()


def test_finish_records_a_killed_job(run):
    run.write_marker("fit", "tiny", 0, "started", {"job_id": "9_0", "host": "h", "time": "t"})
    stray = run.chunk_outputs("tiny", 0)["dre"]
    stray.parent.mkdir(parents=True)
    stray.write_bytes(b"half")
    assert main(["finish", "fit", str(run.root), "--exit-code", "137", "--tile", "0", "--chunk", "0"]) == 0
    kind, failed = run.read_marker("fit", "tiny", 0)
    assert kind == "failed" and set(failed) == FAILED_KEYS
    assert failed["reason"] == "killed by signal 9 (SIGKILL; exit code 137)"
    assert (failed["exit_code"], failed["retryable"], failed["traceback"]) == (137, True, None)
    assert not stray.exists()
    run.write_marker("prep", "tiny", None, "started", {})
    assert finish("prep", run.root, 1, tile=0) == 0
    assert run.read_marker("prep", "tiny")[1]["reason"] == "exited with code 1 without writing an outcome"
    assert run.read_marker("prep", "tiny")[1]["retryable"] is False


def test_finish_leaves_an_outcome_alone(run):
    assert run_stage("prep", run.root, tile=0) == 0
    before = run.marker("prep", "tiny").read_text()
    assert finish("prep", run.root, 137, tile=0) == 0
    assert run.read_marker("prep", "tiny")[0] == "done" and run.marker("prep", "tiny").read_text() == before


def test_no_index_outside_a_job_is_a_one_line_error(run, monkeypatch, capsys):
    for name in ("DRE_TILE", "DRE_ARRAY_INDEX", "SLURM_ARRAY_TASK_ID", "PBS_ARRAY_INDEX", "PBS_ARRAYID"):
        monkeypatch.delenv(name, raising=False)
    assert main(["fit", str(run.root), "--chunk", "0"]) == 2
    assert "DRE_TILE" in capsys.readouterr().err
    assert main(["prep", str(run.root), "--tile", "5"]) == 2      # outside the manifest: no marker to write
    assert "no tile with index 5" in capsys.readouterr().err
    assert json.loads(run.manifest.read_text())["tiles"][0]["name"] == "tiny"
