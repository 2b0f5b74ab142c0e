"""Run the real dre-batch worker with test-only faults injected around each fitting unit.

    python tests/worker_harness.py [--slow S] [--unit-log FILE] [--raise-on-rank R] -- WORKER_ARGS...

A test harness, not a stand-in: the worker, MPI, checkpoints and markers are the real ones; this
script only wraps `dre_hpc.batch.chunk_fit.fit_unit` before calling `dre_hpc.batch.worker.main`.
``--slow`` sleeps after every unit, so a test can signal or kill a fit between checkpoints
(real units of the test tiles take milliseconds); ``--unit-log`` appends a line per fitted unit
(the test's sign that fitting has begun); ``--raise-on-rank`` raises RuntimeError in that MPI
rank's first unit. Used under the real ``mpirun`` by tests/test_mpi_worker.py.
"""

from __future__ import annotations

import argparse
import sys
import time

from dre_hpc.batch import chunk_fit, environment, worker

INJECTED = "injected fault in rank"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--slow", type=float, default=0.0)
    parser.add_argument("--unit-log")
    parser.add_argument("--raise-on-rank", type=int)
    parser.add_argument("worker_args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    real = chunk_fit.fit_unit
    rank = environment.mpi_rank()

    def fit_unit(*a, **k):
        if args.raise_on_rank == rank:
            raise RuntimeError(f"{INJECTED} {rank}")
        result = real(*a, **k)
        if args.unit_log:
            with open(args.unit_log, "a") as log:
                log.write(f"rank {rank}: {len(result['FLAGS'])} objects\n")
        time.sleep(args.slow)
        return result

    chunk_fit.fit_unit = fit_unit
    return worker.main([a for a in args.worker_args if a != "--"])


if __name__ == "__main__":
    sys.exit(main())
