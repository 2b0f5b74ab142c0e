"""Where the fit's compiled kernels are cached (dre_hpc.fit.compiled.cache_in).

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
