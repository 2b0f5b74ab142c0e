"""Schedulers: SLURM and PBS command building, job-id and queue parsing, submit through stand-in
programs (sbatch, squeue, qsub, qstat cannot run without a cluster; the real SLURM run is in
test_slurm_cluster.py), and the local scheduler running real bash scripts."""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest

from dre_hpc.batch.config import resolve
from dre_hpc.batch.rundir import RunDir
from dre_hpc.batch.schedulers import (LocalScheduler, LocalTask, PbsScheduler, SchedulerError,
                                      SlurmScheduler, get_scheduler)
from dre_hpc.batch.schedulers.base import array_spec, split_blocks
from dre_hpc.batch.schedulers.local import pid_alive
from dre_hpc.batch.schedulers.pbs import parse_qstat_json
from dre_hpc.batch.schedulers.slurm import parse_squeue

from standins import write_standin


def make(cls, tmp_path, *overrides):
    return cls(resolve(None, list(overrides)), RunDir(tmp_path))


def test_blocks_and_array_specs():
    assert split_blocks([5, 0, 1, 2, 3, 4, 9, 1], 4) == [[0, 1, 2, 3], [4, 5], [9]]
    assert split_blocks(range(2500), 1000) == [list(range(0, 1000)), list(range(1000, 2000)),
                                               list(range(2000, 2500))]
    assert array_spec([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"


def test_get_scheduler(tmp_path):
    assert isinstance(get_scheduler(resolve(None, ["scheduler.name=pbs"]), RunDir(tmp_path)), PbsScheduler)
    assert get_scheduler(resolve(), RunDir(tmp_path)).name == "local"
    with pytest.raises(SchedulerError, match="torque"):
        get_scheduler(resolve(), RunDir(tmp_path), "torque")


# -- SLURM ---------------------------------------------------------------------------------------
def test_slurm_commands_blocks_offsets_dependencies(tmp_path):
    slurm = make(SlurmScheduler, tmp_path, "scheduler.max_array_size=4")
    commands = slurm.submit_commands("fit", [12, 0, 1, 2, 3, 4, 6, 9, 10], "r-fit-t", {"DRE_TILE": 3},
                                     after=[slurm.dependency_id("77", 2)])
    assert [(c.block, c.offset) for c in commands] == [([0, 1, 2, 3], 0), ([4, 6], 4), ([9, 10, 12], 9)]
    assert commands[2].argv == ["sbatch", "--parsable", "--array=0-1,3", "--job-name=r-fit-t",
                                "--export=ALL,DRE_TILE=3,DRE_ARRAY_OFFSET=9",
                                "--dependency=afterok:77_2", "scripts/fit.sh"]
    argv, block, offset = commands[1]
    assert argv[2] == "--array=0,2" and "--export=ALL,DRE_TILE=3,DRE_ARRAY_OFFSET=4" in argv
    prep = slurm.submit_commands("prep", [0, 1], "r-prep", {})
    assert prep[0].argv == ["sbatch", "--parsable", "--array=0-1", "--job-name=r-prep",
                            "--export=ALL,DRE_ARRAY_OFFSET=0", "scripts/prep.sh"]
    two = slurm.submit_commands("fit", [0], "x", {}, after=["5_1", "5_2"])
    assert "--dependency=afterok:5_1:5_2" in two[0].argv


def test_slurm_rejects_env_that_would_break_export(tmp_path):
    with pytest.raises(SchedulerError, match="commas"):
        make(SlurmScheduler, tmp_path).submit_commands("fit", [0], "x", {"DRE_TILE": "1,2"})


def test_slurm_job_id_and_squeue_parsing(tmp_path):
    slurm = make(SlurmScheduler, tmp_path)
    assert slurm.parse_job_id("4242\n", ["sbatch"]) == "4242"
    assert slurm.parse_job_id("4243;cluster2\n", ["sbatch"]) == "4243"
    with pytest.raises(SchedulerError, match="not a job id"):
        slurm.parse_job_id("sbatch: warning\n", ["sbatch"])
    text = "4242_0 RUNNING\n4242_3 PENDING\n4242_4 COMPLETING\n4243 CONFIGURING\n4244_1 COMPLETED\n"
    assert parse_squeue(text) == {("4242", 0): "running", ("4242", 3): "pending",
                                  ("4242", 4): "running", ("4243", None): "pending"}


def test_slurm_submit_and_active_through_stand_ins(tmp_path, monkeypatch):
    """Stand-in sbatch/squeue: submit runs in the run directory, creates the log folder, parses
    the id; active maps elements; a purged job (squeue exit 1, invalid id) is not active."""
    bin_dir, run = tmp_path / "bin", tmp_path / "run"
    run.mkdir()
    write_standin(bin_dir, "sbatch", f'pwd > {tmp_path}/cwd\nprintf "%s\\n" "$@" > {tmp_path}/args\necho "981;main"\n')
    write_standin(bin_dir, "squeue", f'printf "%s\\n" "$@" > {tmp_path}/qargs\n'
                  'case "$*" in *99*) echo "slurm_load_jobs error: Invalid job id specified" >&2; exit 1;; esac\n'
                  'printf "981_0 RUNNING\\n981_1 PENDING\\n555_0 RUNNING\\n"\n')
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    slurm = SlurmScheduler(resolve(), RunDir(run))
    argv = slurm.submit_commands("prep", [0, 1], "r-prep", {})[0].argv
    assert slurm.submit(argv) == "981"
    assert (tmp_path / "cwd").read_text().strip() == str(run) and (run / "logs" / "slurm").is_dir()
    assert (tmp_path / "args").read_text().split("\n")[:3] == ["--parsable", "--array=0-1", "--job-name=r-prep"]
    assert slurm.active(["981"]) == {("981", 0): "running", ("981", 1): "pending"}
    assert (tmp_path / "qargs").read_text().split() == ["-h", "-r", "-o", "%i", "%T", "-j", "981"]
    assert slurm.active(["99"]) == {} and slurm.active([]) == {}


def test_submit_failure_and_missing_program(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    write_standin(bin_dir, "sbatch", 'echo "sbatch: error: Batch job submission failed: Invalid account" >&2\nexit 1\n')
    monkeypatch.setenv("PATH", str(bin_dir))
    slurm = make(SlurmScheduler, tmp_path)
    with pytest.raises(SchedulerError, match="exited with code 1: sbatch: error: .*Invalid account") as info:
        slurm.submit(["sbatch", "--parsable", "scripts/fit.sh"])
    assert info.value.returncode == 1 and info.value.command[0] == "sbatch" and "Invalid" in info.value.stderr
    with pytest.raises(SchedulerError, match="`squeue` not found") as info:
        slurm.active(["1"])
    assert info.value.exit_code == 2
    with pytest.raises(SchedulerError, match="`qsub` not found"):
        make(PbsScheduler, tmp_path).submit(["qsub", "scripts/fit.sh"])


# -- PBS -----------------------------------------------------------------------------------------
def test_pbs_commands_ranges_and_single_elements(tmp_path):
    pbs = make(PbsScheduler, tmp_path, "scheduler.max_array_size=3")
    commands = pbs.submit_commands("fit", [0, 1, 2, 3, 4, 7, 9, 10], "r-fit", {"DRE_TILE": 5},
                                   after=[pbs.dependency_id("123[].srv", 4)])
    assert [(c.block, c.offset) for c in commands] == [([0, 1, 2], 0), ([3, 4], 3), ([7], 7), ([9, 10], 9)]
    assert commands[0].argv == ["qsub", "-J", "0-2", "-N", "r-fit", "-v", "DRE_TILE=5,DRE_ARRAY_OFFSET=0",
                                "-W", "depend=afterok:123[4].srv", "scripts/fit.sh"]
    assert commands[2].argv == ["qsub", "-N", "r-fit", "-v", "DRE_ARRAY_INDEX=0,DRE_TILE=5,DRE_ARRAY_OFFSET=7",
                                "-W", "depend=afterok:123[4].srv", "scripts/fit.sh"]
    assert commands[3].argv[1:3] == ["-J", "0-1"]
    assert pbs.dependency_id("124.srv", 0) == "124.srv"
    assert "-W" not in pbs.submit_commands("prep", [0, 1], "p", {})[0].argv


def test_pbs_job_id_and_qstat_parsing(tmp_path):
    pbs = make(PbsScheduler, tmp_path)
    assert pbs.parse_job_id("123[].pbs01\n", ["qsub"]) == "123[].pbs01"
    assert pbs.parse_job_id("124.pbs01\n", ["qsub"]) == "124.pbs01"
    with pytest.raises(SchedulerError):
        pbs.parse_job_id("qsub: Bad UID\n", ["qsub"])
    text = json.dumps({"pbs_version": "2022.1", "Jobs": {
        "123[].pbs01": {"job_state": "B"}, "123[0].pbs01": {"job_state": "R"},
        "123[1].pbs01": {"job_state": "Q"}, "123[2].pbs01": {"job_state": "X"},
        "124.pbs01": {"job_state": "H"}, "125.pbs01": {"job_state": "F"}}})
    assert parse_qstat_json(text) == {("123[].pbs01", 0): "running", ("123[].pbs01", 1): "pending",
                                      ("124.pbs01", 0): "pending"}


def test_pbs_active_through_stand_in_qstat(tmp_path, monkeypatch):
    jobs = {"Jobs": {"7[0].s": {"job_state": "R"}, "7[1].s": {"job_state": "Q"}}}
    write_standin(tmp_path / "bin", "qstat", f"echo '{json.dumps(jobs)}'\necho 'qstat: Unknown Job Id 6[].s' >&2\nexit 153\n")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    pbs = make(PbsScheduler, tmp_path)
    assert pbs.active(["7[].s", "6[].s"]) == {("7[].s", 0): "running", ("7[].s", 1): "pending"}


# -- local ---------------------------------------------------------------------------------------
SLEEPER = """#!/bin/bash
echo "start $(date +%s.%N)" >> "times/$KEY"
sleep "${SLEEP:-0.3}"
echo "stop $(date +%s.%N)" >> "times/$KEY"
echo "log of $KEY"
exit "${CODE:-0}"
"""


def local_run(tmp_path, max_parallel):
    run = tmp_path / "run"
    (run / "scripts").mkdir(parents=True)
    (run / "times").mkdir()
    (run / "scripts" / "work.sh").write_text(SLEEPER)
    (run / "scripts" / "prep.sh").write_text(SLEEPER)
    return LocalScheduler(resolve(None, [f"scheduler.max_parallel={max_parallel}"]), RunDir(run)), run


def task(run, key, stage="work", **env):
    return LocalTask(key=key, stage=stage, env={"KEY": key, **env}, log=run / "logs" / f"{key}.log")


def test_local_runs_at_most_max_parallel(tmp_path):
    local, run = local_run(tmp_path, 2)
    tasks = [task(run, f"t{i}", CODE=str(i % 3)) for i in range(6)]
    codes = local.run(tasks)
    assert codes == {f"t{i}": i % 3 for i in range(6)}
    spans = []
    for i in range(6):
        lines = dict(line.split() for line in (run / "times" / f"t{i}").read_text().splitlines())
        spans.append((float(lines["start"]), float(lines["stop"])))
    events = sorted([(a, 1) for a, _ in spans] + [(b, -1) for _, b in spans])
    level = peak = 0
    for _, step in events:
        level += step
        peak = max(peak, level)
    assert peak == 2
    assert (run / "logs" / "t4.log").read_text() == "log of t4\n"


def test_local_follow_adds_tasks_and_env_reaches_the_script(tmp_path):
    local, run = local_run(tmp_path, 3)
    (run / "scripts" / "env.sh").write_text('echo "$DRE_JOB_ID $DRE_TILE $(pwd)"\n')
    seen = []

    def follow(done, code):
        seen.append((done.key, code))
        if done.stage == "prep":
            return [LocalTask(key=f"fit{k}", stage="env", env={"DRE_TILE": "4"}, log=run / f"fit{k}.log")
                    for k in range(2)]
        return []

    codes = local.run([task(run, "p", stage="prep", SLEEP="0.05")], follow=follow)
    assert set(codes) == {"p", "fit0", "fit1"} and seen[0] == ("p", 0)
    assert (run / "fit1.log").read_text() == f"local-{os.getpid()} 4 {run}\n"


def test_local_interrupt_kills_running_scripts(tmp_path):
    local, run = local_run(tmp_path, 2)
    (run / "scripts" / "long.sh").write_text("echo $$ > long.pid\nsleep 60\n")

    def follow(done, code):
        raise KeyboardInterrupt

    start = time.time()
    with pytest.raises(KeyboardInterrupt):
        local.run([LocalTask("long", "long", {}, run / "long.log"), task(run, "short", SLEEP="0.5")],
                  follow=follow)
    assert time.time() - start < 10
    pid = int((run / "long.pid").read_text())
    assert not pid_alive(pid)


def test_local_active_and_dry_run_commands(tmp_path):
    local, run = local_run(tmp_path, 1)
    dead = subprocess.Popen(["true"])
    dead.wait()
    me = f"local-{os.getpid()}"
    assert local.active([me, f"local-{dead.pid}", "123"]) == {(me, None): "running"}
    commands = local.submit_commands("fit", [3, 1], "x", {"DRE_TILE": "2"})
    assert [c.argv for c in commands][0] == ["env", "DRE_ARRAY_INDEX=1", "DRE_TILE=2", f"DRE_JOB_ID={me}",
                                             "bash", "scripts/fit.sh"]
    assert [c.block for c in commands] == [[1], [3]]
    with pytest.raises(SchedulerError, match="does not submit"):
        local.submit(commands[0].argv)
