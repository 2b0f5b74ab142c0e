"""Model presets ('bulge', 'sersic'), their cache, and rendering with several processes.

The real 'sersic' cube is 2 GB: here ``ModelGrid.default`` is patched to a tiny grid, from which the
'sersic' preset takes its q, angle and radius axes (its index axis stays n = 0.5..6 step 0.5).
"""

import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from dre_hpc.errors import InputError
from dre_hpc.models import generate, sersic
from dre_hpc.models.cube_io import read_cube, write_cube
from dre_hpc.models.grid import Axis, ModelGrid
from dre_hpc.models.sersic import RENDERER_VERSION

BOX = 16


def tiny_default():
    return ModelGrid(Axis("INDEX", 4.0, 0.0, 1), Axis("AX_RATIO", 0.5, 0.5, 2),
                     Axis("ANGLE", 0.0, 60.0, 3), Axis("LOGR", 0.0, 0.4, 2), boxsize=BOX,
                     has_index_axis=False)


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    """A tiny default grid, an empty cache in tmp_path, and a count of the cubes rendered."""
    grid = tiny_default()
    monkeypatch.setattr(ModelGrid, "default", classmethod(lambda cls: grid))
    monkeypatch.setenv("DRE_HPC_CACHE", str(tmp_path / "cache"))
    calls = []
    real_make_cube = generate.make_cube

    def counting_make_cube(g, **kwargs):
        calls.append(g)
        return real_make_cube(g, **kwargs)

    monkeypatch.setattr(generate, "make_cube", counting_make_cube)
    return grid, calls


def test_the_real_presets_have_the_documented_axes():
    bulge, sersic_ = generate.preset_grid("bulge"), generate.preset_grid("sersic")
    assert bulge == ModelGrid.default() and not bulge.has_index_axis
    assert bulge.shape == (1, 10, 12, 21) and bulge.index.values.tolist() == [4.0]
    assert sersic_.has_index_axis and sersic_.shape == (12, 10, 12, 21) and sersic_.boxsize == 128
    np.testing.assert_allclose(sersic_.index.values, np.arange(1, 13) * 0.5)
    assert 4.0 in sersic_.index.values and 1.0 in sersic_.index.values
    assert sersic_.axes[1:] == bulge.axes[1:]
    with pytest.raises(InputError, match="'bulge' and 'sersic'"):
        generate.preset_grid("disc")


def test_presets_resolve_to_cached_cubes_with_the_right_axes(tiny, tmp_path):
    grid, calls = tiny
    default = generate.resolve_model(None)
    assert default == generate.default_cube_path() == generate.resolve_model("bulge")
    assert generate.resolve_model("") == default
    assert default.parent == tmp_path / "cache" and f"_r{RENDERER_VERSION}_" in default.name
    cube, got = read_cube(default)
    assert got == grid and not got.has_index_axis and cube.shape == (1, 2, 3, 2, BOX, BOX)

    path = generate.resolve_model("sersic")
    assert path.parent == tmp_path / "cache" and path != default
    assert path.name.startswith(f"dre_sersic_cube_r{RENDERER_VERSION}_")
    cube, got = read_cube(path)
    assert got.has_index_axis and got.shape == (12, 2, 3, 2)
    np.testing.assert_allclose(got.index.values, np.arange(1, 13) * 0.5)
    assert got.axes[1:] == grid.axes[1:] and got.boxsize == BOX
    assert fits.getheader(path)["RENDERV"] == RENDERER_VERSION
    # the n = 4 plane is the default cube's
    np.testing.assert_array_equal(cube[7], read_cube(default)[0][0])
    assert [g.shape for g in calls] == [(1, 2, 3, 2), (12, 2, 3, 2)]


def test_cached_cube_is_reused_not_rendered_again(tiny):
    _, calls = tiny
    path = generate.resolve_model("sersic")
    stamp = path.stat().st_mtime_ns
    time.sleep(0.01)
    assert generate.resolve_model("sersic") == path
    assert generate.ensure_preset("sersic") == path
    assert len(calls) == 1 and path.stat().st_mtime_ns == stamp
    # a different grid is a different file, rendered once
    other = generate.ensure_cube(ModelGrid.default(), "sersic")
    assert other != path and len(calls) == 2
    assert generate.ensure_cube(ModelGrid.default(), "sersic") == other and len(calls) == 2


def test_concurrent_first_uses_render_once(tiny, monkeypatch):
    _, calls = tiny
    counting = generate.make_cube

    def slow_make_cube(g, **kwargs):
        time.sleep(0.5)  # both threads are past the first is_file() check by now
        return counting(g, **kwargs)

    monkeypatch.setattr(generate, "make_cube", slow_make_cube)
    results, errors = [], []

    def use():
        try:
            results.append(generate.resolve_model("bulge"))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=use) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and len(results) == 2 and results[0] == results[1]
    assert len(calls) == 1
    assert not [p for p in results[0].parent.iterdir() if p.name.startswith(".tmp-")]


@pytest.mark.parametrize("name", ["no_such_cube.fits", "Sersic", "buldge"])
def test_a_bad_name_is_an_input_error_naming_it(tiny, tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError) as err:
        generate.resolve_model(name)
    message = str(err.value)
    assert repr(name) in message and "not found" in message
    assert "presets are 'bulge' and 'sersic'" in message
    assert not tiny[1]  # nothing rendered
    (tmp_path / "a_directory").mkdir()
    with pytest.raises(InputError, match="'a_directory' is not a file"):
        generate.resolve_model("a_directory")


def test_a_path_is_returned_as_is(tmp_path, monkeypatch):
    grid = tiny_default()
    cube = np.zeros(grid.shape + (BOX, BOX), dtype=np.float32)
    path = write_cube(tmp_path / "mine.fits", cube, grid)
    assert generate.resolve_model(str(path)) == path
    assert generate.resolve_model(path) == path
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sersic").write_bytes(path.read_bytes())
    assert generate.resolve_model("./sersic") == Path("sersic")  # a file, not the preset


class CountingPool(sersic.ProcessPoolExecutor):
    started = []

    def __init__(self, max_workers=None, **kwargs):
        CountingPool.started.append(max_workers)
        super().__init__(max_workers=max_workers, **kwargs)


def test_one_and_two_workers_give_identical_bytes(tmp_path, monkeypatch):
    # 3 Sersic indices x (2 q x 4 angles x 2 radii): several work units, mirrored angles included
    grid = ModelGrid(Axis("INDEX", 0.5, 1.75, 3), Axis("AX_RATIO", 0.3, 0.7, 2),
                     Axis("ANGLE", 15.0, 45.0, 4), Axis("LOGR", -0.3, 0.6, 2), boxsize=24)
    reps, _ = grid.unique_models()
    par = grid.parameters(reps)
    units, _ = sersic._work_units(par["INDEX"], par["AX_RATIO"], par["ANGLE"], 10.0 ** par["LOGR"],
                                  grid.boxsize, "<f4")
    assert len(units) >= 3
    monkeypatch.setattr(sersic, "ProcessPoolExecutor", CountingPool)
    CountingPool.started.clear()
    files = []
    for workers in (1, 2):
        cube, _ = generate.make_cube(grid, workers=workers)
        files.append(write_cube(tmp_path / f"w{workers}.fits", cube, grid,
                                extra_cards=generate.generator_cards()))
    assert CountingPool.started == [2]  # one pool, for the two-worker cube only
    assert files[0].read_bytes() == files[1].read_bytes()
    # and the stamps are those of the one-stamp renderer
    cube = read_cube(files[1])[0]
    for flat in (0, 13, 40, grid.size - 1):
        idx = np.unravel_index(flat, grid.shape)
        p = grid.parameters(flat)
        np.testing.assert_array_equal(
            cube[idx], sersic.render_sersic(p["INDEX"], p["AX_RATIO"], p["ANGLE"], 10 ** p["LOGR"],
                                            boxsize=grid.boxsize))


def test_render_models_workers_and_default_workers(monkeypatch):
    n = [1.0, 1.0, 2.5, 2.5, 4.0]
    args = (n, [0.4, 0.4, 0.8, 0.2, 1.0], [20.0, 160.0, 95.0, 0.0, 33.0], [1.5, 1.5, 3.0, 0.7, 2.0])
    one = sersic.render_models(*args, boxsize=20, workers=1)
    two = sersic.render_models(*args, boxsize=20, workers=2)
    assert one.tobytes() == two.tobytes()
    np.testing.assert_array_equal(one[1][:, 1:], one[0][:, :0:-1])  # 160 deg: 20 deg mirrored
    with pytest.raises(ValueError, match="workers"):
        sersic.render_models(*args, boxsize=20, workers=0)
    assert 1 <= sersic.default_workers() <= sersic.MAX_DEFAULT_WORKERS
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert sersic.default_workers() == sersic.MAX_DEFAULT_WORKERS
