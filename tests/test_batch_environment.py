"""dre_hpc.batch.environment: array index with offset, tile, job id, MPI ranks, clear errors."""

from __future__ import annotations

import pytest

from dre_hpc.batch import environment as env
from dre_hpc.errors import DreError

ALL = env.INDEX_VARS + (env.OFFSET_VAR, env.TILE_VAR, "DRE_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_JOB_ID",
                        "PBS_JOBID") + env.RANK_VARS + env.SIZE_VARS + env.LOCAL_RANK_VARS


@pytest.fixture
def clean(monkeypatch):
    for name in ALL:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.mark.parametrize("name", env.INDEX_VARS)
def test_array_index_from_each_scheduler_plus_offset(clean, name):
    clean.setenv(name, "3")
    assert env.array_index() == 3
    clean.setenv("DRE_ARRAY_OFFSET", "1000")
    assert env.array_index() == 1003


def test_explicit_index_wins_over_an_enclosing_slurm_job(clean):
    clean.setenv("SLURM_ARRAY_TASK_ID", "7")
    clean.setenv("DRE_ARRAY_INDEX", "2")
    assert env.array_index() == 2


def test_missing_and_bad_values_name_the_variables(clean):
    with pytest.raises(DreError, match="SLURM_ARRAY_TASK_ID.*PBS_ARRAY_INDEX"):
        env.array_index()
    with pytest.raises(DreError, match="DRE_TILE"):
        env.tile_index()
    clean.setenv("DRE_TILE", "x3")
    with pytest.raises(DreError, match="DRE_TILE='x3' is not an integer"):
        env.tile_index()
    clean.setenv("PBS_ARRAY_INDEX", "1")
    clean.setenv("DRE_ARRAY_OFFSET", "ten")
    with pytest.raises(DreError, match="DRE_ARRAY_OFFSET"):
        env.array_index()


def test_job_id(clean):
    assert env.job_id() is None
    clean.setenv("PBS_JOBID", "12[3].pbs")
    assert env.job_id() == "12[3].pbs"
    clean.setenv("SLURM_JOB_ID", "99")
    assert env.job_id() == "99"
    clean.setenv("SLURM_ARRAY_JOB_ID", "90")
    clean.setenv("SLURM_ARRAY_TASK_ID", "4")
    assert env.job_id() == "90_4"
    clean.setenv("DRE_JOB_ID", "local-55")
    assert env.job_id() == "local-55"


def test_mpi_ranks(clean):
    assert (env.mpi_rank(), env.mpi_size(), env.mpi_local_rank()) == (0, 1, 0)
    clean.setenv("SLURM_PROCID", "5")
    clean.setenv("SLURM_NTASKS", "8")
    clean.setenv("SLURM_LOCALID", "1")
    assert (env.mpi_rank(), env.mpi_size(), env.mpi_local_rank()) == (5, 8, 1)
    clean.setenv("OMPI_COMM_WORLD_RANK", "2")
    clean.setenv("OMPI_COMM_WORLD_SIZE", "4")
    assert (env.mpi_rank(), env.mpi_size()) == (2, 4)
    clean.setenv("PMI_SIZE", "many")
    clean.delenv("OMPI_COMM_WORLD_SIZE")
    with pytest.raises(DreError, match="PMI_SIZE"):
        env.mpi_size()


def test_hostname_and_child_env(clean):
    assert env.hostname() and "." not in env.hostname()
    child = env.child_env({"DRE_TILE": 4})
    assert child["DRE_TILE"] == "4" and "PATH" in child
