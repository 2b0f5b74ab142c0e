"""The local scheduler: job scripts run here as subprocesses, at most ``max_parallel`` at once.

There is nothing to submit: `LocalScheduler.run` starts ``bash scripts/<stage>.sh`` per task
(cwd = run directory, the task's environment on top of ours, stdout and stderr appended to the
task's log), keeps at most ``scheduler.max_parallel`` (None: the CPU count) running, and asks
``follow(task, returncode)`` for more tasks when one ends (the fits of a tile after its prep).
Ctrl-C (KeyboardInterrupt) terminates the running scripts (their whole process groups) first.

`submit_commands` gives the equivalent command lines (``env DRE_ARRAY_INDEX=3 ... bash
scripts/prep.sh``, one per index) so ``run --dry-run`` can print them. A local run's job id is
``local-<pid of the dre-batch process>``; `active` reports ``(job_id, None): "running"`` while
that process is alive (the status code tells pending from running by the started markers).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from .. import environment
from .base import Scheduler, SchedulerError, SubmitCommand

POLL = 0.05           # seconds between checks of the running scripts
GRACE = 5.0           # seconds between SIGTERM and SIGKILL on Ctrl-C


@dataclass
class LocalTask:
    """One script run: `key` (any hashable, returned with the exit code), `stage` (runs
    ``scripts/<stage>.sh``), `env` (added to the environment), `log` (stdout+stderr, appended)."""

    key: object
    stage: str
    env: dict
    log: Path
    tile_index: int | None = None
    started: float | None = field(default=None, compare=False)
    attempt: int = 1              # 2, 3, ...: an automatic retry (local_run)


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists on this host and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


class LocalScheduler(Scheduler):
    """Runs the job scripts on this machine."""

    name = "local"
    template = "local.sh.j2"

    @property
    def job_id(self) -> str:
        return f"local-{os.getpid()}"

    @property
    def max_parallel(self) -> int:
        return int(self.config.scheduler["max_parallel"] or os.cpu_count() or 1)

    def submit_commands(self, stage, indices, job_name, env, after=None) -> list:
        """``env DRE_ARRAY_INDEX=i [env...] DRE_JOB_ID=local-PID bash scripts/<stage>.sh`` per index."""
        extra = [f"{k}={v}" for k, v in (env or {}).items()]
        return [SubmitCommand(["env", f"DRE_ARRAY_INDEX={i}", *extra, f"DRE_JOB_ID={self.job_id}",
                               "bash", self.script(stage)], [i], 0)
                for i in sorted({int(i) for i in indices})]

    def dependency_id(self, job_id: str, index: int) -> str:
        return str(job_id)

    def submit(self, argv) -> str:
        raise SchedulerError("the local scheduler does not submit jobs: it runs them with "
                             "LocalScheduler.run", argv)

    def active(self, job_ids) -> dict:
        """``{(job_id, None): "running"}`` for each ``local-<pid>`` whose process is alive."""
        states = {}
        for job_id in job_ids:
            prefix, _, pid = str(job_id).partition("-")
            if prefix == "local" and pid.isdigit() and pid_alive(int(pid)):
                states[(str(job_id), None)] = "running"
        return states

    # -- running -----------------------------------------------------------------------------
    def _start(self, task: LocalTask):
        log = Path(task.log)
        self.rundir.check_inside(log)           # never append to a file through a planted link
        log.parent.mkdir(parents=True, exist_ok=True)
        handle = open(log, "ab")
        env = environment.child_env({"DRE_JOB_ID": self.job_id, **task.env})
        try:
            proc = subprocess.Popen(["bash", self.script(task.stage)], cwd=self.rundir.root, env=env,
                                    stdin=subprocess.DEVNULL, stdout=handle, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        except OSError:
            handle.close()
            raise
        task.started = time.time()
        return proc, handle

    def run(self, tasks, follow=None) -> dict:
        """Run `tasks` (and those `follow` adds) with at most `max_parallel` at once; returns
        ``{task.key: exit code}`` in completion order."""
        queue, running, codes = deque(tasks), {}, {}
        try:
            while queue or running:
                while queue and len(running) < self.max_parallel:
                    task = queue.popleft()
                    running[task.key] = (task, *self._start(task))
                for key, (task, proc, handle) in list(running.items()):
                    if proc.poll() is None:
                        continue
                    handle.close()
                    del running[key]
                    codes[key] = proc.returncode
                    queue.extend((follow(task, proc.returncode) or []) if follow else [])
                if running:
                    time.sleep(POLL)
        except BaseException:
            _stop_all(running.values())
            raise
        return codes


def _stop_all(entries) -> None:
    """SIGTERM every running script's process group, SIGKILL what is left after `GRACE`."""
    entries = list(entries)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for _, proc, _ in entries:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    pass
        deadline = time.time() + GRACE
        while time.time() < deadline and any(p.poll() is None for _, p, _ in entries):
            time.sleep(POLL)
    for _, proc, handle in entries:
        proc.poll()
        handle.close()
