"""PBS Pro: ``qsub -J`` array submissions and ``qstat -t -f -F json`` for what is queued or running.

Submit command (cwd = run directory)::

    qsub -J 0-9 -N NAME -v DRE_TILE=3,DRE_ARRAY_OFFSET=0 [-W depend=afterok:ID[:ID]] scripts/fit.sh

PBS Pro arrays are ranges (``-J X-Y``) of at least two elements, so an index set is submitted as
one job per run of consecutive indices (each with its own offset), and a run of one index as a
plain job without ``-J`` that gets ``DRE_ARRAY_INDEX=0`` in ``-v``. qsub prints ``123[].server``
for an array and ``124.server`` for a plain job; one element of an array is ``123[4].server``.

`active` parses ``qstat -t -f -F json IDS`` (PBS Pro 18+): ``{"Jobs": {"123[4].server":
{"job_state": "Q"|"R"|...}}}``; with ``-t`` each subjob is listed. Job ids the server no longer
knows are reported on stderr ("Unknown Job Id") and left out.
"""

from __future__ import annotations

import json
import re

from .base import Scheduler, SchedulerError, contiguous_runs, env_list, split_blocks

PENDING = set("QHWT")           # queued, held, waiting, in transit
RUNNING = set("RESUB")          # running, exiting, suspended, user-suspended, array begun
_JOB_ID = re.compile(r"^\d+(\[\])?(\.[A-Za-z0-9_.-]+)?$")
_SUBJOB = re.compile(r"^(\d+)\[(\d*)\](.*)$")


def parse_qstat_json(text: str) -> dict:
    """``{(job_id, index): state}`` from ``qstat -t -f -F json``: subjobs under their array's id
    (``123[].server``) with their index, plain jobs with index 0; finished ones left out."""
    try:
        jobs = json.loads(text or "{}").get("Jobs") or {}
    except (ValueError, AttributeError) as exc:
        raise SchedulerError(f"qstat -F json printed something that is not JSON: {exc}") from None
    states = {}
    for name, info in jobs.items():
        letter = str((info or {}).get("job_state", ""))[:1]
        state = "pending" if letter in PENDING else "running" if letter in RUNNING else None
        match = _SUBJOB.match(name)
        if state is None or (match and match.group(2) == ""):      # finished, or the array itself
            continue
        if match:
            job, index, server = match.groups()
            states[(f"{job}[]{server}", int(index))] = state
        else:
            states[(name, 0)] = state
    return states


class PbsScheduler(Scheduler):
    """PBS Pro job arrays through qsub; scheduler logs in ``logs/pbs/``."""

    name = "pbs"
    template = "pbs.sh.j2"
    log_dir = "logs/pbs"

    def blocks(self, indices) -> list:
        """Runs of consecutive indices, each cut to at most ``max_array_size``."""
        blocks = []
        for first, last in contiguous_runs(int(i) for i in indices):
            blocks += split_blocks(range(first, last + 1), self.max_array_size)
        return blocks

    def _command(self, stage, relative, job_name, env, after) -> list:
        argv = ["qsub"]
        if len(relative) > 1:
            argv += ["-J", f"{relative[0]}-{relative[-1]}"]
        else:
            env = {"DRE_ARRAY_INDEX": str(relative[0]), **env}
        argv += ["-N", job_name, "-v", env_list(env, "qsub -v")]
        if after:
            argv += ["-W", "depend=afterok:" + ":".join(after)]
        return argv + [self.script(stage)]

    def dependency_id(self, job_id: str, index: int) -> str:
        """``123[4].server`` for an element of array ``123[].server``; a plain job: its own id."""
        if "[]" in job_id:
            return job_id.replace("[]", f"[{int(index)}]", 1)
        return job_id

    def parse_job_id(self, stdout: str, argv) -> str:
        job_id = stdout.strip().splitlines()[-1].strip() if stdout.strip() else ""
        if not _JOB_ID.match(job_id):
            raise SchedulerError(f"`{argv[0]}` printed {stdout.strip()!r}, not a job id", argv, 0, "")
        return job_id

    def active(self, job_ids) -> dict:
        """``{(job_id, array index): state}`` for the elements of `job_ids` still queued or running
        (a plain job: index 0)."""
        ids = sorted({str(j) for j in job_ids})
        if not ids:
            return {}
        argv = ["qstat", "-t", "-f", "-F", "json"] + ids
        proc = self.run_command(argv, ok_codes=range(0, 256))
        unknown = all("unknown job id" in line.lower() for line in proc.stderr.splitlines() if line.strip())
        if proc.returncode != 0 and not proc.stdout.strip() and not unknown:
            raise SchedulerError.failed(argv, proc.returncode, proc.stderr)
        wanted = set(ids)
        return {key: state for key, state in parse_qstat_json(proc.stdout).items() if key[0] in wanted}
