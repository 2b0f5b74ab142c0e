"""Hostile input files: every reader of a user file fails with its DreError naming the file.

Each reader (cuts files in both layouts, model cubes, PSFs, SExtractor catalogues, chunk tables
read by collate, chi files merged by collate) gets damaged copies of a valid file: truncated at
several offsets, headers claiming absurd sizes (NAXIS1 = 3,000,000,000, negative, not a number),
odd BITPIX, missing keys, wrong dtypes, HDF5 datasets with shapes in the billions that hold
nothing, empty files, random bytes and a directory. The answer is always the reader's `DreError`
subclass with the file name in the message: never another exception, a hang or a huge allocation.

Memory: the absurd cases are refused by size checks made before reading (data size against the
file size for FITS, allocated chunks against the shape for HDF5). `test_absurd_sizes_under_a_memory_limit`
proves it by running them in a subprocess under ``RLIMIT_AS`` of 3 GiB, where an attempt to
allocate the claimed terabytes would end in MemoryError.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from dre_hpc.batch.merge import PartError, read_part, write_chi
from dre_hpc.errors import CutsFormatError, DreError, InputError, PSFError
from dre_hpc.io.catalog import read_catalog
from dre_hpc.io.cuts import CutoutSet, count_cuts, empty_objects, read_cut_objects, read_cuts, write_cuts
from dre_hpc.io.fits_check import check_fits
from dre_hpc.models.cube_io import read_cube, write_cube
from dre_hpc.models.grid import Axis, ModelGrid
from dre_hpc.models.psf import read_psf

from helpers import psfex_hdu, write_psfex
from scratch import scratch_dir

BOX = 16
REPO = Path(__file__).resolve().parents[1]
LAYOUT = "dre_hpc-stacked"


# -- valid files -----------------------------------------------------------------------------

def small_grid():
    return ModelGrid(Axis("INDEX", 1.0, 3.0, 2), Axis("AX_RATIO", 0.5, 0.5, 2), Axis("ANGLE", 0.0, 45.0, 3),
                     Axis("LOGR", -0.5, 0.5, 2), boxsize=BOX, has_index_axis=True)


def build_valid(root: Path) -> dict:
    """One valid file per reader, small."""
    rng = np.random.default_rng(0)
    n = 3
    objects = empty_objects(n)
    objects["NUMBER"], objects["EXT_NUMBER"] = np.arange(1, n + 1), 1
    cuts = CutoutSet(rng.random((n, 128, 128)).astype("f4"), np.ones((n, 128, 128), bool),
                     np.ones((n, 128, 128), "f4"), objects)
    write_cuts(root / "stacked_cuts.h5", cuts)
    write_cuts(root / "dre_cuts.h5", cuts, layout="dre")
    grid = small_grid()
    write_cube(root / "cube.fits", rng.random(grid.shape + (BOX, BOX)).astype("f4"), grid)
    comp = np.zeros((1, 25, 25))
    comp[0, 11:14, 11:14] = 0.1
    comp[0, 12, 12] = 1.0
    write_psfex(root / "psfex.psf", [psfex_hdu(comp)])
    fits.PrimaryHDU(comp[0].astype("f4")).writeto(root / "image_psf.fits")
    table = Table({"NUMBER": np.arange(1, 4), "X_IMAGE": [10., 20., 30.], "Y_IMAGE": [5., 6., 7.]})
    imhead = fits.BinTableHDU(Table({"Field Header Card": ["SIMPLE  =                    T"]}), name="LDAC_IMHEAD")
    fits.HDUList([fits.PrimaryHDU(), imhead, fits.BinTableHDU(table, name="LDAC_OBJECTS")]).writeto(root / "cat.fits")
    fits.HDUList([fits.PrimaryHDU(), fits.BinTableHDU(Table({"ROW": np.arange(5), "X": np.ones(5)}))]) \
        .writeto(root / "part.fits")
    with h5py.File(root / "chi.h5", "w") as h5:
        for i in range(3):
            h5.create_dataset(f"01_{i:04d}", data=rng.random((2, 2, 6, 40)).astype("f4"))
    return {p.name: p for p in root.iterdir()}


def _chi(path):
    write_chi(Path(path).parent / "merged_chi.h5", [path])


#: reader id: (valid file, reader, error class it must raise)
READERS = {
    "read_cuts/stacked": ("stacked_cuts.h5", read_cuts, CutsFormatError),
    "read_cuts/dre": ("dre_cuts.h5", read_cuts, CutsFormatError),
    "read_cut_objects/stacked": ("stacked_cuts.h5", read_cut_objects, CutsFormatError),
    "read_cut_objects/dre": ("dre_cuts.h5", read_cut_objects, CutsFormatError),
    "count_cuts": ("stacked_cuts.h5", count_cuts, CutsFormatError),
    "read_cube": ("cube.fits", read_cube, InputError),
    "read_psf/psfex": ("psfex.psf", read_psf, PSFError),
    "read_psf/image": ("image_psf.fits", read_psf, PSFError),
    "read_catalog": ("cat.fits", read_catalog, InputError),
    "read_part": ("part.fits", read_part, PartError),
    "write_chi": ("chi.h5", _chi, InputError),
}
FITS_READERS = [r for r, (name, _, _) in READERS.items() if name.endswith((".fits", ".psf"))]
H5_READERS = [r for r in READERS if r not in FITS_READERS]
CUTS_READERS = [r for r in H5_READERS if r != "write_chi"]


@pytest.fixture(scope="module")
def valid(request, tmp_path_factory):
    return build_valid(scratch_dir(request, tmp_path_factory, "valid"))


def expect_error(reader_id, path):
    """The reader raises its error class (a DreError) and names the file."""
    _, reader, error = READERS[reader_id]
    if reader_id in CUTS_READERS and not Path(path).is_file():
        error = InputError                           # not a file at all: not a cuts format problem
    with pytest.raises(DreError) as info:
        reader(path)
    assert isinstance(info.value, error), f"{type(info.value).__name__}: {info.value}"
    assert Path(path).name in str(info.value), str(info.value)
    return str(info.value)


# -- damage ----------------------------------------------------------------------------------

def _card_at(raw: bytes, key: str, hdu: int) -> int:
    """Offset of the card of `key` in the header of HDU `hdu` of the valid FITS bytes `raw`."""
    starts = [i for i in range(0, len(raw), 2880) if raw[i:i + 9] in (b"SIMPLE  =", b"XTENSION=")]
    begin = starts[hdu]
    end = raw.index(b"END" + b" " * 77, begin)
    for i in range(begin, end, 80):
        if raw[i:i + 9] == key.ljust(8).encode() + b"=":
            return i
    raise KeyError(f"{key} not in HDU {hdu}")


def set_card(raw: bytes, key: str, value, hdu: int = 0) -> bytes:
    """`raw` with the card of `key` in HDU `hdu` given `value` (written as is, right-aligned)."""
    i = _card_at(raw, key, hdu)
    card = (key.ljust(8) + "= " + str(value).rjust(20)).encode().ljust(80)
    return raw[:i] + card + raw[i + 80:]


def drop_card(raw: bytes, key: str, hdu: int = 0) -> bytes:
    """`raw` with the card of `key` in HDU `hdu` turned into a blank card."""
    i = _card_at(raw, key, hdu)
    return raw[:i] + b" " * 80 + raw[i + 80:]


def data_hdu(reader_id) -> int:
    """The HDU holding the data the reader wants."""
    return {"read_catalog": 2, "read_cube": 0, "read_psf/image": 0}.get(reader_id, 1)


TRUNCATIONS = [0, 1, 80, 2879, 2880, 2881, 5000, 0.5, -2880]    # bytes kept; 0.5: half; < 0: cut off
FITS_DAMAGE = {
    "naxis1-3e9": lambda raw, k: set_card(raw, "NAXIS1", 3_000_000_000, k),
    "naxis2-3e9": lambda raw, k: set_card(raw, "NAXIS2", 3_000_000_000, k),
    "both-3e9": lambda raw, k: set_card(set_card(raw, "NAXIS1", 3_000_000_000, k), "NAXIS2", 3_000_000_000, k),
    "naxis1-negative": lambda raw, k: set_card(raw, "NAXIS1", -5, k),
    "naxis2-negative": lambda raw, k: set_card(raw, "NAXIS2", -1, k),
    "naxis2-text": lambda raw, k: set_card(raw, "NAXIS2", "'many'", k),
    "naxis-1e30": lambda raw, k: set_card(raw, "NAXIS", 10**30, k),
    "naxis-7": lambda raw, k: set_card(raw, "NAXIS", 7, k),
    "bitpix-7": lambda raw, k: set_card(raw, "BITPIX", 7, k),
    "bitpix-text": lambda raw, k: set_card(raw, "BITPIX", "'abc'", k),
    "no-naxis1": lambda raw, k: drop_card(raw, "NAXIS1", k),
    "no-bitpix": lambda raw, k: drop_card(raw, "BITPIX", k),
}
TABLE_DAMAGE = {
    "tfields-3e9": lambda raw, k: set_card(raw, "TFIELDS", 3_000_000_000, k),
    "tfields-7": lambda raw, k: set_card(raw, "TFIELDS", 7, k),
    "pcount-negative": lambda raw, k: set_card(raw, "PCOUNT", -100, k),
}


@pytest.mark.parametrize("offset", TRUNCATIONS)
@pytest.mark.parametrize("reader_id", list(READERS))
def test_truncated(tmp_path, valid, reader_id, offset):
    raw = valid[READERS[reader_id][0]].read_bytes()
    path = tmp_path / f"trunc{offset}_{READERS[reader_id][0]}"
    keep = int(len(raw) * offset) if isinstance(offset, float) else offset if offset >= 0 else len(raw) + offset
    path.write_bytes(raw[:keep])
    expect_error(reader_id, path)


@pytest.mark.parametrize("reader_id, damage", [
    (reader, damage) for reader in FITS_READERS for damage in list(FITS_DAMAGE) + list(TABLE_DAMAGE)
    if damage in FITS_DAMAGE or data_hdu(reader) > 0])         # table damage only where a table is read
def test_absurd_fits_headers(tmp_path, valid, reader_id, damage):
    raw = valid[READERS[reader_id][0]].read_bytes()
    k = data_hdu(reader_id)
    path = tmp_path / f"{damage}_{READERS[reader_id][0]}"
    path.write_bytes({**FITS_DAMAGE, **TABLE_DAMAGE}[damage](raw, k))
    expect_error(reader_id, path)


@pytest.mark.parametrize("kind", ["empty", "random", "directory", "missing", "text"])
@pytest.mark.parametrize("reader_id", list(READERS))
def test_not_a_file_of_its_kind(tmp_path, valid, reader_id, kind):
    path = tmp_path / f"{kind}_{READERS[reader_id][0]}"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "random":
        path.write_bytes(np.random.default_rng(3).bytes(20_000))
    elif kind == "directory":
        path.mkdir()
    elif kind == "text":
        path.write_text("SIMPLE  = this is not FITS or HDF5\n" * 100)
    message = expect_error(reader_id, path)
    if kind == "directory":
        assert "directory" in message, message
    elif kind == "missing":
        assert "does not exist" in message or "not found" in message, message


def test_the_other_format(tmp_path, valid):
    """A FITS file given to an HDF5 reader and the other way round."""
    for reader_id in READERS:
        other = "cube.fits" if reader_id in H5_READERS else "stacked_cuts.h5"
        path = tmp_path / f"{reader_id.replace('/', '_')}_{other}"
        path.write_bytes(valid[other].read_bytes())
        expect_error(reader_id, path)


# -- HDF5 files with absurd or wrong contents --------------------------------------------------

def _stacked(h5, data=None, shape=None, dtype="f4", objects=None, **kw):
    h5.attrs["layout"] = LAYOUT
    for name, t in (("data", dtype), ("mask", "?" if dtype == "f4" else dtype), ("rms", dtype)):
        if data is not None:
            h5.create_dataset(name, data=data)
        else:
            h5.create_dataset(name, shape=shape, dtype=t, **kw)
    if objects is not None:
        h5.create_dataset("objects", data=objects)


def huge_lazy(h5):
    """(10**9, 128, 128) chunked datasets: 61 TiB claimed, nothing written (a few kB on disk)."""
    _stacked(h5, shape=(10**9, 128, 128), chunks=(1, 128, 128))
    h5.create_dataset("objects", shape=(10**9,), dtype=[("NUMBER", "i8"), ("EXT_NUMBER", "i4")], chunks=(1024,))


def resized(h5):
    """Three written cutouts, then the datasets resized (maxshape None) to 2**40 rows."""
    _stacked(h5, shape=(3, 128, 128), maxshape=(None, 128, 128), chunks=(1, 128, 128))
    for name in ("data", "mask", "rms"):
        h5[name][:] = 1
        h5[name].resize((2**40, 128, 128))
    h5.create_dataset("objects", data=np.zeros(3, [("NUMBER", "i8"), ("EXT_NUMBER", "i4")]))


def huge_contiguous(h5):
    """A contiguous (100000, 128, 128) dataset whose storage is never allocated."""
    _stacked(h5, shape=(100_000, 128, 128))
    h5.create_dataset("objects", shape=(100_000,), dtype=[("NUMBER", "i8")])


def strings(h5):
    _stacked(h5, data=np.zeros((3, 128, 128), "S2"), objects=np.zeros(3, [("NUMBER", "i8")]))


def plain_objects(h5):
    _stacked(h5, data=np.zeros((3, 128, 128), "f4"), objects=np.zeros((3, 2)))


def string_numbers(h5):
    _stacked(h5, data=np.zeros((3, 128, 128), "f4"),
             objects=np.zeros(3, [("NUMBER", "S3"), ("EXT_NUMBER", "f8")]))


def scalars(h5):
    h5.attrs["layout"] = LAYOUT
    for name in ("data", "mask", "rms", "objects"):
        h5.create_dataset(name, data=1.0)


def missing(h5):
    h5.attrs["layout"] = LAYOUT
    h5.create_dataset("data", data=np.zeros((3, 128, 128), "f4"))


def lengths(h5):
    _stacked(h5, data=np.zeros((3, 128, 128), "f4"), objects=np.zeros(5, [("NUMBER", "i8")]))


def group_instead(h5):
    h5.attrs["layout"] = LAYOUT
    for name in ("data", "mask", "rms", "objects"):
        h5.create_group(name)


def layout_array(h5):
    h5.attrs["layout"] = np.array([1, 2, 3])


def dre_huge(h5):
    group = h5.create_group("01_0001")
    for name in ("obj", "seg", "rms"):
        group.create_dataset(name, shape=(10**6, 10**6), dtype="f4", chunks=(128, 128))


def dre_unwritten(h5):
    group = h5.create_group("01_0001")
    for name in ("obj", "seg", "rms"):
        group.create_dataset(name, shape=(128, 128), dtype="f4", chunks=(64, 64))


def dre_strings(h5):
    group = h5.create_group("01_0001")
    for name in ("obj", "seg", "rms"):
        group.create_dataset(name, data=np.zeros((128, 128), "S1"))


def dre_dataset_member(h5):
    group = h5.create_group("01_0001")
    for name in ("obj", "seg", "rms"):
        group.create_dataset(name, data=np.zeros((128, 128), "f4"))
    h5.create_dataset("01_0002", data=np.zeros(3))


def dre_group_member(h5):
    group = h5.create_group("01_0001")
    for name in ("obj", "seg"):
        group.create_dataset(name, data=np.zeros((128, 128), "f4"))
    group.create_group("rms")


def dre_broken_link(h5):
    group = h5.create_group("01_0001")
    for name in ("obj", "seg"):
        group.create_dataset(name, data=np.zeros((128, 128), "f4"))
    group["rms"] = h5py.ExternalLink("/nonexistent/elsewhere.h5", "/rms")


HOSTILE_H5 = [huge_lazy, resized, huge_contiguous, strings, plain_objects, string_numbers, scalars,
              missing, lengths, group_instead, layout_array, dre_huge, dre_unwritten, dre_strings,
              dre_dataset_member, dre_group_member, dre_broken_link]
#: (reader, builder) pairs that legitimately succeed: the reader does not look at what is wrong
#: (counting needs no pixels, the object table needs no pixels, DRE names need no datasets)
#: (reader, builder) pairs that succeed: the object table and the count of a DRE-layout file come
#: from its group names (no dataset is read), and a file with no groups and no valid layout tag
#: is an empty cuts file, as before
DRE_CONTENTS = ("dre_huge", "dre_unwritten", "dre_strings", "dre_group_member", "dre_broken_link")
ACCEPTED = ({(r, b) for r in ("read_cut_objects/stacked", "read_cut_objects/dre", "count_cuts") for b in DRE_CONTENTS}
            | {(r, "layout_array") for r in CUTS_READERS})


@pytest.mark.parametrize("builder", HOSTILE_H5, ids=lambda f: f.__name__)
@pytest.mark.parametrize("reader_id", CUTS_READERS)
def test_hostile_hdf5_contents(tmp_path, reader_id, builder):
    path = tmp_path / f"{builder.__name__}_cuts.h5"
    with h5py.File(path, "w") as h5:
        builder(h5)
    assert path.stat().st_size < 1_000_000           # the absurd shapes cost nothing on disk
    if (reader_id, builder.__name__) in ACCEPTED:
        READERS[reader_id][1](path)                  # succeeds without reading what it does not need
        return
    expect_error(reader_id, path)


def test_absurd_shapes_are_refused_before_reading(tmp_path):
    """The messages say why: chunks never written, storage smaller than the shape."""
    path = tmp_path / "huge_cuts.h5"
    with h5py.File(path, "w") as h5:
        huge_lazy(h5)
    assert "1000000000 cutouts needs 137329.1 GiB, more than the 64 GiB limit" in expect_error("read_cuts/stacked", path)
    assert "holds only 0 of its 1000000000 chunks" in expect_error("count_cuts", path)
    with h5py.File(path, "w") as h5:
        _stacked(h5, shape=(1000, 128, 128), chunks=(10, 128, 128))
        h5["data"][:20] = 1.0
        h5.create_dataset("objects", data=np.zeros(1000, [("NUMBER", "i8")]))
    assert "'data' of shape (1000, 128, 128) holds only 2 of its 100 chunks" in expect_error("read_cuts/stacked", path)
    with h5py.File(path, "w") as h5:
        huge_contiguous(h5)
    assert "claims 6553600000 bytes but the file stores 0" in expect_error("read_cuts/stacked", path)


def test_absurd_sizes_under_a_memory_limit(tmp_path, valid):
    """Absurd FITS headers and HDF5 shapes in a subprocess limited to 3 GiB of address space: every
    reader still answers with its DreError (an allocation of the claimed size would fail)."""
    cube = valid["cube.fits"].read_bytes()
    (tmp_path / "cube_cuts.fits").write_bytes(set_card(set_card(cube, "NAXIS1", 3_000_000_000), "NAXIS2", 3_000_000_000))
    psf = valid["psfex.psf"].read_bytes()
    (tmp_path / "psf.psf").write_bytes(set_card(psf, "NAXIS2", 3_000_000_000, 1))
    cat = valid["cat.fits"].read_bytes()
    (tmp_path / "cat.fits").write_bytes(set_card(cat, "NAXIS2", 3_000_000_000, 2))
    part = valid["part.fits"].read_bytes()
    (tmp_path / "part.fits").write_bytes(set_card(part, "NAXIS2", 3_000_000_000, 1))
    with h5py.File(tmp_path / "huge_cuts.h5", "w") as h5:
        huge_lazy(h5)
    with h5py.File(tmp_path / "dre_cuts.h5", "w") as h5:
        dre_huge(h5)
    script = textwrap.dedent(f"""
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))
        from pathlib import Path
        from dre_hpc.errors import DreError
        from dre_hpc.batch.merge import read_part
        from dre_hpc.io.catalog import read_catalog
        from dre_hpc.io.cuts import read_cuts, read_cut_objects
        from dre_hpc.models.cube_io import read_cube
        from dre_hpc.models.psf import read_psf
        d = Path({str(tmp_path)!r})
        for reader, name in [(read_cube, "cube_cuts.fits"), (read_psf, "psf.psf"), (read_catalog, "cat.fits"),
                             (read_part, "part.fits"), (read_cuts, "huge_cuts.h5"), (read_cut_objects, "huge_cuts.h5"),
                             (read_cuts, "dre_cuts.h5")]:
            try:
                reader(d / name)
            except DreError as exc:
                assert name in str(exc), exc
                print("refused", name)
            else:
                raise SystemExit("accepted " + name)
        try:                                            # the limit is real
            bytearray(4 << 30)
        except MemoryError:
            print("limited")
    """)
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("refused") == 7 and "limited" in done.stdout, done.stdout + done.stderr


# -- through the command line ------------------------------------------------------------------

@pytest.mark.parametrize("broken", ["cuts", "cube"])
def test_dre_command_on_a_truncated_file(tmp_path, valid, broken):
    """``python -m dre_hpc.cli.dre`` on a truncated cuts file or model cube: exit code 2, one line."""
    cube = tmp_path / "cube.fits"
    cube.write_bytes(valid["cube.fits"].read_bytes()[:(10_000 if broken == "cube" else None)])
    cuts_dir = tmp_path / "Cuts"
    cuts_dir.mkdir()
    (cuts_dir / "img_cuts.h5").write_bytes(valid["stacked_cuts.h5"].read_bytes()[:(5000 if broken == "cuts" else None)])
    argv = [sys.executable, "-m", "dre_hpc.cli.dre", "-m", cube, "--psf", valid["image_psf.fits"],
            "-i", cuts_dir, "-o", tmp_path / "Summary", "--chi", tmp_path / "Chi"]
    done = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    lines = [line for line in done.stderr.splitlines() if "error" in line]
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and len(lines) == 1, done.stderr
    assert ("img_cuts.h5" if broken == "cuts" else "cube.fits") in lines[0]


# -- fuzzing (hypothesis) -----------------------------------------------------------------------

FUZZ = settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                         HealthCheck.too_slow])


@pytest.fixture(scope="module")
def fuzz_dir(request, tmp_path_factory):
    return scratch_dir(request, tmp_path_factory, "fuzz")


def _accept_or(error, call):
    """`call()` either succeeds or raises `error` (another exception fails the test)."""
    try:
        return call()
    except error as exc:
        assert str(exc)
        return None


def _set_if_there(raw, key, value, hdu):
    """`set_card`, or the example is discarded when HDU `hdu` lacks `key`."""
    try:
        return set_card(raw, key, value, hdu)
    except (KeyError, IndexError):
        assume(False)


@FUZZ
@given(data=st.data())
def test_fuzz_read_part(valid, fuzz_dir, data):
    """Random truncations, random card values and random bytes: read_part answers a TablePart or
    a PartError; an accepted part's rows lie inside the file."""
    raw = bytearray(valid["part.fits"].read_bytes())
    how = data.draw(st.sampled_from(["truncate", "card", "bytes", "random"]))
    if how == "truncate":
        raw = raw[:data.draw(st.integers(0, len(raw)))]
    elif how == "card":
        key = data.draw(st.sampled_from(["NAXIS", "NAXIS1", "NAXIS2", "BITPIX", "PCOUNT", "GCOUNT", "TFIELDS"]))
        value = data.draw(st.one_of(st.integers(-2**70, 2**70), st.text(max_size=12).map(repr),
                                    st.floats(allow_nan=True).map(str)))
        raw = bytearray(_set_if_there(bytes(raw), key, value, data.draw(st.integers(0, 1))))
    elif how == "bytes":
        at = data.draw(st.integers(0, len(raw) - 1))
        junk = data.draw(st.binary(min_size=1, max_size=200))
        raw[at:at + len(junk)] = junk
    else:
        raw = data.draw(st.binary(max_size=9000))
    path = fuzz_dir / "part.fits"
    path.write_bytes(bytes(raw))
    part = _accept_or(PartError, lambda: read_part(path))
    if part is not None:
        assert 0 <= part.offset and part.offset + part.nbytes <= len(raw)


@FUZZ
@given(data=st.data())
def test_fuzz_fits_readers(valid, fuzz_dir, data):
    """check_fits, read_psf and read_catalog on damaged files: a result or their InputError."""
    name = data.draw(st.sampled_from(["psfex.psf", "cat.fits", "image_psf.fits"]))
    raw = bytearray(valid[name].read_bytes())
    how = data.draw(st.sampled_from(["truncate", "card", "bytes"]))
    if how == "truncate":
        raw = raw[:data.draw(st.integers(0, len(raw)))]
    elif how == "card":
        key = data.draw(st.sampled_from(["NAXIS", "NAXIS1", "NAXIS2", "BITPIX", "PCOUNT", "GCOUNT"]))
        value = data.draw(st.one_of(st.integers(-2**40, 2**40), st.sampled_from(["'x'", "T", "1.5", "", "1e30"])))
        raw = bytearray(_set_if_there(bytes(raw), key, value, data.draw(st.integers(0, 2))))
    else:
        at = data.draw(st.integers(0, len(raw) - 1))
        junk = data.draw(st.binary(min_size=1, max_size=100))
        raw[at:at + len(junk)] = junk
    path = fuzz_dir / name
    path.write_bytes(bytes(raw))
    _accept_or(InputError, lambda: check_fits(path))
    reader = read_catalog if name == "cat.fits" else read_psf
    _accept_or(InputError, lambda: reader(path))


@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_cuts_reader(valid, fuzz_dir, data):
    """Truncations of valid cuts files (both layouts) and random bytes: a CutoutSet or a
    CutsFormatError; an accepted read equals the valid file's."""
    name = data.draw(st.sampled_from(["stacked_cuts.h5", "dre_cuts.h5"]))
    raw = valid[name].read_bytes()
    if data.draw(st.booleans()):
        raw = raw[:data.draw(st.integers(0, len(raw)))]
    else:
        raw = data.draw(st.binary(max_size=4096))
    path = fuzz_dir / name
    path.write_bytes(raw)
    cuts = _accept_or(CutsFormatError, lambda: read_cuts(path))
    if cuts is not None and len(cuts):
        np.testing.assert_array_equal(cuts.data, read_cuts(valid[name]).data)
    _accept_or(CutsFormatError, lambda: count_cuts(path))
    _accept_or(CutsFormatError, lambda: read_cut_objects(path, 1, 2))


# -- tile images cut by make_cuts ------------------------------------------------------------

@pytest.mark.parametrize("damage", ["truncated", "naxis1-3e9", "bitpix-7", "naxis2-text", "ok", "compressed"])
def test_tile_images(tmp_path, damage):
    """make_cuts' image reader (memory-mapped planes): damaged images are an InputError naming the
    file before any plane is mapped; a plain and a tile-compressed image are read."""
    from dre_hpc.preprocess.cuts import TileImages

    pixels = np.arange(300 * 200, dtype="f4").reshape(300, 200)
    path = tmp_path / "tile.fits"
    if damage == "compressed":
        fits.HDUList([fits.PrimaryHDU(), fits.CompImageHDU(pixels)]).writeto(path)
    else:
        fits.PrimaryHDU(pixels).writeto(path)
    raw = path.read_bytes()
    damaged = {"truncated": lambda: raw[:len(raw) // 2], "naxis1-3e9": lambda: set_card(raw, "NAXIS1", 3_000_000_000),
               "bitpix-7": lambda: set_card(raw, "BITPIX", 7), "naxis2-text": lambda: set_card(raw, "NAXIS2", "'x'")}
    path.write_bytes(damaged.get(damage, lambda: raw)())
    if damage in ("ok", "compressed"):
        images = TileImages({"sci": path})
        np.testing.assert_array_equal(images.plane("sci", 1), pixels)
        images.close()
        return
    with pytest.raises(InputError, match="tile.fits: cannot be read as a FITS image"):
        TileImages({"sci": path})
