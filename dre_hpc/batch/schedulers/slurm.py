"""SLURM: ``sbatch --parsable --array`` submissions and ``squeue`` for what is queued or running.

Submit command (cwd = run directory, so relative paths in the script resolve there)::

    sbatch --parsable --array=0-9,12 --job-name=NAME \
        --export=ALL,DRE_TILE=3,DRE_ARRAY_OFFSET=0 [--dependency=afterok:123_4:123_5] scripts/fit.sh

``--parsable`` prints ``JOBID`` or ``JOBID;CLUSTER``. `active` runs ``squeue -h -r -o "%i %T" -j
IDS``: with ``-r`` every array element is one line, ``JOBID_INDEX STATE`` (the index inside the
submitted array, i.e. real index minus the offset). Jobs that left the queue are not listed (or,
when all are gone, squeue exits 1 with "Invalid job id specified": nothing active).
"""

from __future__ import annotations

import re

from .base import Scheduler, SchedulerError, array_spec, env_list

PENDING = {"PENDING", "CONFIGURING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD", "RESV_DEL_HOLD"}
RUNNING = {"RUNNING", "COMPLETING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT", "RESIZING"}
_JOB_ID = re.compile(r"^\d+$")
_ELEMENT = re.compile(r"^(\d+)(?:_(\d+|\[[^\]]*\]))?$")


def parse_squeue(text: str) -> dict:
    """``{(job_id, index or None): "pending"|"running"}`` from ``squeue -h -r -o "%i %T"`` output;
    finished states are left out, a non-array job has index None."""
    states = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) != 2:
            continue
        match = _ELEMENT.match(parts[0])
        state = "pending" if parts[1] in PENDING else "running" if parts[1] in RUNNING else None
        if not match or state is None:
            continue
        job, index = match.groups()
        if index is not None and index.startswith("["):      # unexpanded range (no -r): skip
            continue
        states[(job, int(index) if index is not None else None)] = state
    return states


class SlurmScheduler(Scheduler):
    """Job arrays through sbatch; scheduler logs in ``logs/slurm/``."""

    name = "slurm"
    template = "slurm.sh.j2"
    log_dir = "logs/slurm"

    def _command(self, stage, relative, job_name, env, after) -> list:
        argv = ["sbatch", "--parsable", f"--array={array_spec(relative)}", f"--job-name={job_name}",
                f"--export=ALL,{env_list(env, 'sbatch --export')}"]
        if after:
            argv.append("--dependency=afterok:" + ":".join(after))
        return argv + [self.script(stage)]

    def dependency_id(self, job_id: str, index: int) -> str:
        """``JOBID_INDEX``: one element of an array."""
        return f"{job_id}_{int(index)}"

    def being_cancelled(self, job_id: str) -> bool:
        """``squeue -h -j ID -o "%T %r"``: a job that ``scancel`` ends is COMPLETING with reason
        None while its processes get SIGTERM, one at its walltime COMPLETING with reason TimeLimit,
        one sent a signal (``--signal=B:USR1@N``, ``scancel --signal``) still RUNNING. A failing
        squeue: False (the job resubmits, as it would without this check)."""
        try:
            proc = self.run_command(["squeue", "-h", "-j", str(job_id), "-o", "%T %r"], timeout=30)
        except SchedulerError:
            return False
        words = proc.stdout.split()
        return len(words) >= 2 and words[0] in ("COMPLETING", "CANCELLED") and words[1] == "None"

    def log_file(self, job_id: str, index) -> str | None:
        """``logs/slurm/<job name>-<job id>_<index>.out`` (the script's ``--output``), if it exists."""
        if index is None:
            return None
        found = sorted((self.rundir.root / self.log_dir).glob(f"*-{job_id}_{int(index)}.out"))
        return found[0].relative_to(self.rundir.root).as_posix() if found else None

    def parse_job_id(self, stdout: str, argv) -> str:
        text = stdout.strip().splitlines()[-1].strip() if stdout.strip() else ""
        job_id = text.split(";")[0]
        if not _JOB_ID.match(job_id):
            raise SchedulerError(f"`{argv[0]}` printed {stdout.strip()!r}, not a job id", argv, 0, "")
        return job_id

    def active(self, job_ids) -> dict:
        """``{(job_id, array index): state}`` for the elements of `job_ids` still queued or running
        (a non-array job: index None)."""
        ids = sorted({str(j) for j in job_ids})
        if not ids:
            return {}
        argv = ["squeue", "-h", "-r", "-o", "%i %T", "-j", ",".join(ids)]
        proc = self.run_command(argv, ok_codes=(0, 1))
        if proc.returncode == 1:
            if "invalid job id" in proc.stderr.lower():
                return {}
            raise SchedulerError.failed(argv, proc.returncode, proc.stderr)
        wanted = set(ids)
        return {key: state for key, state in parse_squeue(proc.stdout).items() if key[0] in wanted}
