"""The real single-host SLURM cluster of the test suite (``bin/slurm-single-host``) seen from Python.

``start_cluster(state_dir)`` starts a private slurmctld + slurmd + munged whose every file lives in
``state_dir`` and returns a :class:`SlurmCluster`; the ``slurm_cluster`` fixture in ``conftest.py``
starts one per test session. Clients reach it only through ``SLURM_CONF``: pass ``cluster.env`` to
every subprocess that runs ``sbatch``, ``squeue``, ``scancel``, ``scontrol`` or ``qsub``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence, Union

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bin" / "slurm-single-host"

#: Client and daemon programs the cluster needs (Debian packages slurm-wlm and munge).
NEEDED = ("sbatch", "squeue", "scancel", "scontrol", "sinfo", "slurmctld", "slurmd", "munged", "munge")

#: Job states after which a job never runs again (``squeue -t all`` keeps them for MinJobAge = 1 h).
FINAL_STATES = frozenset({
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY",
    "BOOT_FAIL", "DEADLINE", "SPECIAL_EXIT", "REVOKED",
})

JobIds = Union[str, int, Iterable[Union[str, int]]]


class SlurmStartError(RuntimeError):
    """``bin/slurm-single-host start`` failed; the message holds its output and the daemons' logs."""


def _which(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for folder in ("/usr/sbin", "/sbin", "/usr/local/sbin"):
        path = os.path.join(folder, name)
        if os.access(path, os.X_OK):
            return path
    return None


def missing_programs() -> list[str]:
    return [name for name in NEEDED if _which(name) is None]


def skip_reason() -> str | None:
    """Why the cluster cannot run here, or None. Only a non-root user is a reason to skip.

    As root (CI, where ``make test`` runs ``bin/install-system-packages`` first) missing packages are
    a failure, not a skip: the start then fails with the list of what is missing.
    """
    if os.geteuid() == 0:
        return None
    missing = missing_programs()
    what = f"; also missing: {', '.join(missing)} (apt-get install slurm-wlm munge)" if missing else ""
    return ("the single-host SLURM cluster needs root (slurmd launches the jobs, SlurmUser=root): "
            f"run the tests as root, as CI does{what}")


def _job_list(job_ids: JobIds) -> list[str]:
    if isinstance(job_ids, (str, int)):
        job_ids = [job_ids]
    ids = [str(j).strip() for j in job_ids]
    if not ids or not all(ids):
        raise ValueError(f"no job ids given: {job_ids!r}")
    return ids


@dataclass
class SlurmCluster:
    """A running single-host cluster.

    Attributes: ``state_dir`` (every file of the cluster), ``conf`` (its slurm.conf),
    ``cluster_env`` (what ``start`` printed, e.g. ``{"SLURM_CONF": ...}``).
    """

    state_dir: Path
    cluster_env: dict = field(default_factory=dict)

    @property
    def conf(self) -> Path:
        return Path(self.cluster_env["SLURM_CONF"])

    @property
    def env(self) -> dict:
        """``os.environ`` (as it is now) plus ``SLURM_CONF``: pass to every subprocess using SLURM."""
        return {**os.environ, **self.cluster_env}

    # -- running commands -------------------------------------------------------------------------
    def run(self, args: Sequence[str], *, cwd: str | os.PathLike | None = None,
            check: bool = True, env: Mapping[str, str] | None = None,
            timeout: float = 30.0) -> subprocess.CompletedProcess:
        """Run a SLURM client command against this cluster (text output captured)."""
        full_env = self.env if env is None else {**self.env, **env}
        proc = subprocess.run(list(args), cwd=cwd, env=full_env, capture_output=True, text=True,
                              timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(map(str, args))} exited {proc.returncode}\n"
                               f"stdout: {proc.stdout}\nstderr: {proc.stderr}")
        return proc

    def sbatch(self, *args: str, cwd: str | os.PathLike | None = None,
               env: Mapping[str, str] | None = None) -> str:
        """``sbatch --parsable ARGS``; returns the job id (for an array, the array's job id)."""
        out = self.run(["sbatch", "--parsable", *args], cwd=cwd, env=env).stdout.strip()
        return out.split(";")[0]

    def scancel(self, job_ids: JobIds) -> None:
        self.run(["scancel", *_job_list(job_ids)])

    # -- asking about jobs ------------------------------------------------------------------------
    def active(self, job_ids: JobIds) -> list[str]:
        """Jobs (array elements as ``ID_N``) of ``job_ids`` that are pending, running or completing."""
        proc = self.run(["squeue", "-h", "-o", "%i", "-j", ",".join(_job_list(job_ids))],
                        check=False)
        if proc.returncode != 0:
            if "Invalid job id" in proc.stderr:  # purged: long finished
                return []
            raise RuntimeError(f"squeue failed: {proc.stderr.strip()}")
        return proc.stdout.split()

    def states(self, job_ids: JobIds) -> dict[str, str]:
        """State of every job and array element of ``job_ids``, finished ones included:
        ``{"12": "COMPLETED", "13_0": "FAILED", ...}`` (``squeue -t all``)."""
        proc = self.run(["squeue", "-h", "-t", "all", "-o", "%i %T",
                         "-j", ",".join(_job_list(job_ids))], check=False)
        states = {}
        for line in proc.stdout.splitlines():
            parts = line.split()
            if len(parts) == 2:
                states[parts[0]] = parts[1]
        return states

    def show_job(self, job_id: str | int) -> list[dict[str, str]]:
        """``scontrol -o show job ID`` as one dict per job (an array gives one per element)."""
        out = self.run(["scontrol", "-o", "show", "job", str(job_id)]).stdout
        jobs = []
        for line in out.splitlines():
            fields = {}
            for token in line.split():
                key, sep, value = token.partition("=")
                if sep:
                    fields[key] = value
            if fields:
                jobs.append(fields)
        return jobs

    def wait_for(self, job_ids: JobIds, timeout: float = 30.0, poll: float = 0.2) -> dict[str, str]:
        """Block until no job of ``job_ids`` is pending, running or completing (polls ``squeue``,
        which notices the end far sooner than ``sbatch --wait``). Returns :meth:`states`.
        Raises ``TimeoutError`` with the queue and the daemons' log tails after ``timeout`` s."""
        ids = _job_list(job_ids)
        deadline = time.monotonic() + timeout
        while True:
            active = self.active(ids)
            if not active:
                return self.states(ids)
            if time.monotonic() >= deadline:
                queue = self.run(["squeue", "-t", "all", "-j", ",".join(ids)], check=False).stdout
                raise TimeoutError(f"jobs {active} still active after {timeout} s\n{queue}\n"
                                   f"{self.log_tails()}")
            time.sleep(poll)

    # -- diagnostics and stopping -----------------------------------------------------------------
    def log_tails(self, lines: int = 25) -> str:
        return log_tails(self.state_dir, lines)

    def stop(self) -> None:
        stop_cluster(self.state_dir)


def log_tails(state_dir: str | os.PathLike, lines: int = 25) -> str:
    """The last lines of the daemons' logs in ``state_dir`` (for failure messages)."""
    state = Path(state_dir)
    parts = []
    for path in (state / "log" / "slurmctld.log", state / "log" / "slurmd.log",
                 state / "munge-private" / "munged.log"):
        if path.is_file():
            tail = path.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"----- last lines of {path} -----\n" + "\n".join(tail))
    return "\n".join(parts) if parts else f"(no daemon logs in {state})"


def start_cluster(state_dir: str | os.PathLike, timeout: float = 120.0) -> SlurmCluster:
    """Start the cluster in ``state_dir`` with ``bin/slurm-single-host start``.

    Raises :class:`SlurmStartError` (with the script's output and the daemons' log tails) on failure.
    """
    state = Path(state_dir)
    missing = missing_programs()
    if missing:
        raise SlurmStartError(f"cannot start the single-host SLURM: {', '.join(missing)} not found; "
                              "install them with bin/install-system-packages (make test does)")
    try:
        proc = subprocess.run([str(SCRIPT), "start", str(state)], capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        stop_cluster(state)
        raise SlurmStartError(f"{SCRIPT} start {state} took more than {timeout} s\n"
                              f"{log_tails(state)}") from exc
    if proc.returncode != 0:
        output = proc.stdout + proc.stderr
        logs = "" if "----- last lines of" in output else "\n" + log_tails(state)
        raise SlurmStartError(f"{SCRIPT} start {state} exited {proc.returncode}\n{output}{logs}")
    cluster_env = {}
    for line in proc.stdout.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.isidentifier():
            cluster_env[key] = value
    if "SLURM_CONF" not in cluster_env:
        stop_cluster(state)
        raise SlurmStartError(f"{SCRIPT} start printed no SLURM_CONF=...: {proc.stdout!r}")
    return SlurmCluster(state_dir=state, cluster_env=cluster_env)


def stop_cluster(state_dir: str | os.PathLike) -> None:
    """Cancel the cluster's jobs and stop its daemons by their pid files."""
    proc = subprocess.run([str(SCRIPT), "stop", str(state_dir)], capture_output=True, text=True,
                          timeout=60)
    if proc.returncode != 0:
        raise RuntimeError(f"{SCRIPT} stop {state_dir} exited {proc.returncode}: {proc.stderr}")


def session_cluster(tmp_path_factory):
    """Body of the session fixture ``slurm_cluster`` (conftest.py): skip only for a non-root user;
    otherwise start the cluster (a failed start fails every test using it, with the daemons' log
    tails), yield the :class:`SlurmCluster`, and stop it when the session ends."""
    import pytest
    import tempfile

    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    state = tmp_path_factory.mktemp("slurm")
    if len(str(state)) > 70:  # Unix socket paths under it must stay short (bin/slurm-single-host)
        state = Path(tempfile.mkdtemp(prefix="dre-slurm-"))
    try:
        cluster = start_cluster(state)
    except SlurmStartError as exc:
        failure = str(exc)
    else:
        failure = None
    if failure is not None:  # outside the except block: pytest would show the message twice
        pytest.fail(f"the single-host SLURM did not start:\n{failure}", pytrace=False)
    try:
        yield cluster
    finally:
        cluster.stop()
