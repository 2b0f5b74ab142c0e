"""dre-batch collate on hand-built run directories with real chunk files (FITS and HDF5 written by
the fit job's writers) and done markers carrying the files' real checksums."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

from batch_fixtures import complete_run, done_chunk, done_prep, failed, make_run, write_chunk_outputs
from dre_hpc.batch.collate import CollateError, collate
from dre_hpc.batch.rundir import file_sha256
from dre_hpc.io.columns import COLUMNS

TILES = {"tileA": 7, "tileB": 5, "tileC": 0}


@pytest.fixture
def run(tmp_path):
    return complete_run(tmp_path / "run", TILES, chunks_per_tile=3)


def test_merges_tiles_in_object_order_with_provenance(run):
    report = collate(run)
    assert report.rows == {"tileA": 7, "tileB": 5, "tileC": 0} and report.objects == 12
    tile_a = Table.read(run.collated("tileA_dre.fits"))
    assert list(tile_a["ROW"]) == list(range(7)) and list(tile_a["NUMBER"]) == list(range(1, 8))
    assert tile_a.meta["TILE"] == "tileA" and tile_a.meta["NOBJECTS"] == 7
    flat = Table.read(run.collated("testrun_dre.fits"))
    assert flat.colnames[0] == "TILE" and flat.colnames[1:] == tile_a.colnames
    assert list(flat["TILE"]) == ["tileA"] * 7 + ["tileB"] * 5
    assert list(flat["ROW"]) == list(range(7)) + list(range(5))
    assert list(flat["X_IMAGE"][7:]) == [1000.0 + i for i in range(5)]    # tile B's values
    header = fits.getheader(run.collated("testrun_dre.fits"), 1)
    assert header["RUNNAME"] == "testrun" and header["SEED"] == 7 and header["NTILES"] == 3
    assert header["NOBJECTS"] == 12 and len(header["CFGHASH"]) == 64 and "COLLATED" in header
    assert "NMISSING" not in header


def test_chi_datasets_concatenated_unchanged(run):
    collate(run)
    with h5py.File(run.collated("tileA_chi.h5"), "r") as h5:
        assert len(h5) == 7 and h5.attrs["statistic"] == "wls" and h5.attrs["NLOGH"] == 21
        assert h5["01_0004"].shape == (1, 10, 12, 21) and h5["01_0004"].dtype == np.float32
        assert float(h5["01_0004"][0, 0, 0, 0]) == 3.0
    with h5py.File(run.collated("tileC_chi.h5"), "r") as h5:
        assert len(h5) == 0 and h5.attrs["statistic"] == "wls"


def test_verification_record(run):
    collate(run)
    record = json.loads(run.collated("collate.json").read_text())
    assert record["missing"] == 0 and record["tiles"]["tileB"]["rows"] == 5
    chunk = record["tiles"]["tileA"]["chunks"][1]
    assert (chunk["start"], chunk["stop"]) == (2, 4)
    assert chunk["sha256"]["dre"] == file_sha256(run.chunk_outputs("tileA", 1)["dre"])
    assert record["outputs"]["collated/testrun_dre.fits"]["sha256"] == file_sha256(
        run.collated("testrun_dre.fits"))
    assert not run.collated("missing.json").exists()


def test_corrupt_chunk_refused_and_named(run):
    path = run.chunk_outputs("tileB", 1)["dre"]
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF                                   # same size, one byte changed
    path.write_bytes(bytes(data))
    with pytest.raises(CollateError, match="corrupt or modified") as info:
        collate(run)
    assert str(path) in str(info.value)
    assert not run.collated("testrun_dre.fits").exists() and not run.collated("collate.json").exists()


def test_truncated_chi_refused(run):
    path = run.chunk_outputs("tileA", 0)["chi"]
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CollateError, match="bytes, the done marker records") as info:
        collate(run, allow_missing=True)                 # corrupt is refused even then
    assert str(path) in str(info.value)


def test_rows_differing_from_range_refused(tmp_path):
    rundir = make_run(tmp_path / "run", {"a": 6}, chunks_per_tile=2)
    done_prep(rundir, "a", 6, 2)
    done_chunk(rundir, "a", 0, 6, 0, 2)
    marker = done_chunk(rundir, "a", 0, 6, 1, 2)
    # chunk 1 (objects 3..5) written with only 2 rows; the marker tells the truth about the files
    outputs = write_chunk_outputs(rundir, "a", 0, 3, 5, 1)
    rundir.write_marker("fit", "a", 1, "done", dict(marker, outputs=outputs, rows=2))
    with pytest.raises(CollateError, match=r"tile a chunk 1: 2 rows for objects \[3, 6\)"):
        collate(rundir)
    rundir.write_marker("fit", "a", 1, "done", dict(marker, outputs=outputs))   # rows: 3
    with pytest.raises(CollateError, match="00001_dre.fits: 2 rows, the done marker records 3"):
        collate(rundir)


def test_range_must_match_the_chunking(tmp_path):
    rundir = make_run(tmp_path / "run", {"a": 6}, chunks_per_tile=2)
    done_prep(rundir, "a", 6, 2)
    done_chunk(rundir, "a", 0, 6, 0, 2)
    marker = done_chunk(rundir, "a", 0, 6, 1, 2)
    outputs = write_chunk_outputs(rundir, "a", 0, 2, 6, 1)     # overlaps chunk 0
    rundir.write_marker("fit", "a", 1, "done", dict(marker, outputs=outputs, start=2, rows=4))
    with pytest.raises(CollateError, match=r"range \[2, 6\) is not chunk 1 of 2 of 6 objects"):
        collate(rundir)


def test_chunks_of_another_prep_refused(tmp_path):
    """A chunk fitted on other prep products than the tile's current prep done marker records
    (``prep_digest``), or whose tile has no prep done marker, is refused even with allow_missing."""
    rundir = make_run(tmp_path / "run", {"a": 6}, chunks_per_tile=2)
    done_prep(rundir, "a", 6, 2)
    done_chunk(rundir, "a", 0, 6, 0, 2)
    marker = done_chunk(rundir, "a", 0, 6, 1, 2)
    rundir.write_marker("fit", "a", 1, "done", dict(marker, prep_digest="0" * 64))
    for allow in (False, True):
        with pytest.raises(CollateError, match="tile a chunk 1: fitted on other prep products"):
            collate(rundir, allow_missing=allow)
    rundir.write_marker("fit", "a", 1, "done", {k: v for k, v in marker.items() if k != "prep_digest"})
    with pytest.raises(CollateError, match="00001.done: done marker incomplete .*prep_digest"):
        collate(rundir)
    rundir.write_marker("fit", "a", 1, "done", marker)
    rundir.marker("prep", "a").unlink()
    with pytest.raises(CollateError, match="tile a chunk 0: the tile's prep has no done marker"):
        collate(rundir)
    done_prep(rundir, "a", 6, 2)
    assert collate(rundir).rows == {"a": 6}


def test_missing_chunks_listed_then_allowed(tmp_path):
    rundir = make_run(tmp_path / "run", {"a": 6, "b": 4, "c": 4}, chunks_per_tile=2)
    for index, (tile, n) in enumerate({"a": 6, "b": 4}.items()):
        done_prep(rundir, tile, n, 2)
        done_chunk(rundir, tile, index, n, 0, 2)
    failed(rundir, "fit", "a", 1, "MemoryError")
    done_chunk(rundir, "b", 1, 4, 1, 2)
    failed(rundir, "prep", "c", None, "no stars for PSFEx")
    with pytest.raises(CollateError) as info:
        collate(rundir)
    message = str(info.value)
    assert "3 chunks not done" in message and "tile a chunk 1: failed (MemoryError)" in message
    assert "tile c chunk 0: blocked (prep of tile c failed: no stars for PSFEx)" in message
    assert info.value.exit_code != 0
    assert not rundir.collated("a_dre.fits").exists() and not rundir.collated("collate.json").exists()

    report = collate(rundir, allow_missing=True)
    assert report.rows == {"a": 3, "b": 4} and len(report.missing) == 3
    flat = Table.read(rundir.collated("testrun_dre.fits"))
    assert list(flat["TILE"]) == ["a"] * 3 + ["b"] * 4 and flat.meta["NMISSING"] == 3
    assert fits.getheader(rundir.collated("a_dre.fits"), 1)["NMISSING"] == 1
    assert fits.getheader(rundir.collated("b_dre.fits"), 1)["NMISSING"] == 0
    missing = json.loads(rundir.collated("missing.json").read_text())["missing"]
    assert {(m["tile"], m["chunk"], m["state"]) for m in missing} == {
        ("a", 1, "failed"), ("c", 0, "blocked"), ("c", 1, "blocked")}
    assert json.loads(rundir.collated("collate.json").read_text())["missing"] == 3


def test_collate_again_after_completion_clears_missing(tmp_path):
    rundir = make_run(tmp_path / "run", {"a": 4}, chunks_per_tile=2)
    done_prep(rundir, "a", 4, 2)
    done_chunk(rundir, "a", 0, 4, 0, 2)
    collate(rundir, allow_missing=True)
    assert rundir.collated("missing.json").exists()
    done_chunk(rundir, "a", 0, 4, 1, 2)
    assert collate(rundir).rows == {"a": 4}
    assert not rundir.collated("missing.json").exists()
    assert "NMISSING" not in fits.getheader(rundir.collated("testrun_dre.fits"), 1)


def test_nothing_done_is_an_error(tmp_path):
    rundir = make_run(tmp_path / "run", {"a": 4}, chunks_per_tile=2)
    with pytest.raises(CollateError, match="nothing to collate"):
        collate(rundir, allow_missing=True)


def test_byte_concatenation_equals_astropy_stack(run):
    """The fast path (rows copied as bytes) gives the same table as astropy's vstack."""
    from astropy.table import vstack
    collate(run)
    chunks = [Table.read(run.chunk_outputs("tileA", k)["dre"]) for k in range(3)]
    merged = Table.read(run.collated("tileA_dre.fits"))
    expected = vstack(chunks)
    assert merged.colnames == expected.colnames
    for name in expected.colnames:
        got, want = np.asarray(merged[name]), np.asarray(expected[name])
        assert np.array_equal(got, want, equal_nan=got.dtype.kind == "f"), name
        native = merged[name].dtype.newbyteorder("=")            # FITS data read big-endian
        assert native == expected[name].dtype.newbyteorder("="), name


def test_unlike_chunk_headers_fall_back_to_astropy(tmp_path):
    """A chunk whose column keywords differ (here the unit of FLUX) is merged through astropy: a
    unit that differs between chunks is left out, the others and the descriptions are kept."""
    from batch_fixtures import chunk_table
    from dre_hpc.io.outputs import write_summary
    rundir = make_run(tmp_path / "run", {"a": 6}, chunks_per_tile=2)
    done_prep(rundir, "a", 6, 2)
    done_chunk(rundir, "a", 0, 6, 0, 2)
    marker = done_chunk(rundir, "a", 0, 6, 1, 2)
    table = chunk_table(0, 3, 6)
    table["FLUX"].unit = "ct"
    path = rundir.chunk_outputs("a", 1)["dre"]
    write_summary(path, table)
    marker["outputs"]["dre"].update(sha256=file_sha256(path), bytes=path.stat().st_size)
    rundir.write_marker("fit", "a", 1, "done", marker)
    collate(rundir)
    merged = Table.read(rundir.collated("a_dre.fits"))
    assert list(merged["ROW"]) == list(range(6)) and list(merged["X_IMAGE"]) == list(map(float, range(6)))
    flat = Table.read(rundir.collated("testrun_dre.fits"), hdu=1)
    assert list(flat["TILE"]) == ["a"] * 6 and flat.colnames[0] == "TILE"
    for table, path in ((merged, rundir.collated("a_dre.fits")), (flat, rundir.collated("testrun_dre.fits"))):
        assert table["FLUX"].unit is None and table["ANGLE"].unit == "deg"
        header = fits.getheader(path, 1)
        comments = {header[f"TTYPE{i}"]: header.get(f"TCOMM{i}") for i in range(1, header["TFIELDS"] + 1)}
        assert comments["ANGLE"] == COLUMNS["ANGLE"].description and comments["TILE" if table is flat else "ROW"]
        assert "OBJSTART" not in header and header["NMERGED"] == 2


def test_read_part_refuses_what_cannot_be_concatenated(tmp_path, run):
    from dre_hpc.batch.merge import read_part
    source = run.chunk_outputs("tileA", 0)["dre"]
    part = read_part(source)
    assert (part.rows, part.offset % 2880, part.width) == (2, 0, Table.read(source).as_array().itemsize)
    truncated = tmp_path / "truncated.fits"
    truncated.write_bytes(source.read_bytes()[:4000])
    with pytest.raises(ValueError, match="truncated FITS header"):
        read_part(truncated)
    image = tmp_path / "image.fits"
    fits.HDUList([fits.PrimaryHDU(np.zeros((3, 4), np.float32)), fits.ImageHDU(np.zeros(2))]).writeto(image)
    with pytest.raises(ValueError, match="not a binary table"):
        read_part(image)
    with pytest.raises(ValueError, match="not a FITS file"):
        read_part(run.chunk_outputs("tileA", 0)["chi"])
