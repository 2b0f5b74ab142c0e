"""What a dre-batch job learns from its environment: array index, tile, job id, MPI rank, host.

This is the only module of `dre_hpc.batch` that reads ``os.environ``. Each function looks at the
variables of every supported launcher, the explicit dre-batch ones first (so a local run started
inside a SLURM allocation is not confused by the allocation's variables):

- array index: ``DRE_ARRAY_INDEX`` (local runs; a one-element PBS job), ``SLURM_ARRAY_TASK_ID``,
  ``PBS_ARRAY_INDEX`` (PBS Pro), ``PBS_ARRAYID`` (Torque); plus ``DRE_ARRAY_OFFSET`` (default 0),
  because large index sets are submitted in blocks whose array indices start at 0.
- tile: ``DRE_TILE``.
- job id: ``DRE_JOB_ID``, ``SLURM_ARRAY_JOB_ID`` + ``_`` + ``SLURM_ARRAY_TASK_ID`` (the element, as
  squeue shows it), ``SLURM_JOB_ID``, ``PBS_JOBID``.
- MPI: Open MPI (``OMPI_COMM_WORLD_*``), PMI (``PMI_RANK``, ``PMI_SIZE``), SLURM (``SLURM_PROCID``,
  ``SLURM_NTASKS``, ``SLURM_LOCALID``); none set: a single process (rank 0 of 1).

A variable that is needed but missing, or that is not an integer, raises `JobEnvironmentError`
(a `DreError`) naming the variables.
"""

from __future__ import annotations

import os
import socket

from dre_hpc.errors import DreError

INDEX_VARS = ("DRE_ARRAY_INDEX", "SLURM_ARRAY_TASK_ID", "PBS_ARRAY_INDEX", "PBS_ARRAYID")
OFFSET_VAR = "DRE_ARRAY_OFFSET"
TILE_VAR = "DRE_TILE"
RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID")
SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_NTASKS")
LAUNCHER_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE")
LOCAL_RANK_VARS = ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID")


class JobEnvironmentError(DreError):
    """A variable that a job needs is missing from its environment or is not an integer."""



def _int(name: str, text: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise JobEnvironmentError(f"environment variable {name}={text!r} is not an integer") from None


def _first(names):
    """``(name, value)`` of the first variable of `names` that is set and not empty, or None."""
    for name in names:
        value = os.environ.get(name)
        if value is not None and value.strip() != "":
            return name, value
    return None


def _first_int(names, default=None, what=""):
    found = _first(names)
    if found is None:
        if default is not None:
            return default
        raise JobEnvironmentError(f"no {what} in the environment: none of {', '.join(names)} is set "
                                  f"(run this through a dre-batch job script, or pass it explicitly)")
    return _int(*found)


def array_index() -> int:
    """The real array index of this job: the scheduler's index plus ``DRE_ARRAY_OFFSET``."""
    index = _first_int(INDEX_VARS, what="array index")
    offset = _first_int((OFFSET_VAR,), default=0)
    if index < 0 or offset < 0:
        raise JobEnvironmentError(f"negative array index {index} or {OFFSET_VAR} {offset}")
    return index + offset


def tile_index() -> int:
    """The tile index of a fit job, from ``DRE_TILE``."""
    return _first_int((TILE_VAR,), what="tile index (--tile)")


def job_id() -> str | None:
    """The scheduler's id of this job (array element), or None outside any scheduler."""
    explicit = _first(("DRE_JOB_ID",))
    if explicit:
        return explicit[1].strip()
    array_job, task = _first(("SLURM_ARRAY_JOB_ID",)), _first(("SLURM_ARRAY_TASK_ID",))
    if array_job and task:
        return f"{array_job[1].strip()}_{task[1].strip()}"
    found = _first(("SLURM_JOB_ID", "PBS_JOBID"))
    return found[1].strip() if found else None


def mpi_rank() -> int:
    """This process's MPI rank (0 when not launched by MPI)."""
    return _first_int(RANK_VARS, default=0)


def mpi_size() -> int:
    """The number of MPI ranks (1 when not launched by MPI)."""
    return _first_int(SIZE_VARS, default=1)


def mpi_launcher_size() -> int | None:
    """The world size an MPI launcher announced, or None when none did: ``OMPI_COMM_WORLD_SIZE``
    (mpirun), ``PMI_SIZE`` (PMI-1/2), ``SLURM_STEP_NUM_TASKS`` beside ``PMIX_RANK`` (srun
    --mpi=pmix). ``SLURM_NTASKS`` alone is not one: the batch shell has it too."""
    found = _first(LAUNCHER_SIZE_VARS)
    if found is None and _first(("PMIX_RANK",)):
        found = _first(("SLURM_STEP_NUM_TASKS",))
    return _int(*found) if found else None


def mpi_local_rank() -> int:
    """This process's rank among the ranks on its node (0 when not launched by MPI)."""
    return _first_int(LOCAL_RANK_VARS, default=0)


def hostname() -> str:
    """The short host name."""
    return socket.gethostname().split(".")[0]


def child_env(extra: dict) -> dict:
    """This process's environment plus `extra` (values as strings), for a child process."""
    env = dict(os.environ)
    env.update({str(k): str(v) for k, v in extra.items()})
    return env
