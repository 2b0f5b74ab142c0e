"""The scheduler interface of dre-batch and the flow every scheduler shares.

A `Scheduler` turns "run ``scripts/<stage>.sh`` for these indices" into submit commands, runs
them, and answers which array elements are still queued or running. Subclasses (slurm.py,
pbs.py, local.py) only format commands and parse outputs; this class owns the flow:

- **Blocks and offsets.** The real indices (tile indices for prep, chunk indices for fit) are
  split into blocks, each submitted as one array whose indices start at 0, with
  ``DRE_ARRAY_OFFSET=<first index of the block>`` exported (the job adds it back, see
  `dre_hpc.batch.environment.array_index`). A block spans fewer than ``scheduler.max_array_size``
  indices (SLURM refuses array indices >= MaxArraySize). `submit_commands` returns
  `SubmitCommand` triples ``(argv, block, offset)``: ``block`` the real indices, ``offset`` the
  block's first index. Callers keep the offset (submission records store it as ``offset``).
- **Array indices in and out are the scheduler's.** `dependency_id(job_id, index)` and the keys
  ``(job_id, index)`` of `active` use the index inside the submitted array, i.e. real index minus
  the block's offset; a one-element job that is not an array (PBS) has index 0. The local
  scheduler has no arrays: its `active` answers ``(job_id, None)`` for a whole run process.
- **Submitting.** `submit(argv)` runs the command in the run directory with a timeout and parses
  the job id; any failure is a `SchedulerError` with the command, exit code and stderr.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
from typing import NamedTuple

from dre_hpc.errors import DreError

SUBMIT_TIMEOUT = 120          # seconds for sbatch/qsub/squeue/qstat to answer


class SchedulerError(DreError):
    """A scheduler command is missing, failed or answered something unexpected."""

    def __init__(self, message, command=None, returncode=None, stderr=""):
        self.command = [str(c) for c in command] if command else None
        self.returncode, self.stderr = returncode, stderr or ""
        super().__init__(message)

    @classmethod
    def failed(cls, command, returncode, stderr):
        """The error for `command` exiting with `returncode`, quoting the end of its stderr."""
        tail = " | ".join(line.strip() for line in (stderr or "").strip().splitlines()[-3:] if line.strip())
        return cls(f"command `{shlex.join(map(str, command))}` exited with code {returncode}"
                   + (f": {tail}" if tail else " (no stderr)"), command, returncode, stderr)


class SubmitCommand(NamedTuple):
    """One submission: the argv, the real indices it covers, and its DRE_ARRAY_OFFSET."""

    argv: list
    block: list
    offset: int


def split_blocks(indices, max_size: int) -> list:
    """Sorted unique `indices` cut into blocks spanning fewer than `max_size` indices each
    (``last - first < max_size``), so every offset-relative array index is below `max_size`."""
    blocks = []
    for index in sorted({int(i) for i in indices}):
        if index < 0:
            raise ValueError(f"negative array index {index}")
        if blocks and index - blocks[-1][0] < max_size:
            blocks[-1].append(index)
        else:
            blocks.append([index])
    return blocks


def contiguous_runs(indices) -> list:
    """Sorted unique `indices` as ``[(first, last), ...]`` runs of consecutive integers."""
    runs = []
    for index in sorted(set(indices)):
        if runs and index == runs[-1][1] + 1:
            runs[-1][1] = index
        else:
            runs.append([index, index])
    return [tuple(r) for r in runs]


def array_spec(indices) -> str:
    """Array indices as ranges: ``[0, 1, 2, 5, 7, 8]`` -> ``0-2,5,7-8``."""
    return ",".join(f"{a}-{b}" if b > a else f"{a}" for a, b in contiguous_runs(indices))


def env_list(env: dict, what: str) -> str:
    """``K=V,K=V`` for --export / -v; values must not hold commas, quotes or line breaks."""
    for key, value in env.items():
        if any(c in f"{key}={value}" for c in ",\n\r'\""):
            raise SchedulerError(f"{what}: cannot pass {key}={value!r} (no commas, quotes or line breaks)")
    return ",".join(f"{k}={v}" for k, v in env.items())


class Scheduler:
    """Base class: ``name``, ``template`` and ``log_dir`` (relative, created before a submission)
    per subclass, which implements `_command`, `dependency_id`, `parse_job_id` and `active`."""

    name = ""
    template = ""
    log_dir = None
    program = ""                # the submit program, for "not installed" messages

    def __init__(self, config, rundir):
        self.config, self.rundir = config, rundir

    @property
    def max_array_size(self) -> int:
        return int(self.config.scheduler["max_array_size"])

    def script(self, stage: str) -> str:
        return f"scripts/{stage}.sh"

    def blocks(self, indices) -> list:
        return split_blocks(indices, self.max_array_size)

    def submit_commands(self, stage, indices, job_name, env, after=None) -> list:
        """`SubmitCommand` ``(argv, block, offset)`` per block of `indices`, submitting
        ``scripts/<stage>.sh`` as an array with `env` and ``DRE_ARRAY_OFFSET`` exported, depending
        (afterok) on the ids in `after` (from `dependency_id`)."""
        commands = []
        for block in self.blocks(indices):
            offset = block[0]
            relative = [i - offset for i in block]
            full_env = {**{str(k): str(v) for k, v in (env or {}).items()}, "DRE_ARRAY_OFFSET": str(offset)}
            argv = self._command(stage, relative, job_name, full_env, list(after or []))
            commands.append(SubmitCommand(argv, block, offset))
        return commands

    def _command(self, stage, relative, job_name, env, after) -> list:
        raise NotImplementedError

    def dependency_id(self, job_id: str, index: int) -> str:
        raise NotImplementedError

    def parse_job_id(self, stdout: str, argv) -> str:
        raise NotImplementedError

    def active(self, job_ids) -> dict:
        raise NotImplementedError

    def being_cancelled(self, job_id: str) -> bool:
        """Whether job (array element) `job_id`, which asks about itself while it ends, is being
        cancelled by a user rather than stopped by its walltime or a signal; then it must not
        resubmit itself. False where the scheduler cannot tell."""
        return False

    def log_file(self, job_id: str, index) -> str | None:
        """The scheduler's own log of array element `index` of `job_id`, relative to the run
        directory, where the scheduler writes one and it exists; None otherwise."""
        return None

    # -- running commands ------------------------------------------------------------------
    def run_command(self, argv, timeout=SUBMIT_TIMEOUT, ok_codes=(0,)) -> subprocess.CompletedProcess:
        """Run `argv` in the run directory; a SchedulerError when missing, too slow or failing."""
        argv = [str(a) for a in argv]
        if shutil.which(argv[0]) is None:
            raise SchedulerError(f"command `{argv[0]}` not found: the {self.name} scheduler needs it "
                                 f"on PATH (run dre-batch on a login node of the cluster, load its "
                                 f"module, or set scheduler.name in the run config)", argv, None, "")
        try:
            proc = subprocess.run(argv, cwd=self.rundir.root, capture_output=True, text=True,
                                  timeout=timeout)
        except subprocess.TimeoutExpired:
            raise SchedulerError(f"command `{shlex.join(argv)}` did not answer within {timeout} s",
                                 argv, None, "") from None
        except OSError as exc:
            raise SchedulerError(f"command `{shlex.join(argv)}` could not run: {exc}", argv, None, "") from None
        if proc.returncode not in ok_codes:
            raise SchedulerError.failed(argv, proc.returncode, proc.stderr)
        return proc

    def submit(self, argv) -> str:
        """Run one submit command (cwd = run directory) and return the job id it printed."""
        if self.log_dir:
            (self.rundir.root / self.log_dir).mkdir(parents=True, exist_ok=True)
        proc = self.run_command(argv)
        return self.parse_job_id(proc.stdout, argv)
