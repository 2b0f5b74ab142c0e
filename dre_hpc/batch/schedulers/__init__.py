"""Schedulers of dre-batch: SLURM, PBS Pro and the local machine behind one interface (base.py)."""

from __future__ import annotations

from .base import Scheduler, SchedulerError, SubmitCommand
from .local import LocalScheduler, LocalTask
from .pbs import PbsScheduler
from .slurm import SlurmScheduler

SCHEDULERS = {"slurm": SlurmScheduler, "pbs": PbsScheduler, "local": LocalScheduler}

__all__ = ["Scheduler", "SchedulerError", "SubmitCommand", "LocalScheduler", "LocalTask",
           "PbsScheduler", "SlurmScheduler", "SCHEDULERS", "get_scheduler"]


def get_scheduler(config, rundir, name: str | None = None) -> Scheduler:
    """The scheduler named `name` (default: the config's ``scheduler.name``) for `rundir`."""
    name = name or config.scheduler["name"]
    if name not in SCHEDULERS:
        raise SchedulerError(f"scheduler.name: {name!r} is not one of {', '.join(SCHEDULERS)}")
    return SCHEDULERS[name](config, rundir)
