"""The MPI layer of a fit job: ranks, node-shared arrays, a shared work counter, abort.

A fit job runs as one process or as N ranks started by ``mpirun``/``mpiexec``/``srun``.
`open_comm` gives the same small interface either way. With one rank and no MPI launcher in the
environment it never imports mpi4py (`SerialComm`: no MPI library needed). Otherwise it imports
mpi4py and checks the world size against the ranks the job script asked for and against the
size the launcher announces in the environment: a container/host MPI mismatch shows as every
rank being "rank 0 of 1", and would otherwise fit every object N times over.

Shared memory: `shared_array` allocates one array per node (``MPI.Win.Allocate_shared`` on the
node communicator; the node's rank 0 owns the memory, the others map it), so the model cube and
its convolution exist once per node, not once per rank. `WorkCounter` hands out work items in
order from an atomic counter (``MPI.Win`` + ``Fetch_and_op`` on world rank 0) and carries the
job-wide stop request.
"""

from __future__ import annotations

import numpy as np

from ..errors import DreError
from . import environment


class MpiMismatchError(DreError):
    """The MPI world is not the one the job asked for (e.g. container and host MPI differ)."""


class SerialComm:
    """One process, no MPI: the interface of `MpiComm` with rank 0 of 1."""

    rank, size, node_rank, node_size = 0, 1, 0, 1

    def __init__(self, local_rank: int = 0):
        self.local_rank = local_rank

    def barrier(self):
        pass

    def bcast(self, obj):
        return obj

    def gather(self, obj):
        return [obj]

    def any(self, flag: bool) -> bool:
        return bool(flag)

    def shared_array(self, shape, dtype) -> np.ndarray:
        return np.empty(shape, dtype)

    def counter(self, slots: int) -> "LocalCounter":
        return LocalCounter(slots)

    def abort(self, code: int):
        raise SystemExit(code)


class LocalCounter:
    """`WorkCounter` for one process."""

    def __init__(self, slots: int):
        self.values = [0] * slots
        self.stop = False

    def next(self, slot: int) -> int:
        self.values[slot] += 1
        return self.values[slot] - 1

    def request_stop(self):
        self.stop = True

    def stopped(self) -> bool:
        return self.stop

    def free(self):
        pass


class MpiComm:
    """The world and node communicators of an MPI job (mpi4py)."""

    def __init__(self, mpi):
        self.mpi = mpi
        self.world = mpi.COMM_WORLD
        self.node = self.world.Split_type(mpi.COMM_TYPE_SHARED, key=self.world.rank)
        self.rank, self.size = self.world.rank, self.world.size
        self.node_rank, self.node_size = self.node.rank, self.node.size
        self.local_rank = self.node_rank
        self._windows = []

    def barrier(self):
        self.world.Barrier()

    def bcast(self, obj):
        return self.world.bcast(obj, root=0)

    def gather(self, obj):
        return self.world.gather(obj, root=0)

    def any(self, flag: bool) -> bool:
        return bool(self.world.allreduce(int(bool(flag)), op=self.mpi.MAX))

    def shared_array(self, shape, dtype) -> np.ndarray:
        """An uninitialised array (like ``np.empty``) shared by the ranks of this node (collective
        on the node)."""
        dtype = np.dtype(dtype)
        nbytes = max(int(np.prod(shape)) * dtype.itemsize, 1)
        win = self.mpi.Win.Allocate_shared(nbytes if self.node_rank == 0 else 0, dtype.itemsize,
                                           comm=self.node)
        self._windows.append(win)                # the memory lives as long as the window
        buffer, _ = win.Shared_query(0)
        array = np.ndarray(buffer=buffer, dtype=dtype, shape=tuple(shape))
        self.node.Barrier()
        return array

    def counter(self, slots: int) -> "WorkCounter":
        return WorkCounter(self.mpi, self.world, slots)

    def abort(self, code: int):
        """End every rank of the job now (a rank that failed must not leave the others waiting)."""
        self.world.Abort(code)


class WorkCounter:
    """Atomic counters (`slots` of them) and a stop flag in a window on world rank 0."""

    def __init__(self, mpi, world, slots: int):
        self.mpi, self.slots = mpi, slots
        size = (slots + 1) * 8
        self.win = mpi.Win.Allocate(size if world.rank == 0 else 0, 8, comm=world)
        if world.rank == 0:
            self.win.Lock(0)
            self.win.Put(np.zeros(slots + 1, np.int64), 0)
            self.win.Unlock(0)
        world.Barrier()
        self._one, self._result = np.ones(1, np.int64), np.zeros(1, np.int64)

    def _fetch_add(self, slot: int, value) -> int:
        self.win.Lock(0, self.mpi.LOCK_SHARED)
        self.win.Fetch_and_op(value, self._result, 0, slot, self.mpi.SUM)
        self.win.Unlock(0)
        return int(self._result[0])

    def next(self, slot: int) -> int:
        """The next item number of counter `slot` (0, 1, 2, ... across all ranks)."""
        return self._fetch_add(slot, self._one)

    def request_stop(self):
        self._fetch_add(self.slots, self._one)

    def stopped(self) -> bool:
        return self._fetch_add(self.slots, np.zeros(1, np.int64)) > 0

    def free(self):
        self.win.Free()


_COMM = None


def launched_by_mpi() -> bool:
    """Whether an MPI launcher started this process (its rank/size variables are set)."""
    return environment.mpi_launcher_size() is not None


def open_comm(ranks: int | None = None):
    """This process's communicator (one per process). `ranks`: what the job asked for (None: no
    check). Raises MpiMismatchError when the world differs from the request or the launcher."""
    global _COMM
    if _COMM is None:
        if (ranks or 1) == 1 and not launched_by_mpi():
            _COMM = SerialComm(environment.mpi_local_rank())
        else:
            _COMM = MpiComm(_import_mpi(ranks))
    check_world(_COMM.size, ranks, environment.mpi_launcher_size())
    return _COMM


def _import_mpi(ranks):
    try:
        from mpi4py import MPI
    except ImportError as exc:          # also: mpi4py present but no MPI library to load
        raise MpiMismatchError(f"this job asks for {ranks or 'several'} MPI ranks but mpi4py cannot "
                               f"be imported ({exc}): pip install mpi4py, against the MPI that "
                               f"launches the job") from None
    return MPI


def check_world(size: int, ranks: int | None, announced: int | None) -> None:
    """Fail loudly when the MPI world size differs from the requested ranks or the launcher's."""
    hint = ("the MPI that mpi4py loaded is not the one that launched the job (a container/host MPI "
            "mismatch, or srun without a matching --mpi plugin)")
    if ranks is not None and size != ranks:
        raise MpiMismatchError(f"the job asked for {ranks} MPI ranks but this rank sees a world of "
                               f"{size}: {hint}")
    if announced is not None and size != announced:
        raise MpiMismatchError(f"the launcher started {announced} ranks but this rank sees a world "
                               f"of {size}: {hint}")
