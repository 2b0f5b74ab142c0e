"""Numba compilation of the fit's NumPy-backend kernels, shared by the modules that have one.

`FUSED` chooses the compiled kernels over the NumPy/CuPy array code (the tests run both and
compare them); the CuPy backend always takes the array code.
"""

from __future__ import annotations

#: Compiled kernels on the NumPy backend; False: the array code that CuPy runs.
FUSED = True

_OPTIONS = {"nogil": True, "boundscheck": False, "error_model": "numpy"}


def njit(fn):
    """``fn`` compiled by Numba (on first call; cached on disk where Numba can write), or None
    without Numba. ``error_model='numpy'``: no zero-division checks, which stop vectorisation."""
    try:
        import numba
    except ImportError:                                      # pragma: no cover - a dependency
        return None
    try:
        return numba.njit(cache=True, **_OPTIONS)(fn)
    except RuntimeError:                                     # no writable cache directory
        return numba.njit(**_OPTIONS)(fn)


def use_compiled(xp) -> bool:
    """Whether the compiled kernels serve backend ``xp`` (NumPy, with `FUSED`)."""
    import numpy as np
    return FUSED and xp is np


def compile_in(namespace: dict, *names):
    """Compile the functions ``names`` of a module's ``namespace`` in that order and put the
    compiled ones in their place (the same behaviour), so that a kernel finds the helpers it
    calls compiled; returns them."""
    for name in names:
        namespace[name] = njit(namespace[name])
    return tuple(namespace[name] for name in names)
