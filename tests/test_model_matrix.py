"""The fit's model layout (pixel-major, radial order) and the one holder of convolved models."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from dre_hpc.fit.model_matrix import ModelMatrix, NodeModels, model_support, radial_order, to_pixel_major
from dre_hpc.models.convolve import convolve_cube, remove_pixel_response
from dre_hpc.models.grid import Axis, ModelGrid


def small_grid():
    """A 3 x 2 x 2 grid of 16x16 stamps (b/a 1 makes some models identical)."""
    return ModelGrid(index=Axis("INDEX", 4.0, 0.0, 1), ax_ratio=Axis("AX_RATIO", 0.5, 0.5, 2),
                     angle=Axis("ANGLE", 0.0, 45.0, 2), logr=Axis("LOGR", 0.0, 0.3, 3), boxsize=16)


def random_cube(grid, seed=0):
    rng = np.random.default_rng(seed)
    return rng.random(grid.shape + (grid.boxsize, grid.boxsize)).astype(np.float32)


def test_radial_order_runs_outwards_from_the_model_centre():
    order = radial_order(16)
    y, x = np.divmod(order, 16)
    r2 = (y - 8) ** 2 + (x - 8) ** 2
    assert order[0] == 8 * 16 + 8 and sorted(order) == list(range(256))
    assert np.all(np.diff(r2) >= 0)


def test_pixel_major_matrix_holds_every_model_and_its_squares():
    grid = small_grid()
    stamps = random_cube(grid)[..., :, :].reshape((grid.size, 16, 16))[grid.unique_models()[0]]
    mm = ModelMatrix(np, grid, to_pixel_major(stamps, radial_order(16)))
    assert mm.models.shape == (256, stamps.shape[0]) and mm.models.flags.c_contiguous
    np.testing.assert_array_equal(mm.models_sq, mm.models * mm.models)
    for cell in range(grid.size):               # every full-grid cell maps to its stamp
        np.testing.assert_array_equal(mm.stamp(cell), stamps[mm.inverse[cell]])
    assert np.all(np.diff(mm.radius) >= 0)
    with pytest.raises(Exception, match="pixel-major"):
        ModelMatrix(np, grid, np.zeros((stamps.shape[0], 256), np.float32))


def test_node_models_cache_is_mapped_instead_of_the_cube(tmp_path, caplog):
    """The first holder convolves and writes the cache entry; a second one (as a later job) maps
    it, read-only, and never reads the cube; a damaged entry is ignored, with a warning, and
    written again."""
    grid = small_grid()
    cube = random_cube(grid, 1)
    psf = np.outer(*(2 * [np.exp(-0.5 * (np.arange(9) - 4.0) ** 2)]))
    psf /= psf.sum()
    first = NodeModels(None, lambda: (cube, grid, "cube-key"), describe=lambda: (grid, "cube-key"),
                       cache_dir=tmp_path)
    mm = first.for_psf(psf)
    assert first.n_convolved == 1 and len(list(tmp_path.glob("models-*"))) == 1
    entry = next(tmp_path.glob("models-*"))
    assert sorted(p.name for p in entry.iterdir()) == ["major.npy", "models.npy", "squares.npy", "support.npy"]
    reps = grid.unique_models()[0]
    expected = convolve_cube(cube.reshape((grid.size, 16, 16))[reps], remove_pixel_response(psf))
    np.testing.assert_array_equal(mm.stamp(int(reps[3])), expected[3])

    def refuse():
        raise AssertionError("the cube was read although the cache holds the models")
    second = NodeModels(None, refuse, describe=lambda: (grid, "cube-key"), cache_dir=tmp_path)
    loaded = second.for_psf(psf)
    for name in ("models", "models_sq", "models_major"):
        array = getattr(loaded, name)
        np.testing.assert_array_equal(array, getattr(mm, name))
        assert type(array) is np.ndarray and not array.flags.writeable and not array.flags.owndata
    np.testing.assert_array_equal(loaded.models_major, mm.models.T)
    np.testing.assert_array_equal(loaded.support, mm.support)
    assert second.n_convolved == 0 and second.convolved is None          # nothing allocated

    other = NodeModels(None, lambda: (cube, grid, "cube-key"), describe=lambda: (grid, "other-cube"),
                       cache_dir=tmp_path)
    other.for_psf(psf)                          # another cube identity: its own entry
    assert other.n_convolved == 1 and len(list(tmp_path.glob("models-*"))) == 2

    (entry / "squares.npy").write_bytes(b"garbage")
    third = NodeModels(None, lambda: (cube, grid, "cube-key"), describe=lambda: (grid, "cube-key"),
                       cache_dir=tmp_path)
    with caplog.at_level(logging.WARNING):
        np.testing.assert_array_equal(third.for_psf(psf).models_sq, mm.models_sq)
    assert third.n_convolved == 1 and "ignoring convolved-model cache entry" in caplog.text
    np.testing.assert_array_equal(np.load(entry / "squares.npy"), mm.models_sq)      # written again
    assert not list(tmp_path.glob(".*"))                                  # no temporary left


def test_a_cache_entry_without_the_model_major_copy_is_used_without_it(tmp_path):
    """A writer that kept no model-major copy (a node with less memory) leaves none in the entry;
    the reader then works without it."""
    grid = small_grid()
    cube = random_cube(grid, 2)
    psf = np.ones((3, 3), np.float32) / 9
    first = NodeModels(None, lambda: (cube, grid, "k"), describe=lambda: (grid, "k"), cache_dir=tmp_path)
    first.keep_major = False
    mm = first.for_psf(psf)
    assert mm.models_major is None and not list(tmp_path.glob("models-*/major.npy"))
    second = NodeModels(None, None, describe=lambda: (grid, "k"), cache_dir=tmp_path)
    loaded = second.for_psf(psf)
    assert loaded.models_major is None and second.n_convolved == 0
    np.testing.assert_array_equal(loaded.models, mm.models)
    # the same numbers as the holder that keeps the copy (filled through it), and as the stamps
    # convolved one by one and laid out in radial order
    with_major = NodeModels(None, lambda: (cube, grid, "k"), describe=lambda: (grid, "k")).for_psf(psf)
    for name in ("models", "models_sq"):
        np.testing.assert_array_equal(getattr(with_major, name), getattr(mm, name))
    np.testing.assert_array_equal(with_major.models_major, mm.models.T)
    stamps = cube.reshape((grid.size, 16, 16))[grid.unique_models()[0]]
    np.testing.assert_array_equal(mm.models, to_pixel_major(convolve_cube(stamps, remove_pixel_response(psf)),
                                                            radial_order(16)))
    np.testing.assert_array_equal(mm.models_sq, mm.models * mm.models)


@pytest.mark.parametrize("rows", [1, 7, 128, 5000])
def test_model_support_is_the_prefix_that_holds_all_but_the_tail(rows):
    """Against the definition (float64 cumulative sum of each column, the rows before it reaches
    (1 - tail) of the total, plus one), for decaying columns, one whose weight is all in its last
    row, one all zero, and block sizes that do and do not divide the rows."""
    rng = np.random.default_rng(5)
    p, k, tail = 3000, 40, 1e-7
    decay = np.exp(-np.arange(p)[:, None] / rng.uniform(5, 400, k)[None, :])
    sq = (decay * rng.uniform(0.5, 1.5, (p, k))).astype(np.float32)
    sq[:, 0] = 0.0
    sq[:, 1] = 0.0
    sq[-1, 1] = 2.0
    cum = np.cumsum(sq.astype(np.float64), axis=0)
    expected = np.minimum((cum < (1 - tail) * cum[-1]).sum(axis=0) + 1, p)
    np.testing.assert_array_equal(model_support(np, sq, tail, rows=rows), expected)
    assert expected[1] == p and expected[0] == 1 and 1 < expected[2:].min() < p



def test_unique_models_are_ordered_by_their_reach():
    """The unique models run from the most compact to the most extended (`support_radius`), each
    still the first cell of its class, and the radius is where the tail of I^2 is SUPPORT_TAIL."""
    from dre_hpc.models.generate import preset_grid
    from dre_hpc.models.grid import SUPPORT_TAIL, support_radius
    grid = preset_grid("sersic")
    reps, inverse = grid.unique_models()
    par = grid.parameters(reps)
    reach = support_radius(par["INDEX"], par["LOGR"])
    assert np.all(np.diff(np.round(reach, 6)) >= 0)
    first = np.full(reps.size, grid.size)
    np.minimum.at(first, inverse, np.arange(grid.size))
    assert np.array_equal(first, reps)
    from scipy.integrate import quad
    from scipy.special import gammaincinv
    for n in (0.5, 1.0, 4.0):
        def squared(r):                                 # r I(r)^2 of a profile with r_e = 1
            return r * np.exp(-2 * gammaincinv(2 * n, 0.5) * r ** (1 / n))
        edge = support_radius(n, 0.0)
        tail = quad(squared, edge, np.inf, limit=200)[0] / quad(squared, 0, np.inf, limit=200)[0]
        assert abs(tail / SUPPORT_TAIL - 1) < 1e-3, (n, tail)
