"""Numba compilation of the fit's NumPy-backend kernels, shared by the modules that have one.

`FUSED` chooses the compiled kernels over the NumPy/CuPy array code (the tests run both and
compare them); the CuPy backend always takes the array code.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

#: Compiled kernels on the NumPy backend; False: the array code that CuPy runs.
FUSED = True
#: Objects a process must fit for the *optional* compiled kernels (those whose array code gives
#: the same bits: centring and gathering) to pay for their one-time load, importing Numba and
#: loading its cached kernels (0.6 s here; a chunk of the demo's 126 objects, default cube: 0.75-1.09
#: s with them, 0.37-0.55 s without), against the 0.05-0.09 ms per object that they save.
COMPILED_MIN_OBJECTS = 8000
_worth_loading = True

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


def use_compiled(xp, optional=False) -> bool:
    """Whether the compiled kernels serve backend ``xp`` (NumPy, with `FUSED`). ``optional``: a
    kernel whose array code gives the same bits, compiled only where the process fits enough
    objects (`expect_objects`)."""
    import numpy as np
    return FUSED and xp is np and (_worth_loading or not optional)


def expect_objects(n_objects: int) -> None:
    """Tell how many objects this process is about to fit: with fewer than
    `COMPILED_MIN_OBJECTS` the optional kernels take the array code (the same results)."""
    global _worth_loading
    _worth_loading = n_objects >= COMPILED_MIN_OBJECTS


def compile_in(namespace: dict, *names):
    """Compile the functions ``names`` of a module's ``namespace`` in that order and put the
    compiled ones in their place (the same behaviour), so that a kernel finds the helpers it
    calls compiled; returns them."""
    for name in names:
        namespace[name] = njit(namespace[name])
    return tuple(namespace[name] for name in names)


def cache_in(directory) -> bool:
    """Keep Numba's compiled kernels in ``directory`` where Numba could not keep them beside this
    package (a read-only install, as in a container image) and ``NUMBA_CACHE_DIR`` is not set;
    returns whether it did. dre-batch fit jobs keep them in their run directory, which every job
    of the run can write whatever the container binds (``$HOME`` may not be): only a run's first
    fit jobs compile (a few seconds), the others load the kernels."""
    here = Path(__file__).resolve().parent
    pycache = here / "__pycache__"
    if os.environ.get("NUMBA_CACHE_DIR") or os.access(pycache if pycache.exists() else here, os.W_OK):
        return False
    os.environ["NUMBA_CACHE_DIR"] = str(directory)
    if "numba" in sys.modules:                   # already imported: it read its settings then
        from numba.core import config
        config.reload_config()
    return True
