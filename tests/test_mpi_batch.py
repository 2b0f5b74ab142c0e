"""Two-rank fit jobs through dre-batch: the rendered job scripts launch the worker with the
scheduler's MPI launcher (``mpirun`` for the local scheduler, ``srun`` on the real single-host
SLURM, whose ``MpiDefault=pmix`` lets Debian's Open MPI and mpi4py start from srun). The flat
catalogue must equal the one-process local reference (`batch_helpers.local_reference`) exactly,
and every chunk's done marker must say it ran on 2 ranks.
"""

from __future__ import annotations

import json
import os
import shutil
import sys

import pytest
from batch_helpers import (assert_same_catalogue, dre_batch, flat_path, local_reference,  # noqa: F401
                           sim_tiles, write_config)

pytestmark = [pytest.mark.mpi,
              pytest.mark.skipif(shutil.which("mpirun") is None, reason="Open MPI not installed"),
              pytest.mark.skipif(shutil.which("psfex") is None, reason="PSFEx not installed")]

OMPI_ROOT = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
TWO_RANKS = {"fit": {"ntasks_per_node": 2, "cpus_per_task": 1}}


def _fit_ranks(run_dir) -> set:
    """The rank counts recorded in the fit done markers."""
    return {json.loads(p.read_text())["ranks"] for p in (run_dir / "markers" / "fit").glob("*/*.done")}


def _reference(local_reference):
    """The flat catalogue of the one-process local run (collated here if no test did yet)."""
    run_dir = local_reference[0]
    if not flat_path(run_dir).exists():
        assert dre_batch("collate", run_dir).returncode == 0
    return flat_path(run_dir)


def _setup(root, sim_tiles, scheduler, env):
    config = write_config(root / "run.yaml", chunks_per_tile=2, scheduler=scheduler, resources=TWO_RANKS,
                          run={"python": sys.executable})
    result = dre_batch("setup", config, sim_tiles, "--run-dir", root / "run", env=env)
    assert result.returncode == 0, result.stderr
    return root / "run"


def test_two_rank_local_fits_equal_the_one_process_run(tmp_path, sim_tiles, local_reference):
    env = {**os.environ, **OMPI_ROOT}
    run_dir = _setup(tmp_path, sim_tiles, "local", env)
    assert "mpirun" in (run_dir / "scripts" / "fit.sh").read_text()
    result = dre_batch("run", run_dir, env=env, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert dre_batch("collate", run_dir, env=env).returncode == 0
    assert_same_catalogue(flat_path(run_dir), _reference(local_reference))
    assert _fit_ranks(run_dir) == {2}


@pytest.mark.slurm
@pytest.mark.slow
def test_two_rank_slurm_fits_through_srun_equal_the_local_run(tmp_path, sim_tiles, local_reference,
                                                                slurm_cluster):
    env = {**slurm_cluster.env, **OMPI_ROOT}
    run_dir = _setup(tmp_path, sim_tiles, "slurm", env)
    assert "srun" in (run_dir / "scripts" / "fit.sh").read_text()
    result = dre_batch("run", run_dir, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    waited = dre_batch("status", run_dir, "--wait", "--interval", "1", env=env, timeout=300)
    assert waited.returncode == 0, waited.stdout + waited.stderr + slurm_cluster.log_tails()
    assert dre_batch("collate", run_dir, env=env).returncode == 0
    assert_same_catalogue(flat_path(run_dir), _reference(local_reference))
    assert _fit_ranks(run_dir) == {2}
