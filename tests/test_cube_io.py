"""Model cubes in the original DRE FITS layout, and cube generation (unique models, default cache)."""

import warnings

import numpy as np
import pytest
from astropy.io import fits

from dre_hpc.errors import CubeFormatError, InputError
from dre_hpc.models import generate
from dre_hpc.models.cube_io import read_cube, write_cube
from dre_hpc.models.grid import Axis, ModelGrid
from dre_hpc.models.sersic import RENDERER_VERSION, render_sersic

BOX = 16


def small_grid(with_index):
    index = Axis("INDEX", 1.0, 3.0, 2) if with_index else Axis("INDEX", 4.0, 0.0, 1)
    return ModelGrid(index, Axis("AX_RATIO", 0.5, 0.5, 2), Axis("ANGLE", 0.0, 45.0, 3),
                     Axis("LOGR", -0.5, 0.5, 4), boxsize=BOX, has_index_axis=with_index)


def random_cube(grid, seed=0):
    return np.random.default_rng(seed).random(grid.shape + (BOX, BOX)).astype(np.float32)


@pytest.mark.parametrize("with_index", [False, True])
def test_round_trip(tmp_path, with_index):
    grid = small_grid(with_index)
    cube = random_cube(grid)
    path = write_cube(tmp_path / "cube.fits", cube, grid)
    back, grid_back = read_cube(path)
    assert back.dtype == np.float32 and back.flags.c_contiguous
    np.testing.assert_array_equal(back, cube)
    assert grid_back == grid
    assert [p.name for p in tmp_path.iterdir()] == ["cube.fits"]  # no temporary left


@pytest.mark.parametrize("with_index", [False, True])
def test_original_loader_recovers_the_stamps(tmp_path, with_index):
    """The original DRE code: getheader (HDU 0), getdata, reshape + swapaxes."""
    grid = small_grid(with_index)
    cube = random_cube(grid, seed=1)
    path = write_cube(tmp_path / "cube.fits", cube, grid)
    header = fits.getheader(path)
    nq, na, nr, box = header["NAXRAT"], header["NPOSANG"], header["NLOGH"], header["BOXSIZE"]
    if with_index:
        n_index = header["NINDEX"]
        models = fits.getdata(path).astype(float).reshape(n_index, nq, na, box, nr, box).swapaxes(3, 4)
        assert models.shape == cube.shape
    else:
        assert "NINDEX" not in header and fits.getdata(path).ndim == 3
        models = fits.getdata(path).astype(float).reshape(nq, na, box, nr, box).swapaxes(2, 3)
        models = models[None]
    np.testing.assert_array_equal(models, cube)
    # the tiling itself: angle tiles down the rows, radius tiles across the columns
    tiles = fits.getdata(path)
    plane = tiles[1, 1] if with_index else tiles[1]
    np.testing.assert_array_equal(plane[2 * box:3 * box, 3 * box:4 * box], cube[-1, 1, 2, 3])
    axes = [(header[k0], header[dk]) for k0, dk in (("AXRAT0", "DAXRAT"), ("POSANG0", "DPOSANG"),
                                                     ("LOGH0", "DLOGH"))]
    assert axes == [(0.5, 0.5), (0.0, 45.0), (-0.5, 0.5)]


def test_documenting_keys_and_no_fits_warnings(tmp_path):
    grid = small_grid(False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        path = write_cube(tmp_path / "c.fits", random_cube(grid), grid,
                          extra_cards=generate.generator_cards())
    header = fits.getheader(path)
    assert header["CENTPIX"] == BOX // 2 + 1 and header["RADDEF"] == "HLR_MAJOR"
    assert header["FLUXNORM"] == "UNIT_TOTAL" and header["RENDERV"] == RENDERER_VERSION
    assert header["BITPIX"] == -32


def test_grid_keys_from_data_extension(tmp_path):
    grid = small_grid(True)
    cube = random_cube(grid)
    path = write_cube(tmp_path / "c.fits", cube, grid)
    with fits.open(path) as hdul:
        moved = fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(hdul[0].data, hdul[0].header)])
        moved.writeto(tmp_path / "ext.fits")
    back, grid_back = read_cube(tmp_path / "ext.fits")
    np.testing.assert_array_equal(back, cube)
    assert grid_back == grid


def test_missing_keys_are_named(tmp_path):
    path = tmp_path / "nokeys.fits"
    header = fits.Header([("NAXRAT", 2), ("AXRAT0", 0.5), ("BOXSIZE", BOX)])
    fits.PrimaryHDU(np.zeros((2, BOX, BOX), np.float32), header).writeto(path)
    with pytest.raises(CubeFormatError) as err:
        read_cube(path)
    message = str(err.value)
    assert str(path) in message and "DAXRAT" in message and "NPOSANG" in message
    missing = message.split("key(s) ")[1].split(" (expected")[0]
    assert missing.split(", ") == ["DAXRAT", "NPOSANG", "POSANG0", "DPOSANG", "NLOGH", "LOGH0", "DLOGH"]


def test_bad_shape_says_expected_and_found(tmp_path):
    grid = small_grid(False)
    path = write_cube(tmp_path / "c.fits", random_cube(grid), grid)
    with fits.open(path) as hdul:
        fits.PrimaryHDU(hdul[0].data[:, :-BOX], hdul[0].header).writeto(tmp_path / "short.fits")
    with pytest.raises(CubeFormatError) as err:
        read_cube(tmp_path / "short.fits")
    message = str(err.value)
    assert "short.fits" in message and "(2, 32, 64)" in message and "(2, 48, 64)" in message


def test_non_finite_values_are_refused(tmp_path):
    grid = small_grid(True)
    cube = random_cube(grid)
    path = write_cube(tmp_path / "c.fits", cube, grid)
    with fits.open(path, mode="update") as hdul:
        hdul[0].data[1, 0, 2 * BOX + 3, BOX + 5] = np.nan
    with pytest.raises(CubeFormatError, match=r"1 non-finite .* \(1, 0, 2, 1\)"):
        read_cube(path)
    with pytest.raises(CubeFormatError, match="non-finite"):
        cube[0, 0, 0, 0, 0, 0] = np.inf
        write_cube(tmp_path / "bad.fits", cube, grid)


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(InputError, match="nothere.fits not found"):
        read_cube(tmp_path / "nothere.fits")
    junk = tmp_path / "junk.fits"
    junk.write_text("this is not FITS\n")
    with pytest.raises(InputError, match="junk.fits"):
        read_cube(junk)
    grid = small_grid(False)
    whole = write_cube(tmp_path / "whole.fits", random_cube(grid), grid).read_bytes()
    (tmp_path / "cut.fits").write_bytes(whole[:len(whole) // 2])
    with pytest.raises(InputError, match="cut.fits.*truncated"):
        read_cube(tmp_path / "cut.fits")
    empty = tmp_path / "empty.fits"
    fits.PrimaryHDU().writeto(empty)
    with pytest.raises(CubeFormatError, match="no HDU holds image data"):
        read_cube(empty)


def test_write_checks(tmp_path):
    grid = small_grid(False)
    cube = random_cube(grid)
    path = write_cube(tmp_path / "c.fits", cube, grid)
    with pytest.raises(InputError, match="already exists"):
        write_cube(path, cube, grid)
    write_cube(path, cube * 2, grid, overwrite=True)
    np.testing.assert_array_equal(read_cube(path)[0], cube * 2)
    with pytest.raises(CubeFormatError, match="does not match the grid"):
        write_cube(tmp_path / "d.fits", cube[:, :1], grid)
    n2 = ModelGrid(Axis("INDEX", 2.0, 0.0, 1), *grid.axes[1:], boxsize=BOX, has_index_axis=False)
    with pytest.raises(CubeFormatError, match="n = 4 only"):
        write_cube(tmp_path / "e.fits", cube, n2)
    with pytest.raises(InputError, match="does not exist"):
        write_cube(tmp_path / "no" / "f.fits", cube, grid)


def test_make_cube_copies_unique_models():
    grid = ModelGrid(Axis("INDEX", 4.0, 0.0, 1), Axis("AX_RATIO", 0.5, 0.5, 2),
                     Axis("ANGLE", 0.0, 90.0, 3), Axis("LOGR", 0.0, 0.3, 2), boxsize=BOX,
                     has_index_axis=False)
    cube, grid_out = generate.make_cube(grid)
    assert grid_out is grid and cube.shape == grid.shape + (BOX, BOX) and cube.dtype == np.float32
    np.testing.assert_array_equal(cube[0, 0, 2], cube[0, 0, 0])  # q = 0.5: 180 deg = 0 deg
    np.testing.assert_array_equal(cube[0, 1, 1], cube[0, 1, 0])  # q = 1: every angle alike
    expected = render_sersic(4.0, 0.5, 90.0, 10 ** 0.3, boxsize=BOX)
    np.testing.assert_array_equal(cube[0, 0, 1, 1], expected)


def test_default_cube_is_generated_once(tmp_path, monkeypatch):
    tiny = small_grid(False)
    monkeypatch.setattr(ModelGrid, "default", classmethod(lambda cls: tiny))
    monkeypatch.setenv("DRE_HPC_CACHE", str(tmp_path))
    calls = []
    real_make_cube = generate.make_cube
    monkeypatch.setattr(generate, "make_cube", lambda g, **kw: calls.append(g) or real_make_cube(g, **kw))
    path = generate.ensure_default_cube()
    assert path.parent == tmp_path and f"_r{RENDERER_VERSION}_" in path.name
    assert generate.ensure_default_cube() == path and len(calls) == 1
    cube, grid = generate.load_default_cube()
    assert grid == tiny and len(calls) == 1
    assert fits.getheader(path)["GENERATR"].startswith("dre_hpc")
    np.testing.assert_array_equal(cube, real_make_cube(tiny)[0])
