"""Fit a chunk's units with every rank of the job: one model cube per node, checkpoints, stop.

A *unit* is the objects of one image extension within one tile-global batch
``[b*B, (b+1)*B)`` (B = ``fit.batch_size``); its results are the same bit for bit whichever rank,
attempt or chunking fits it (see `fit_job`). Units are grouped in *phases*, one per extension:
the node's ranks convolve the cube with that extension's PSF together (each a slice, into the
node-shared array of `NodeModels`), then share out the phase's units:

- ``dynamic`` (default): each rank takes the next unfitted unit from an atomic counter, so a rank
  slowed by harder objects (many usable pixels, the ``dre`` statistic) takes fewer;
- ``static``: unit i goes to rank i mod N (kept for comparison: ``benchmarks/bench_worker.py``).

On a GPU every unit goes to the device whole; a unit larger than the room the free device memory
leaves (shared among the ranks on that GPU) is refused up front with the ``fit.batch_size`` to
use, rather than split in passes whose size, and so whose numbers, would depend on the moment.

Each rank writes its finished units to the chunk's checkpoint (`checkpoint.Checkpoint`) when the
`CheckpointPolicy` says so. A stop signal (SIGTERM/SIGUSR1, `StopSignals`) on any rank sets the
job-wide stop flag; every rank then finishes its current unit and checkpoints what it holds,
and `fit_job.run_fit` raises `ChunkInterrupted` (retryable) on every rank.
"""

from __future__ import annotations

import resource
import signal
import threading
import time

from ..errors import DreError
from ..fit.compiled import expect_objects
from ..fit.engine import fit_batch
from ..fit.model_matrix import ModelMatrix, NodeModels  # noqa: F401  (NodeModels: the worker's holder)
from ..fit.units import Unit, phases, plan_units, psf_index  # noqa: F401  (re-exported)
from ..models.psf import read_psf

RETRYABLE_EXIT = 75                      # EX_TEMPFAIL: interrupted, checkpointed, run it again


class ChunkInterrupted(DreError):
    """The fit stopped on a signal after checkpointing; a rerun resumes from the checkpoint."""

    retryable = True
    exit_code = RETRYABLE_EXIT


class StopSignals:
    """Records SIGTERM and SIGUSR1 (the walltime warning) instead of dying: the fit stops at the
    next unit. Installed only in the main thread; the previous handlers come back on exit."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.received, self._previous = None, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.received = self.received or signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


class DeviceMemoryError(DreError):
    """A fitting unit does not fit in the GPU memory left to this rank."""


def device_batch_limit(xp, n_pixels: int, n_models: int, fraction: float = 0.5, sharing: int = 1):
    """Objects per device pass that fit in `fraction` of the free GPU memory divided among the
    `sharing` ranks that use this GPU; None on the host. Per object: about ten pixel-sized float32
    arrays and six model-sized float64 rows."""
    runtime = getattr(getattr(xp, "cuda", None), "runtime", None)
    if runtime is None:
        return None
    free, _ = runtime.memGetInfo()
    return max(1, int(free * fraction / max(sharing, 1)) // (40 * n_pixels + 48 * n_models))


def ranks_per_device(xp, node_ranks: int) -> int:
    """How many of this node's ranks share each GPU (1 on the host)."""
    runtime = getattr(getattr(xp, "cuda", None), "runtime", None)
    count = runtime.getDeviceCount() if runtime is not None and hasattr(runtime, "getDeviceCount") else 1
    return -(-node_ranks // max(count, 1))


def check_device_room(limit, units, batch_size: int) -> None:
    """Refuse units larger than the device room. Units are never split into smaller passes: a
    unit's numbers depend on its composition, and a pass size taken from the free memory of the
    moment would make them depend on it too."""
    largest = max((u.size for u in units), default=0)
    if limit is not None and largest > limit:
        raise DeviceMemoryError(f"a fitting unit of {largest} objects (fit.batch_size {batch_size}) "
                                f"does not fit in the GPU memory left to this rank (room for {limit} "
                                f"objects): set fit.batch_size to {limit} or less, or run fewer ranks "
                                f"per GPU")


def fit_unit(mm: ModelMatrix, cuts, options) -> dict:
    """Fit one unit's cutouts as one batch (the wrap point of tests/worker_harness.py)."""
    return fit_batch(mm, cuts, options)


def _assigned(comm, counter, slot, units, schedule, stop):
    """The units of one phase that this rank fits, until the job-wide stop."""
    mine = iter(range(comm.rank, len(units), comm.size)) if schedule == "static" else None
    while True:
        if stop.received:
            counter.request_stop()
        if counter.stopped():
            return
        i = next(mine, len(units)) if mine is not None else counter.next(slot)
        if i >= len(units):
            return
        yield units[i]


def fit_pending(comm, models: NodeModels, units, read_unit, psf_file, options, checkpoint=None,
                policy=None, stop=None, schedule="dynamic") -> tuple:
    """Fit `units` (those not in the checkpoint) with every rank: the one fit loop of the ``dre``
    command (one process, no checkpoint, no stop) and of the dre-batch worker. Returns this rank's
    ``({uid: results}, stats, stopped)``; `stopped` (the same on every rank) when a stop signal
    ended the fit early, after every rank checkpointed its unsaved units."""
    stop = stop or NoStop()
    expect_objects(sum(u.size for u in units) // max(comm.size, 1))
    groups = phases(units)
    counter = comm.counter(max(len(groups), 1))
    mine, pending, stats = {}, {}, {"units": 0, "objects": 0, "fit_seconds": 0.0, "checkpoints": 0}
    convolved_before = models.n_convolved
    stopping = False
    for slot, (ext, group) in enumerate(groups):
        mm = models.for_psf(read_psf(psf_file, ext_number=psf_index(ext)))
        check_device_room(device_batch_limit(mm.xp, mm.n_pixels, mm.n_models,
                                             sharing=ranks_per_device(mm.xp, comm.node_size)),
                          group, options.batch_size)
        for unit in _assigned(comm, counter, slot, group, schedule, stop):
            begin = time.perf_counter()
            mine[unit.uid] = pending[unit.uid] = fit_unit(mm, read_unit(unit), options)
            stats["fit_seconds"] += time.perf_counter() - begin
            stats["units"] += 1
            stats["objects"] += unit.size
            if policy is not None and policy.due(sum(len(r["FLAGS"]) for r in pending.values())):
                _save(checkpoint, pending, policy, stats)
        comm.barrier()                  # the next phase overwrites the shared convolved models
        stopping = comm.any(stop.received or counter.stopped())
        if stopping:
            _save(checkpoint, pending, policy, stats)
            break
    counter.free()          # collective: not after an exception (the job is aborted instead)
    stats.update(memory_mb(), fit_seconds=round(stats["fit_seconds"], 3),
                 convolutions=models.n_convolved - convolved_before)
    return mine, stats, stopping


class NoStop:
    received = None


def _save(checkpoint, pending, policy, stats):
    if checkpoint is None:
        return
    if checkpoint.save(pending):
        stats["checkpoints"] += 1
    pending.clear()
    policy.written()


def memory_mb() -> dict:
    """This process's peak resident memory and, where Linux tells, its current resident, proportional
    (shared pages divided among their users) and private memory, in MB."""
    out = {"max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    fields = {"Rss:": "rss_mb", "Pss:": "pss_mb", "Private_Clean:": "private_mb", "Private_Dirty:": "private_mb"}
    try:
        with open("/proc/self/smaps_rollup") as handle:
            for line in handle:
                parts = line.split()
                if parts and parts[0] in fields:
                    name = fields[parts[0]]
                    out[name] = round(out.get(name, 0) + int(parts[1]) / 1024, 1)
    except OSError:
        pass
    return out
