"""Where the fit's compiled kernels are cached (dre_hpc.fit.compiled.cache_in), and when they are
loaded at all (dre_hpc.fit.compiled.expect_objects).

A read-only install (a container image) cannot keep Numba's cache beside the package; dre-batch
fit jobs then keep it in their run directory. A real Numba process is run with the package's
directory reported read-only (``os.access`` patched: the test machine's checkout is writable).
"""

from __future__ import annotations

import os
import subprocess
import sys

from dre_hpc.fit import compiled

SCRIPT = """
import os, sys
import numpy as np
from dre_hpc.fit import compiled
real = os.access
os.access = lambda path, mode: False if str(path).startswith(os.path.dirname(compiled.__file__)) else real(path, mode)
print(compiled.cache_in(sys.argv[1]))
from dre_hpc.fit import gather
mask = np.zeros((2, 16, 16), bool); mask[0, 5:9, 6:8] = True
rank = np.argsort(np.arange(256))
print(gather.mask_extent(mask, np.zeros((2, 2)), rank, False).tolist())
"""


def test_a_read_only_install_caches_in_the_given_directory(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "numba")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[0] == "True"
    assert out.stdout.split("\n")[1] == "[136, 0]"                 # row 8, column 7: 8 * 16 + 7, + 1
    assert list((tmp_path / "numba").rglob("*.nbi"))                # the kernel's cache is there


def test_a_writable_install_or_a_set_cache_directory_is_left_alone(tmp_path, monkeypatch):
    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    assert compiled.cache_in(tmp_path) is False                     # this checkout is writable
    assert "NUMBA_CACHE_DIR" not in os.environ
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path / "mine"))
    monkeypatch.setattr(compiled.os, "access", lambda *a: False)
    assert compiled.cache_in(tmp_path / "run") is False
    assert os.environ["NUMBA_CACHE_DIR"] == str(tmp_path / "mine")


SMALL_FIT = """
import sys
import numpy as np
from types import SimpleNamespace
from dre_hpc.fit import compiled, engine
from dre_hpc.fit.model_matrix import radial_layout
order, rank, radius = radial_layout(32)
mm = SimpleNamespace(grid=SimpleNamespace(boxsize=32), order=order, rank=rank, radius=radius, n_pixels=1024)
rng = np.random.default_rng(1)
y, x = np.mgrid[:32, :32] - 16
cuts = SimpleNamespace(data=rng.normal(0, 1, (6, 32, 32)).astype(np.float32),
                       rms=np.ones((6, 32, 32), np.float32), mask=np.broadcast_to(x * x + y * y < 80, (6, 32, 32)).copy(),
                       offsets=rng.uniform(-0.5, 0.5, (6, 2)), objects={"CUT_FLAGS": np.zeros(6, np.int64)})
clean = engine.clean_cutouts(cuts)
out = []
for n_objects in (int(sys.argv[1]), compiled.COMPILED_MIN_OBJECTS):
    compiled.expect_objects(n_objects)
    extent = engine.footprint_extent(mm, clean[2], clean[4], True)
    group = engine.prepare_group(np, mm, clean, np.arange(6), int(extent.max()), True, 16)
    out.append((extent, group.d, group.w))
    print("numba" in sys.modules)
assert all(np.array_equal(a, b) for a, b in zip(*out))
"""


def test_a_small_fit_does_not_load_the_optional_kernels():
    """A process that fits fewer than COMPILED_MIN_OBJECTS objects centres and gathers with the
    array code and never imports Numba (0.6 s); from that many on it compiles them. The same bits
    either way (checked here; `tests/test_gather.py` checks every case)."""
    out = subprocess.run([sys.executable, "-c", SMALL_FIT, str(compiled.COMPILED_MIN_OBJECTS - 1)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "True"]
