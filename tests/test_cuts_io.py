"""Cuts files (dre_hpc.io.cuts): both layouts round trip, partial reads, and clear errors.

The DRE layout is the original's (one group ``EE_NNNN`` per object with obj/seg/rms and nothing
else); the stacked layout is ours (data/mask/rms stacks plus an ``objects`` table).
"""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from dre_hpc.errors import CutsFormatError, InputError
from dre_hpc.io.cuts import (STACKED_LAYOUT, CutoutSet, count_cuts, empty_objects, object_name,
                             read_cuts, write_cuts)

B = 128


def make_cuts(n, seed=0, ext=0):
    """Random cutouts with a distinct table row per object (positions, offsets, cut flags)."""
    rng = np.random.default_rng(seed)
    data = rng.normal(0, 1, (n, B, B)).astype(np.float32)
    mask = rng.random((n, B, B)) > 0.5
    rms = rng.uniform(0.5, 2.0, (n, B, B)).astype(np.float32)
    objects = empty_objects(n)
    objects["NUMBER"] = 10 * np.arange(1, n + 1) + 3          # not 1..n: names must come from NUMBER
    objects["EXT_NUMBER"] = ext
    objects["X_IMAGE"] = rng.uniform(100, 900, n)
    objects["Y_IMAGE"] = rng.uniform(100, 900, n)
    objects["X0"] = np.floor(objects["X_IMAGE"]).astype(int) - B // 2
    objects["Y0"] = np.floor(objects["Y_IMAGE"]).astype(int) - B // 2
    objects["DX"] = rng.uniform(-1, 0, n)
    objects["DY"] = rng.uniform(-1, 0, n)
    objects["CUT_FLAGS"] = np.arange(n) % 2
    cuts = CutoutSet(data, mask, rms, objects, "test")
    cuts.names = [object_name(ext, k) for k in objects["NUMBER"]]
    return cuts


def assert_same_pixels(a, b):
    np.testing.assert_array_equal(a.data, b.data)
    np.testing.assert_array_equal(a.mask, b.mask)
    np.testing.assert_array_equal(a.rms, b.rms)
    assert a.data.dtype == np.float32 and a.rms.dtype == np.float32 and a.mask.dtype == bool


@pytest.mark.parametrize("compression", ["none", "low", "high"])
def test_stacked_round_trip(tmp_path, compression):
    cuts = make_cuts(5, ext=2)
    path = tmp_path / "img_cuts.h5"
    write_cuts(path, cuts, layout="stacked", compression=compression)
    back = read_cuts(path)
    assert len(back) == 5 and count_cuts(path) == 5
    assert_same_pixels(back, cuts)
    for name in cuts.objects.dtype.names:          # the whole table survives, positions included
        np.testing.assert_array_equal(back.objects[name], cuts.objects[name])
    assert back.names == [f"02_{k:04d}" for k in cuts.objects["NUMBER"]]
    assert back.source == str(path)
    assert not list(tmp_path.glob("*.tmp"))         # written under a temporary name, then renamed


def test_dre_layout_round_trip(tmp_path):
    cuts = make_cuts(5, ext=1)
    path = tmp_path / "img_cuts.h5"
    write_cuts(path, cuts, layout="dre")
    with h5py.File(path, "r") as h5:               # exactly the original's structure
        assert sorted(h5) == [f"01_{k:04d}" for k in cuts.objects["NUMBER"]]
        group = h5["01_0013"]
        assert set(group) == {"obj", "seg", "rms"} and not dict(h5.attrs)
        assert group["obj"].dtype == np.float32 and group["seg"].dtype == bool
        assert group["obj"].shape == (B, B)
    back = read_cuts(path)
    assert count_cuts(path) == 5
    assert_same_pixels(back, cuts)
    np.testing.assert_array_equal(back.objects["NUMBER"], cuts.objects["NUMBER"])
    np.testing.assert_array_equal(back.objects["EXT_NUMBER"], 1)
    assert back.names == cuts.names
    # the DRE layout stores no positions: offsets are unknown until a catalogue gives them
    assert np.isnan(back.offsets).all()


def test_dre_layout_is_read_in_sorted_group_order(tmp_path):
    cuts = make_cuts(4)
    order = [2, 0, 3, 1]
    shuffled = cuts.subset(order)
    path = tmp_path / "img_cuts.h5"
    write_cuts(path, shuffled, layout="dre")
    back = read_cuts(path)
    np.testing.assert_array_equal(back.objects["NUMBER"], np.sort(cuts.objects["NUMBER"]))
    np.testing.assert_array_equal(back.data, cuts.data)


@pytest.mark.parametrize("layout", ["stacked", "dre"])
def test_empty_files(tmp_path, layout):
    cuts = make_cuts(0)
    path = tmp_path / "img_cuts.h5"
    write_cuts(path, cuts, layout=layout)
    assert count_cuts(path) == 0
    back = read_cuts(path)
    assert len(back) == 0 and back.data.shape == (0, B, B) and back.mask.shape == (0, B, B)
    assert len(back.objects) == 0 and back.offsets.shape == (0, 2)


def test_plain_empty_hdf5_is_an_empty_cuts_file(tmp_path):
    path = tmp_path / "img_cuts.h5"
    h5py.File(path, "w").close()
    assert count_cuts(path) == 0 and len(read_cuts(path)) == 0


@pytest.mark.parametrize("layout", ["stacked", "dre"])
@pytest.mark.parametrize("start, stop", [(0, 3), (2, 5), (4, None), (1, 2), (3, 3), (5, None)])
def test_partial_reads(tmp_path, layout, start, stop):
    cuts = make_cuts(5)
    path = tmp_path / "img_cuts.h5"
    write_cuts(path, cuts, layout=layout)
    part = read_cuts(path, start, stop)
    want = cuts.subset(slice(start, stop))
    assert len(part) == len(want)
    assert_same_pixels(part, want)
    np.testing.assert_array_equal(part.objects["NUMBER"], want.objects["NUMBER"])
    assert part.names == want.names
    if layout == "stacked":
        np.testing.assert_array_equal(part.objects["DX"], want.objects["DX"])


def test_partial_reads_cover_the_file(tmp_path):
    cuts = make_cuts(7)
    path = tmp_path / "img_cuts.h5"
    write_cuts(path, cuts)
    parts = [read_cuts(path, s, s + 3) for s in range(0, count_cuts(path), 3)]
    np.testing.assert_array_equal(np.concatenate([p.data for p in parts]), cuts.data)
    assert sum((p.names for p in parts), []) == cuts.names


def test_reads_into_reused_buffers(tmp_path):
    """With ``buffers`` each read fills the same arrays (views of them come back), growing them when
    a read is larger; the pixels are those of a plain read, and a file storing other types (here
    float64 data) is converted as before."""
    cuts = make_cuts(7)
    path = tmp_path / "img_cuts.h5"
    write_cuts(path, cuts)
    buffers = {}
    first = read_cuts(path, 0, 3, buffers=buffers)
    assert_same_pixels(first, read_cuts(path, 0, 3))
    second = read_cuts(path, 3, 5, buffers=buffers)
    assert_same_pixels(second, cuts.subset(slice(3, 5)))
    assert all(np.shares_memory(getattr(first, k), getattr(second, k)) for k in ("data", "mask", "rms"))
    whole = read_cuts(path, 0, None, buffers=buffers)            # larger: new buffers
    assert_same_pixels(whole, cuts)
    assert len(buffers["data"]) == 7
    with h5py.File(path, "a") as h5:
        del h5["data"]
        h5["data"] = cuts.data.astype(np.float64)
    assert_same_pixels(read_cuts(path, 2, 6, buffers={}), cuts.subset(slice(2, 6)))


def test_subset_keeps_names_and_rows():
    cuts = make_cuts(6)
    sub = cuts.subset(np.array([4, 1]))
    assert sub.names == [cuts.names[4], cuts.names[1]]
    np.testing.assert_array_equal(sub.data[0], cuts.data[4])
    np.testing.assert_array_equal(sub.offsets[1], [cuts.objects["DY"][1], cuts.objects["DX"][1]])


# -- errors: a CutsFormatError (an InputError) naming the file -------------------------------

def check_error(path, match, exc=CutsFormatError):
    for reader in (read_cuts, count_cuts):
        with pytest.raises(exc, match=match) as info:
            reader(path)
        assert str(path) in str(info.value)
        assert isinstance(info.value, InputError)


def test_missing_file(tmp_path):
    check_error(tmp_path / "nope_cuts.h5", "does not exist", InputError)


def test_not_hdf5(tmp_path):
    path = tmp_path / "text_cuts.h5"
    path.write_text("this is not HDF5\n" * 50)
    check_error(path, "cannot be read as HDF5")


def test_fits_file_named_like_cuts(tmp_path):
    from astropy.io import fits
    path = tmp_path / "fits_cuts.h5"
    fits.PrimaryHDU(np.zeros((4, 4))).writeto(path)
    check_error(path, "cannot be read as HDF5")


def test_unrelated_hdf5_content(tmp_path):
    path = tmp_path / "other_cuts.h5"
    with h5py.File(path, "w") as h5:
        h5.create_dataset("temperature", data=np.arange(10.0))
        h5.create_group("run").create_dataset("x", data=[1, 2])
    check_error(path, "not a cuts file.*obj/seg/rms.*" + STACKED_LAYOUT)


def test_stacked_not_128(tmp_path):
    cuts = make_cuts(3)
    small = CutoutSet(cuts.data[:, :100, :100], cuts.mask[:, :100, :100], cuts.rms[:, :100, :100],
                      cuts.objects)
    path = tmp_path / "small_cuts.h5"
    write_cuts(path, small)
    assert count_cuts(path) == 3                   # counting does not need the pixels
    with pytest.raises(CutsFormatError, match=r"\(100, 100\), expected \(128, 128\)") as info:
        read_cuts(path)
    assert str(path) in str(info.value)


def test_dre_group_with_64_pixel_obj(tmp_path):
    path = tmp_path / "mixed_cuts.h5"
    write_cuts(path, make_cuts(3), layout="dre")
    with h5py.File(path, "a") as h5:
        name = sorted(h5)[1]
        del h5[name]["obj"]
        h5[name].create_dataset("obj", data=np.zeros((64, 64), np.float32))
    with pytest.raises(CutsFormatError, match="128x128") as info:
        read_cuts(path)
    assert str(path) in str(info.value)


def test_dre_single_group_all_64(tmp_path):
    path = tmp_path / "tiny_cuts.h5"
    with h5py.File(path, "w") as h5:
        g = h5.create_group("00_0001")
        g["obj"] = np.zeros((64, 64), np.float32)
        g["seg"] = np.zeros((64, 64), bool)
        g["rms"] = np.ones((64, 64), np.float32)
    with pytest.raises(CutsFormatError, match=r"\(64, 64\), expected \(128, 128\)") as info:
        read_cuts(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("which", [0, 4])
def test_dre_group_lacking_rms(tmp_path, which):
    """The first group (layout detection) or a later one (reading) lacks ``rms``."""
    path = tmp_path / "norms_cuts.h5"
    write_cuts(path, make_cuts(5), layout="dre")
    with h5py.File(path, "a") as h5:
        name = sorted(h5)[which]
        del h5[name]["rms"]
    with pytest.raises(CutsFormatError, match="rms") as info:
        read_cuts(path)
    assert str(path) in str(info.value) and repr(name) in str(info.value)


def test_dre_bad_group_name(tmp_path):
    path = tmp_path / "names_cuts.h5"
    write_cuts(path, make_cuts(2), layout="dre")
    with h5py.File(path, "a") as h5:
        h5.move(sorted(h5)[0], "galaxy")
    with pytest.raises(CutsFormatError, match="'galaxy'.*EXT_NUMBER_NUMBER") as info:
        read_cuts(path)
    assert str(path) in str(info.value)


def test_stacked_lacking_a_dataset(tmp_path):
    path = tmp_path / "broken_cuts.h5"
    write_cuts(path, make_cuts(2))
    with h5py.File(path, "a") as h5:
        del h5["rms"]
    with pytest.raises(CutsFormatError, match="lacks.*rms") as info:
        read_cuts(path)
    assert str(path) in str(info.value)
