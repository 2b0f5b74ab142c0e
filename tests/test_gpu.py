"""The GPU path (CuPy) gives the CPU's results. Runs only where CuPy and a CUDA device exist.

CI has no GPU: there this test is reported as skipped (never as passed). The CPU tests run the
same array-namespace code with ``xp = numpy``.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import gpu_or_skip

from dre_hpc.errors import BackendError
from dre_hpc.fit.backend import get_backend
from dre_hpc.fit.engine import FitOptions, ModelMatrix, fit_cutouts



@pytest.mark.gpu
@pytest.mark.parametrize("statistic", ["wls", "dre"])
def test_gpu_matches_cpu(default_models, sim_galaxies, statistic):
    cupy = gpu_or_skip()
    cuts, _, psf = sim_galaxies
    sub = cuts.subset(slice(0, 32))
    cpu_mm = default_models.for_psf(psf)
    gpu_mm = ModelMatrix(cupy, default_models.grid, cpu_mm.host)
    cpu = fit_cutouts(cpu_mm, sub, FitOptions(statistic=statistic))
    gpu = fit_cutouts(gpu_mm, sub, FitOptions(statistic=statistic))
    assert np.array_equal(cpu["MODEL_IDX"], gpu["MODEL_IDX"])
    assert np.array_equal(cpu["FLAGS"], gpu["FLAGS"])
    # dre sums float32 terms in blocks whose size differs on the GPU: float32 rounding, not more
    np.testing.assert_allclose(gpu["CHI2"], cpu["CHI2"], rtol=1e-6 if statistic == "wls" else 1e-5)
    np.testing.assert_allclose(gpu["FLUX"], cpu["FLUX"], rtol=1e-4)


def test_gpu_backend_unavailable_is_a_clear_error():
    """Without CuPy or a device, asking for the GPU names the fix instead of a CUDA traceback."""
    try:
        get_backend("gpu")
    except BackendError as exc:
        assert "cpu" in str(exc) or "CuPy" in str(exc)
    else:
        pytest.skip("a GPU is present: the error path cannot be exercised here")
