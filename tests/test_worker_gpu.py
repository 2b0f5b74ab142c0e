"""The fit job's GPU path (``fit.backend: gpu``), with and without a GPU.

CI and this machine have no GPU. Most tests here run the worker's GPU code path on stand-ins:

* ``guarded_device`` (tests/test_device_namespace.py) stands in for CuPy as the array namespace:
  NumPy arithmetic behind `DeviceArray` proxies that refuse every implicit host/device conversion,
  as CuPy does. `run_fit` of the tiny tile with ``fit.backend=gpu`` and ``get_backend`` returning it
  must give the CPU run's results (MODEL_IDX and FLAGS equal, CHI2 and FLUX to 1e-6 relative):
  the models go to the "device" once per PSF, cutouts are streamed unit by unit and only host
  arrays reach the output writers.
* a fake ``cupy`` module (``cuda.runtime.getDeviceCount``, ``cuda.Device(n).use()`` recording
  ``n``) checks which device `get_backend` selects (``local_rank % device_count``) and that
  `NodeModels` asks for the device of its node-local rank.
* a fake ``cuda.runtime.memGetInfo`` checks `device_batch_limit` (shared among the ranks on one
  GPU) and that a unit larger than the room is refused with the ``fit.batch_size`` to use, while a
  unit that just fits gives the CPU results.

What the stand-ins cannot check: real CUDA kernels and their numerics (cuBLAS, TF32, reduction
order), whether the memory model of `device_batch_limit` (bytes per object) matches what CuPy
really allocates, out-of-memory behaviour, device selection by the real driver, and speed.
`test_real_gpu_matches_cpu` (marker ``gpu``) checks the numerics where CuPy and a CUDA device
exist and is skipped elsewhere, like tests/test_gpu.py.
"""

from __future__ import annotations

import shutil
import sys
import types

import h5py
import numpy as np
import pytest
from helpers import gpu_or_skip
from astropy.table import Table
from batch_helpers import make_run

from dre_hpc.batch import fit_job
from dre_hpc.batch.chunk_fit import (DeviceMemoryError, NodeModels, check_device_room,
                                     device_batch_limit, ranks_per_device)
from dre_hpc.batch.comm import SerialComm
from dre_hpc.batch.config import load_config
from dre_hpc.batch.worker import run_stage
from dre_hpc.errors import BackendError
from dre_hpc.fit import backend as backend_module
from dre_hpc.fit import model_matrix
from dre_hpc.fit.backend import get_backend

from test_device_namespace import EVENTS, DeviceArray, guarded, make_guarded_namespace
from scratch import scratch_dir

HAVE_TOOLS = shutil.which("psfex") is not None and (shutil.which("source-extractor") or shutil.which("sex"))
needs_tools = pytest.mark.skipif(not HAVE_TOOLS, reason="SExtractor/PSFEx not installed "
                                 "(bin/install-system-packages)")

BASE = ["prep.margin=40", "fit.batch_size=4", "chunking.chunks_per_tile=1"]


# -- the tiny tile, prepared once --------------------------------------------------------------------

@pytest.fixture(scope="module")
def prepared(request, tmp_path_factory, default_cube_file):
    """The tiny tile of tests/test_worker.py (14 objects, 4 units of batch size 4), prepared once:
    ``(rundir, tile, prep done marker)``."""
    if not HAVE_TOOLS:
        pytest.skip("SExtractor/PSFEx not installed (bin/install-system-packages)")
    from dre_hpc.sim.tile import TileSpec, simulate_tile
    root = scratch_dir(request, tmp_path_factory, "worker_gpu")
    spec = TileSpec(size=512, n_galaxies=15, n_stars=30, seed=3)
    image = simulate_tile(spec, root / "Tiles" / "tiny.fits", root / "truth.fits")[0]
    run = make_run(root, [image], BASE)
    assert run_stage("prep", run.root, tile=0) == 0
    kind, prep = run.read_marker("prep", "tiny")
    assert kind == "done" and prep["n_objects"] == 14
    return run, run.tiles()[0], prep


@pytest.fixture
def fresh_models(monkeypatch):
    """No NodeModels left over from another test (the cache key has the backend name, not the
    namespace a test patched in)."""
    monkeypatch.setattr(fit_job, "_MODELS", {})


def _fit(prepared, overrides=()):
    """`run_fit` of the whole tile as one chunk in one process: the done content, the table and
    the chi surfaces (read into memory: the next fit overwrites the files)."""
    run, tile, prep = prepared
    config = load_config(run.config, list(overrides))
    done = fit_job.run_fit(run, config, tile, 0, prep)
    paths = run.chunk_outputs(tile.name, 0)
    table = Table.read(paths["dre"])
    with h5py.File(paths["chi"]) as h5:
        surfaces = {key: h5[key][()] for key in h5}
    return done, table, surfaces


@pytest.fixture(scope="module")
def cpu_result(prepared):
    """The reference: the same chunk on the CPU backend."""
    return _fit(prepared)


def _assert_close(table, reference, rtol=1e-6, flux_rtol=None):
    assert len(table) == len(reference) == 14 and table.colnames == reference.colnames
    np.testing.assert_array_equal(table["ROW"], reference["ROW"])
    np.testing.assert_array_equal(table["MODEL_IDX"], reference["MODEL_IDX"])
    np.testing.assert_array_equal(table["FLAGS"], reference["FLAGS"])
    np.testing.assert_allclose(table["CHI2"], reference["CHI2"], rtol=rtol)
    np.testing.assert_allclose(table["FLUX"], reference["FLUX"], rtol=flux_rtol or rtol)
    assert np.isfinite(np.asarray(reference["CHI2"], float)).sum() >= 10      # real fits, not NaN


def _stand_in_backend(monkeypatch, namespace):
    """``get_backend`` returning `namespace` for 'gpu' (NumPy for 'cpu'); the calls are recorded."""
    calls = []

    def fake(name="cpu", device=None):
        calls.append((name, device))
        return namespace if name == "gpu" else np
    monkeypatch.setattr(model_matrix, "get_backend", fake)
    monkeypatch.setattr(backend_module, "get_backend", fake)
    return calls


@needs_tools
def test_run_fit_with_the_gpu_backend_on_the_guarded_namespace_equals_cpu(prepared, cpu_result,
                                                                          fresh_models, monkeypatch):
    calls = _stand_in_backend(monkeypatch, guarded)
    before = EVENTS["calls"]
    done, table, surfaces = _fit(prepared, ["fit.backend=gpu"])
    assert calls == [("gpu", 0)]                     # one namespace per process, device 0 of rank 0
    (models,) = fit_job._MODELS.values()
    assert models.xp is guarded and isinstance(models.matrix.models, DeviceArray)
    assert EVENTS["calls"] > before                  # the "device" did the fitting
    assert done["fitted_objects"] == done["rows"] == 14 and done["resumed_objects"] == 0
    cpu_done, reference, cpu_surfaces = cpu_result
    _assert_close(table, reference)
    assert list(surfaces) == list(cpu_surfaces)
    for key, surface in surfaces.items():
        np.testing.assert_allclose(surface, cpu_surfaces[key], rtol=1e-6, atol=1e-6, err_msg=key)


def _device_with_room_for(n_objects: int, xp=None):
    """The guarded namespace with a fake ``memGetInfo`` leaving room for `n_objects` per pass
    (default cube: 16384 pixels, 2289 unique models) and one device."""
    xp = xp or make_guarded_namespace()
    per_object = 40 * 16384 + 48 * 2289
    xp.cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(
        memGetInfo=lambda: (2 * n_objects * per_object, 16 * 2 ** 30), getDeviceCount=lambda: 1))
    return xp


@needs_tools
def test_run_fit_refuses_units_larger_than_the_device_room(prepared, fresh_models, monkeypatch):
    """Room for 3 objects, units of 4 (fit.batch_size 4): a clear error naming the key, before any
    fit; units are never split in passes (their numbers would then depend on the free memory)."""
    _stand_in_backend(monkeypatch, _device_with_room_for(3))
    with pytest.raises(DeviceMemoryError, match=r"fit.batch_size 4\) does not fit .* \(room for 3 "
                                                r"objects\): set fit.batch_size to 3 or less"):
        _fit(prepared, ["fit.backend=gpu"])


@needs_tools
def test_run_fit_with_exactly_enough_device_room(prepared, cpu_result, fresh_models, monkeypatch):
    _stand_in_backend(monkeypatch, _device_with_room_for(4))
    done, table, _ = _fit(prepared, ["fit.backend=gpu"])
    assert done["fitted_objects"] == 14
    _assert_close(table, cpu_result[1])


# -- which device ------------------------------------------------------------------------------------

@pytest.fixture
def fake_cupy(monkeypatch):
    """A ``cupy`` module with `count` devices whose ``Device(n).use()`` is recorded."""
    cupy = types.ModuleType("cupy")
    cupy.used, cupy.count = [], 2

    class Device:
        def __init__(self, n):
            self.n = n

        def use(self):
            cupy.used.append(self.n)

    def count():
        if isinstance(cupy.count, Exception):
            raise cupy.count
        return cupy.count
    cupy.cuda = types.SimpleNamespace(Device=Device, runtime=types.SimpleNamespace(getDeviceCount=count))
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    return cupy


def test_get_backend_uses_local_rank_modulo_device_count(fake_cupy):
    for local_rank, expected in ((0, 0), (1, 1), (2, 0), (3, 1), (None, 0)):
        assert get_backend("gpu", device=local_rank) is fake_cupy
        assert fake_cupy.used[-1] == expected, local_rank
    fake_cupy.count = 3
    assert get_backend("gpu", device=7) is fake_cupy and fake_cupy.used[-1] == 1
    assert get_backend("cpu", device=5) is np and len(fake_cupy.used) == 6     # cpu selects nothing


def test_get_backend_without_a_device_is_a_clear_error(fake_cupy):
    fake_cupy.count = 0
    with pytest.raises(BackendError, match="no CUDA device"):
        get_backend("gpu", device=1)
    fake_cupy.count = RuntimeError("cudaErrorNoDevice")
    with pytest.raises(BackendError, match="cudaErrorNoDevice"):
        get_backend("gpu")
    assert fake_cupy.used == []


@pytest.fixture(scope="module")
def cube_loader(default_cube_file):
    from dre_hpc.cli.dre import load_cube
    loaded = load_cube(None)
    return lambda: loaded


@pytest.mark.parametrize("local_rank,device", [(0, 0), (1, 1), (3, 1)])
def test_node_models_ask_for_the_device_of_the_local_rank(fake_cupy, cube_loader, local_rank, device):
    """The whole choice: node-local rank -> NodeModels -> get_backend -> cupy.cuda.Device(n).use()."""
    models = NodeModels(SerialComm(local_rank=local_rank), cube_loader, backend="gpu", workers=1)
    assert models.xp is fake_cupy and fake_cupy.used == [device]
    cpu = NodeModels(SerialComm(local_rank=local_rank), cube_loader, backend="cpu", workers=1)
    assert cpu.xp is np and fake_cupy.used == [device]


def test_node_models_pass_the_local_rank_to_get_backend(monkeypatch, cube_loader):
    calls = _stand_in_backend(monkeypatch, guarded)
    NodeModels(SerialComm(local_rank=5), cube_loader, backend="gpu", workers=1)
    assert calls == [("gpu", 5)]


# -- passes sized to the device memory ------------------------------------------------------------------

def _fake_xp(free):
    return types.SimpleNamespace(cuda=types.SimpleNamespace(runtime=types.SimpleNamespace(
        memGetInfo=lambda: (free, 80 * 2 ** 30))))


def test_device_batch_limit():
    assert device_batch_limit(np, 16384, 2289) is None                  # host: no limit
    assert device_batch_limit(guarded, 16384, 2289) is None             # a namespace without cuda
    per_object = 40 * 16384 + 48 * 2289
    assert device_batch_limit(_fake_xp(2 * 100 * per_object), 16384, 2289) == 100     # half of free
    assert device_batch_limit(_fake_xp(2 * 100 * per_object - 1), 16384, 2289) == 99
    assert device_batch_limit(_fake_xp(100 * per_object), 16384, 2289, fraction=1.0) == 100
    assert device_batch_limit(_fake_xp(10), 16384, 2289) == 1           # always at least one object
    assert device_batch_limit(_fake_xp(40 * 2 ** 30), 16384, 2289) == 28063     # 40 GiB free


def test_device_room_is_shared_by_the_ranks_on_one_gpu():
    xp = _device_with_room_for(100)
    assert ranks_per_device(np, 4) == 4                       # the host: no devices to share
    assert ranks_per_device(xp, 1) == 1 and ranks_per_device(xp, 3) == 3
    xp.cuda.runtime.getDeviceCount = lambda: 2
    assert ranks_per_device(xp, 3) == 2 and ranks_per_device(xp, 4) == 2
    assert device_batch_limit(xp, 16384, 2289, sharing=2) == 50
    check_device_room(50, [types.SimpleNamespace(size=50)], 50)
    with pytest.raises(DeviceMemoryError, match="set fit.batch_size to 49 or less"):
        check_device_room(49, [types.SimpleNamespace(size=3), types.SimpleNamespace(size=50)], 50)
    check_device_room(None, [types.SimpleNamespace(size=10 ** 6)], 10 ** 6)     # the host


# -- a real GPU --------------------------------------------------------------------------------------------


@pytest.mark.gpu
@needs_tools
def test_real_gpu_matches_cpu(prepared, cpu_result, fresh_models):
    """`run_fit` with ``fit.backend=gpu`` on CuPy: the best model of >= 95 % of the objects as on
    the CPU, their fluxes within 1e-4 (float32 sums in another order, cuBLAS)."""
    cupy = gpu_or_skip()
    done, table, _ = _fit(prepared, ["fit.backend=gpu"])
    (models,) = fit_job._MODELS.values()
    assert models.xp is cupy and isinstance(models.matrix.models, cupy.ndarray)
    reference = cpu_result[1]
    assert done["fitted_objects"] == len(table) == len(reference) == 14
    np.testing.assert_array_equal(table["FLAGS"], reference["FLAGS"])
    same = np.asarray(table["MODEL_IDX"]) == np.asarray(reference["MODEL_IDX"])
    assert same.mean() >= 0.95, same
    np.testing.assert_allclose(np.asarray(table["FLUX"])[same], np.asarray(reference["FLUX"])[same],
                               rtol=1e-4)
