"""The fit's device code path on a guarded stand-in for CuPy: no implicit host/device traffic.

There is no GPU here (nor in CI), so `test_gpu.py` is skipped and the CuPy path of ``dre_hpc.fit``
would otherwise never run. This module runs ``fit_cutouts`` through ``guarded_device``, a module-like
namespace that computes with NumPy but hands out `DeviceArray` proxies which behave like
``cupy.ndarray`` where CuPy differs from NumPy in ways that break code:

* no implicit conversion to NumPy: ``__array__`` and ``__array_function__`` raise TypeError
  (``np.asarray(dev)``, ``np.sum(dev)``, ``np.where(..., dev, ...)`` fail), ``__array_ufunc__`` is
  None (``np.exp(dev)`` fails); only ``.get()`` / ``asnumpy`` / ``backend.to_host`` copy to the host;
* no mixing: a NumPy ndarray with ndim >= 1 as an operand of an arithmetic or comparison operator,
  as an argument of a namespace function (other than ``asarray``/``array``, the host -> device copy)
  or as the value of an item assignment raises TypeError; Python and NumPy scalars are fine. Host
  integer/boolean arrays *as indices* are accepted, as CuPy accepts them (it copies them over);
* reductions give 0-d device arrays, not scalars; ``float``/``int``/``bool`` of a size-1 array work
  (a synchronisation on a GPU), as in CuPy;
* ``asarray`` of a host array copies (device memory never aliases host memory);
* the namespace has no ``errstate`` (CuPy has none; no floating-point warnings are emitted) and only
  functions CuPy provides; ``__name__`` is not ``"numpy"``, so the code paths chosen by
  ``xp.__name__ != "numpy"`` (GPU block sizes, ``take`` without ``mode``) are the ones exercised.

The results must equal the NumPy run: same MODEL_IDX and FLAGS, CHI2 and FLUX to 1e-6.

What this cannot check: real CUDA kernels and their numerics (cuBLAS, TF32 or reduced-precision
matrix products, reduction order), device memory limits, streams and synchronisation costs, and
CuPy functions whose behaviour differs from NumPy's in value rather than in type.
"""

from __future__ import annotations

import operator
import types

import numpy as np
import pytest

from dre_hpc.fit import dre_kernel
from dre_hpc.fit.backend import to_host
from dre_hpc.fit.engine import FitOptions, ModelMatrix, fit_cutouts
from dre_hpc.flags import FitFlag

#: Namespace calls made (checked to grow during a fit: the fit really ran on the stand-in).
EVENTS = {"calls": 0}


def _refuse(what):
    raise TypeError(f"guarded_device: {what} (CuPy does not convert device arrays implicitly)")


class _MemoryPointer:
    """Like cupy.cuda.MemoryPointer: only ``ptr``."""

    def __init__(self, ptr):
        self.ptr = ptr


def _wrap(result):
    """NumPy results back to 'device': arrays and NumPy scalars become DeviceArray (0-d for scalars)."""
    if isinstance(result, np.ndarray):
        return DeviceArray(result)
    if isinstance(result, np.generic):
        return DeviceArray(np.asarray(result))
    if isinstance(result, (tuple, list)):
        return type(result)(_wrap(r) for r in result)
    return result


def _operand(value, what):
    """The NumPy value behind an operand; host arrays (ndim >= 1) and unknown objects are refused."""
    if isinstance(value, DeviceArray):
        return value._a
    if isinstance(value, np.ndarray):
        if value.ndim >= 1:
            _refuse(f"a host numpy.ndarray {value.shape} mixed with a device array in {what}")
        return value
    if isinstance(value, (bool, int, float, complex, np.generic)) or value is None:
        return value
    _refuse(f"unsupported operand type {type(value).__name__} in {what}")


def _arguments(value, what, host_ok=False):
    """Unwrap function arguments (recursively through lists and tuples)."""
    if isinstance(value, DeviceArray):
        return value._a
    if isinstance(value, np.ndarray):
        if value.ndim >= 1 and not host_ok:
            _refuse(f"a host numpy.ndarray {value.shape} passed to {what}")
        return value
    if isinstance(value, (list, tuple)):
        return type(value)(_arguments(v, what, host_ok) for v in value)
    return value


def _index(key):
    """Indices: device arrays unwrapped; host arrays and lists accepted (CuPy copies them over)."""
    if isinstance(key, tuple):
        return tuple(_index(k) for k in key)
    if isinstance(key, DeviceArray):
        return key._a
    if isinstance(key, (np.ndarray, list)):
        return np.asarray(key)
    return key


class DeviceArray:
    """A NumPy array posing as a cupy.ndarray: explicit transfers only (see the module docstring)."""

    __array_ufunc__ = None             # NumPy ufuncs and binary operators defer to us, and we refuse
    base = None                        # as a fresh CuPy allocation

    def __init__(self, array):
        assert isinstance(array, np.ndarray)
        self._a = array

    def __array__(self, *args, **kwargs):
        _refuse("implicit conversion to a NumPy array is not allowed; use .get()")

    def __array_function__(self, func, _types, args, kwargs):
        _refuse(f"numpy.{func.__name__} called on a device array")

    def get(self):
        """The host copy (cupy.ndarray.get)."""
        return self._a.copy()

    shape = property(lambda self: self._a.shape)
    ndim = property(lambda self: self._a.ndim)
    dtype = property(lambda self: self._a.dtype)
    size = property(lambda self: self._a.size)
    nbytes = property(lambda self: self._a.nbytes)
    strides = property(lambda self: self._a.strides)
    T = property(lambda self: DeviceArray(self._a.T))
    data = property(lambda self: _MemoryPointer(self._a.__array_interface__["data"][0]))

    def __len__(self):
        return len(self._a)

    def __iter__(self):
        return (_wrap(row) for row in self._a)

    def __repr__(self):
        return f"DeviceArray({self._a!r})"

    def __bool__(self):
        return bool(self._a)

    def __float__(self):
        return float(self._a)

    def __int__(self):
        return int(self._a)

    def __getitem__(self, key):
        return _wrap(self._a[_index(key)])

    def __setitem__(self, key, value):
        self._a[_index(key)] = _operand(value, "item assignment")


_METHODS = ("astype", "reshape", "sum", "any", "all", "min", "max", "argmin", "argmax", "mean", "std",
            "var", "prod", "cumsum", "copy", "ravel", "flatten", "transpose", "squeeze", "take", "fill",
            "item", "nonzero", "clip", "round", "dot", "view", "swapaxes", "repeat", "sort", "argsort")


def _method(name):
    def method(self, *args, **kwargs):
        args, kwargs = _arguments(args, f".{name}()"), {k: _arguments(v, f".{name}()") for k, v in kwargs.items()}
        with np.errstate(all="ignore"):
            return _wrap(getattr(self._a, name)(*args, **kwargs))
    method.__name__ = name
    return method


def _binary(op, name, reflected=False):
    def binary(self, other):
        other = _operand(other, f"operator {name}")
        with np.errstate(all="ignore"):
            return _wrap(op(other, self._a) if reflected else op(self._a, other))
    binary.__name__ = name
    return binary


def _inplace(op, name):
    def inplace(self, other):
        other = _operand(other, f"operator {name}")
        with np.errstate(all="ignore"):
            self._a = op(self._a, other)       # NumPy's in-place operator: same buffer
        return self
    inplace.__name__ = name
    return inplace


def _unary(op, name):
    def unary(self):
        with np.errstate(all="ignore"):
            return _wrap(op(self._a))
    unary.__name__ = name
    return unary


for _name in _METHODS:
    setattr(DeviceArray, _name, _method(_name))
for _op, _name in ((operator.add, "add"), (operator.sub, "sub"), (operator.mul, "mul"),
                   (operator.truediv, "truediv"), (operator.floordiv, "floordiv"), (operator.mod, "mod"),
                   (operator.pow, "pow"), (operator.matmul, "matmul"), (operator.and_, "and"),
                   (operator.or_, "or"), (operator.xor, "xor")):
    setattr(DeviceArray, f"__{_name}__", _binary(_op, f"__{_name}__"))
    setattr(DeviceArray, f"__r{_name}__", _binary(_op, f"__r{_name}__", reflected=True))
for _op, _name in ((operator.iadd, "iadd"), (operator.isub, "isub"), (operator.imul, "imul"),
                   (operator.itruediv, "itruediv"), (operator.ipow, "ipow"), (operator.iand, "iand"),
                   (operator.ior, "ior")):
    setattr(DeviceArray, f"__{_name}__", _inplace(_op, f"__{_name}__"))
for _op, _name in ((operator.lt, "lt"), (operator.le, "le"), (operator.gt, "gt"), (operator.ge, "ge"),
                   (operator.eq, "eq"), (operator.ne, "ne")):
    setattr(DeviceArray, f"__{_name}__", _binary(_op, f"__{_name}__"))
for _op, _name in ((operator.neg, "neg"), (operator.pos, "pos"), (operator.abs, "abs"),
                   (operator.invert, "invert")):
    setattr(DeviceArray, f"__{_name}__", _unary(_op, f"__{_name}__"))
DeviceArray.__hash__ = None            # unhashable, like NumPy and CuPy arrays

#: NumPy functions that CuPy provides under the same name (the stand-in offers no others).
_FUNCTIONS = (
    "abs", "absolute", "add", "all", "any", "arange", "argmax", "argmin", "argpartition", "argsort",
    "ascontiguousarray", "atleast_1d", "broadcast_to", "ceil", "clip", "concatenate", "copy", "cos",
    "count_nonzero", "cumsum", "deg2rad", "divide", "dot", "einsum", "empty", "empty_like", "exp",
    "expand_dims", "flatnonzero", "floor", "floor_divide", "full", "full_like", "hstack", "hypot",
    "isfinite", "isinf", "isnan", "linspace", "log", "log10", "logical_and", "logical_not", "logical_or",
    "matmul", "max", "maximum", "mean", "min", "minimum", "mod", "multiply", "nan_to_num", "nanmax",
    "nanmean", "nanmin", "negative", "nonzero", "ones", "ones_like", "pad", "power", "prod",
    "rad2deg", "ravel", "ravel_multi_index", "reshape", "rint", "round", "sign", "sin", "sinc", "sort",
    "sqrt", "square", "squeeze", "stack", "std", "subtract", "sum", "take", "take_along_axis", "tile",
    "transpose", "true_divide", "unique", "unravel_index", "var", "vstack", "where", "zeros",
    "zeros_like",
)
_CONSTANTS = ("float16", "float32", "float64", "complex64", "complex128", "int8", "int16", "int32",
              "int64", "uint8", "uint16", "uint32", "uint64", "intp", "bool_", "dtype", "integer",
              "floating", "issubdtype", "finfo", "iinfo", "result_type", "nan", "inf", "pi", "e", "newaxis")


def _function(name):
    func = getattr(np, name)

    def device_function(*args, **kwargs):
        EVENTS["calls"] += 1
        args = _arguments(args, f"{name}()")
        kwargs = {k: _arguments(v, f"{name}()") for k, v in kwargs.items()}
        with np.errstate(all="ignore"):
            return _wrap(func(*args, **kwargs))
    device_function.__name__ = name
    return device_function


def _asarray(a, dtype=None, order=None):
    """Host -> device copy; a device array of the right dtype is returned as is (cupy.asarray)."""
    EVENTS["calls"] += 1
    if isinstance(a, DeviceArray):
        return a if dtype is None or np.dtype(dtype) == a.dtype else a.astype(dtype)
    return DeviceArray(np.array(_arguments(a, "asarray()", host_ok=True), dtype=dtype, order=order or "K"))


def _array(a, dtype=None, copy=True, order="K"):
    EVENTS["calls"] += 1
    if isinstance(a, DeviceArray):
        return DeviceArray(np.array(a._a, dtype=dtype, copy=copy, order=order))
    return DeviceArray(np.array(_arguments(a, "array()", host_ok=True), dtype=dtype, order=order))


def _asnumpy(a):
    """Device -> host copy (cupy.asnumpy); host input passes through."""
    return a.get() if isinstance(a, DeviceArray) else np.asarray(a)


def make_guarded_namespace():
    """The ``guarded_device`` namespace (a module object, as CuPy is)."""
    xp = types.ModuleType("guarded_device", "NumPy posing as CuPy: explicit host/device transfers only.")
    for name in _FUNCTIONS:
        setattr(xp, name, _function(name))
    for name in _CONSTANTS:
        setattr(xp, name, getattr(np, name))
    xp.asarray, xp.array, xp.asnumpy, xp.ndarray = _asarray, _array, _asnumpy, DeviceArray
    return xp


guarded = make_guarded_namespace()


# --- the guard itself -----------------------------------------------------------------------------

def test_guard_refuses_implicit_conversion_and_mixing():
    dev = guarded.asarray(np.arange(6, dtype=np.float32).reshape(2, 3))
    host = np.ones((2, 3), dtype=np.float32)
    with pytest.raises(TypeError):
        np.asarray(dev)
    with pytest.raises(TypeError):
        np.sum(dev)                                  # numpy function on a device array
    with pytest.raises(TypeError):
        np.exp(dev)                                  # numpy ufunc on a device array
    with pytest.raises(TypeError):
        np.where(host > 0, dev, 0)
    for mix in (operator.add, operator.mul, operator.lt, operator.matmul):
        with pytest.raises(TypeError):
            mix(dev, host)
        with pytest.raises(TypeError):
            mix(host, dev if mix is not operator.matmul else dev.T)
    with pytest.raises(TypeError):
        dev += host
    with pytest.raises(TypeError):
        guarded.where(host > 0, dev, 0)              # host array into a device function
    with pytest.raises(TypeError):
        dev[0] = host[0]                             # host array as an assigned value
    with pytest.raises(AttributeError):
        guarded.errstate                             # noqa: B018 - CuPy has none
    assert guarded.__name__ != "numpy"


def test_guard_allows_what_cupy_allows():
    host = np.arange(6, dtype=np.float32).reshape(2, 3)
    dev = guarded.asarray(host)
    host[0, 0] = 99.0                                # asarray copied: the device keeps its values
    assert float(dev[0, 0]) == 0.0
    total = (dev * np.float32(2) + 1.0).sum()
    assert isinstance(total, DeviceArray) and total.ndim == 0      # 0-d device array, not a scalar
    assert float(total) == 2 * 15 + 6 and bool(total > 0) and int(dev[1, 2]) == 5
    dev[np.array([0])] = 7.0                         # host index array: CuPy copies it over
    back = to_host(dev)
    assert type(back) is np.ndarray and np.array_equal(back, [[7, 7, 7], [3, 4, 5]])
    assert np.array_equal(guarded.asnumpy(dev.T), back.T)
    part = guarded.zeros(3, dtype=guarded.float32)
    dev.sum(axis=0, out=part)                        # out= writes into the device buffer
    assert np.array_equal(part.get(), [10, 11, 12])


def test_device_paths_are_selected_by_namespace_name():
    assert dre_kernel._block_rows(guarded, 100, 100) == dre_kernel.GPU_BLOCK_ROWS
    assert dre_kernel._block_rows(np, 100, 100) != dre_kernel.GPU_BLOCK_ROWS


# --- the fit through the guard equals the NumPy fit ---------------------------------------------

@pytest.fixture(scope="module")
def matrices(default_models, sim_galaxies):
    _, _, psf = sim_galaxies
    cpu_mm = default_models.for_psf(psf)
    dev_mm = ModelMatrix(guarded, default_models.grid, cpu_mm.host, models_major=cpu_mm.models_major)
    return cpu_mm, dev_mm


@pytest.fixture(scope="module")
def cutouts(sim_galaxies):
    """20 simulated galaxies (more than one centring chunk), a few broken so that the flag and
    fill-value paths run too."""
    cuts, _, _ = sim_galaxies
    sub = cuts.subset(np.arange(20))                 # fancy index: a copy
    sub.mask[0] = False                              # EMPTY_MASK
    sub.data[1, 60:64, 60:64] = np.nan               # NONFINITE_INPUT inside the mask
    sub.rms[2, 62, 62] = 0.0                         # BAD_RMS
    sub.objects["DX"][3] = np.nan                    # NO_CENTRE
    return sub


#: The fit cases. ``rtol`` of CHI2 and FLUX: the wls path is the same arithmetic on both namespaces;
#: the dre kernel sums float32 terms in blocks of `GPU_BLOCK_ROWS` pixels off NumPy (about 28 on
#: NumPy, an L2-sized block), so its float32 rounding differs: measured 3.7e-6 on CHI2 (the scale
#: s_k = sum d / sum m_k is a float32 block sum and CHI2 is first-order in it) and 1.7e-6 on FLUX.
#: ``same-blocking`` sets GPU_BLOCK_ROWS to NumPy's block: then CHI2 and FLUX must agree to 1e-12
#: and every other column to float64 roundoff.
CASES = {
    "wls": (FitOptions(statistic="wls"), 1e-6),
    "wls-gain": (FitOptions(statistic="wls", gain=2.5), 1e-6),
    "dre": (FitOptions(statistic="dre"), 1e-5),
    "dre-gain-batches": (FitOptions(statistic="dre", gain=2.5, batch_size=8), 1e-5),
    "dre-same-blocking": (FitOptions(statistic="dre"), 1e-12),
}


@pytest.mark.parametrize("case", list(CASES))
def test_fit_through_guarded_namespace_equals_numpy(matrices, cutouts, case, monkeypatch):
    cpu_mm, dev_mm = matrices
    assert isinstance(dev_mm.models, DeviceArray)
    options, rtol = CASES[case]
    if case == "dre-same-blocking":
        monkeypatch.setattr(dre_kernel, "GPU_BLOCK_ROWS", dre_kernel._block_rows(np, cpu_mm.n_models, cpu_mm.n_pixels))
    cpu = fit_cutouts(cpu_mm, cutouts, options)
    calls = EVENTS["calls"]
    dev = fit_cutouts(dev_mm, cutouts, options)
    assert EVENTS["calls"] > calls                   # the device namespace did the work
    assert set(dev) == set(cpu)
    for name, values in dev.items():
        assert type(values) is np.ndarray, name      # host results only
        assert values.shape == cpu[name].shape and values.dtype == cpu[name].dtype, name
    np.testing.assert_array_equal(dev["MODEL_IDX"], cpu["MODEL_IDX"])
    np.testing.assert_array_equal(dev["FLAGS"], cpu["FLAGS"])
    np.testing.assert_allclose(dev["CHI2"], cpu["CHI2"], rtol=rtol)
    np.testing.assert_allclose(dev["FLUX"], cpu["FLUX"], rtol=rtol)
    if rtol <= 1e-6:
        # Every column. Not bit-equal: the host copies come back C-ordered (as from CuPy) where
        # NumPy's a[:, idx] is F-ordered, so float64 reductions round differently, and a spread
        # that cancels to ~0 (INDEX_ERR on a one-value axis) is sqrt(roundoff) ~ 1e-7.
        for name, values in dev.items():
            np.testing.assert_allclose(values, cpu[name], rtol=1e-9, atol=1e-6, err_msg=name)
    flags = cpu["FLAGS"]
    for i, bit in enumerate((FitFlag.EMPTY_MASK, FitFlag.NONFINITE_INPUT, FitFlag.BAD_RMS, FitFlag.NO_CENTRE)):
        assert flags[i] & bit, (i, FitFlag(int(flags[i])))
    assert np.isfinite(cpu["CHI2"][4:]).all()        # the intact objects were fitted


@pytest.mark.parametrize("gather_whole", [True, False])
def test_dre_kernel_on_guarded_namespace(monkeypatch, gather_whole):
    """`dre_chi_t` off NumPy, including the float64 re-do of models with a non-finite float32 sum."""
    rng = np.random.default_rng(5)
    n_pix, n_models = 400, 37
    models_t = rng.uniform(0.1, 1.0, (n_pix, n_models)).astype(np.float32)
    data = rng.normal(5.0, 1.0, n_pix).astype(np.float32)
    rms = np.full(n_pix, 0.5, dtype=np.float32)
    pixels = np.flatnonzero(rng.random(n_pix) < 0.5)
    models_t[:, 3] = 0.0                 # no flux: infinite scale, no finite term -> NaN
    rms[pixels[0]] = 1e-19               # variance 1e-38: where a model is 0 the float32 term
    models_t[pixels[0], 7] = 0.0         # overflows, the float64 re-do gives a finite chi
    if not gather_whole:
        monkeypatch.setattr(dre_kernel, "GATHER_BYTES", 0)          # gather block by block
    chi, scale = dre_kernel.dre_chi_t(np, data, rms, pixels, models_t, block_rows=16)
    dev = dre_kernel.dre_chi_t(guarded, guarded.asarray(data), guarded.asarray(rms), guarded.asarray(pixels),
                               guarded.asarray(models_t), block_rows=16)
    assert all(isinstance(a, DeviceArray) for a in dev)
    np.testing.assert_array_equal(to_host(dev[0]), chi)
    np.testing.assert_array_equal(to_host(dev[1]), scale)
    assert np.isnan(chi[3]) and np.isfinite(chi[7]) and chi[7] > 1e35
    assert np.isfinite(np.delete(chi, 3)).all()
