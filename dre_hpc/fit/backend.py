"""Choose the array namespace (NumPy on CPU, CuPy on GPU); the numerical core receives it as ``xp``."""

from __future__ import annotations

import numpy as np

from ..errors import BackendError

BACKENDS = ("cpu", "gpu")


def get_backend(name: str = "cpu", device: int | None = None):
    """Return the array module for ``name`` ('cpu' -> numpy, 'gpu' -> cupy on ``device``).

    CuPy is imported lazily; a missing package or an absent GPU raises `BackendError` with the fix.
    """
    if name == "cpu":
        return np
    if name != "gpu":
        raise BackendError(f"unknown backend {name!r}: expected one of {', '.join(BACKENDS)}")
    try:
        import cupy
    except ImportError as exc:
        raise BackendError("--backend gpu needs CuPy: pip install 'dre_hpc[gpu]' "
                           f"(cupy-cuda12x) on a machine with an NVIDIA GPU ({exc})") from None
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # CUDARuntimeError when no driver or device
        raise BackendError(f"--backend gpu: no usable CUDA device ({exc}); use --backend cpu") from None
    if count < 1:
        raise BackendError("--backend gpu: no CUDA device found; use --backend cpu")
    cupy.cuda.Device((device or 0) % count).use()
    return cupy


def to_host(array) -> np.ndarray:
    """A NumPy copy (or view) of a NumPy or CuPy array."""
    get = getattr(array, "get", None)
    return get() if callable(get) and not isinstance(array, np.ndarray) else np.asarray(array)
