"""Rendered job scripts executed for real with bash: the PBS script under the PBS environment it
expects, and the container wrapping.

No PBS server can run here (none is packaged for Debian 12) and Apptainer cannot be installed
(not in Debian, no binary on PyPI), so `python`, `mpiexec` and `apptainer` are stand-ins: small
bash scripts that record their arguments, working directory and one environment variable, and
(apptainer, mpiexec) then run the payload that follows their own options, as the real ones would.
"""

from __future__ import annotations

import os
import subprocess

import pytest

from dre_hpc.batch.config import resolve
from dre_hpc.batch.render import render_script
from dre_hpc.batch.rundir import RunDir
from dre_hpc.batch.schedulers import PbsScheduler

from standins import APPTAINER, LAUNCHER, PYTHON, calls, path_with, write_standin

WORKER = ["-m", "dre_hpc.batch.worker"]


def setup_run(tmp_path, overrides, scheduler, stage, python="/nonexistent/python"):
    config = resolve(None, [f"scheduler.name={scheduler}"] + overrides)
    context = {"run_name": config.run["name"], "stage": stage, "python": python,
               "job_name": f"{config.run['name']}-{stage}"}
    run = tmp_path / "run dir"
    (run / "scripts").mkdir(parents=True)
    (run / "manifest.json").write_text("{}")
    (run / "scripts" / f"{stage}.sh").write_text(render_script(config, scheduler, stage, context))
    (tmp_path / "calls").mkdir()
    (tmp_path / "home").mkdir()
    return run


def execute(tmp_path, run, stage, env, exit_code="0"):
    """Run the script like PBS does: from $HOME, by absolute path, with PBS_* set."""
    full = {k: v for k, v in os.environ.items() if k not in ("PBS_O_WORKDIR", "SLURM_SUBMIT_DIR")}
    full.update(STANDIN_LOG=str(tmp_path / "calls"), STANDIN_EXIT=exit_code, PATH=path_with(tmp_path / "bin"),
                **env)
    return subprocess.run(["bash", str(run / "scripts" / f"{stage}.sh")], cwd=tmp_path / "home",
                          env=full, capture_output=True, text=True, timeout=60)


def test_pbs_script_runs_the_worker_in_the_run_directory(tmp_path):
    python = write_standin(tmp_path / "bin", "python-host", PYTHON)
    run = setup_run(tmp_path, ["resources.prep.prologue=echo prologue in $(pwd)"], "pbs", "prep", str(python))
    env = {"PBS_O_WORKDIR": str(run), "PBS_ARRAY_INDEX": "2", "PBS_JOBID": "123[2].pbs01",
           "STANDIN_ENV": "PBS_ARRAY_INDEX"}
    proc = execute(tmp_path, run, "prep", env, exit_code="5")
    assert proc.returncode == 5, proc.stderr
    assert proc.stdout == f"prologue in {run}\n"
    recorded = calls(tmp_path / "calls")
    assert [c["argv"][1:] for c in recorded] == [WORKER + ["prep", "."],
                                                WORKER + ["finish", "prep", ".", "--exit-code", "5"]]
    assert all(c["cwd"] == str(run) and c["env"] == "2" for c in recorded)


def test_pbs_script_under_the_torque_qsub_of_slurm(tmp_path):
    """slurm-wlm-torque's qsub sets no PBS_* variables: the script falls back to SLURM_SUBMIT_DIR."""
    python = write_standin(tmp_path / "bin", "python-host", PYTHON)
    run = setup_run(tmp_path, [], "pbs", "fit", str(python))
    proc = execute(tmp_path, run, "fit", {"SLURM_SUBMIT_DIR": str(run), "SLURM_ARRAY_TASK_ID": "1"})
    assert proc.returncode == 0, proc.stderr
    assert [(c["argv"][3], c["cwd"]) for c in calls(tmp_path / "calls")] == [("fit", str(run)), ("finish", str(run))]


def test_pbs_script_without_workdir_fails_clearly(tmp_path):
    run = setup_run(tmp_path, [], "pbs", "fit")
    proc = execute(tmp_path, run, "fit", {})
    assert proc.returncode != 0 and "neither PBS_O_WORKDIR nor SLURM_SUBMIT_DIR is set" in proc.stderr


def test_container_wrapping_pbs_mpi(tmp_path):
    """mpiexec on the host launches apptainer, which runs the image's python (from its PATH)."""
    for name, body in (("mpiexec", LAUNCHER), ("apptainer", APPTAINER), ("python", PYTHON)):
        write_standin(tmp_path / "bin", name, body)
    image = tmp_path / "images" / "dre hpc.sif"
    overrides = [f"container.image={image}", "container.gpu=true", "container.binds=[/data, '/scr a:/scratch']",
                 "resources.fit.nodes=2", "resources.fit.ntasks_per_node=3"]
    run = setup_run(tmp_path, overrides, "pbs", "fit")
    proc = execute(tmp_path, run, "fit", {"PBS_O_WORKDIR": str(run)})
    assert proc.returncode == 0, proc.stderr
    recorded = calls(tmp_path / "calls")
    assert [c["program"] for c in recorded] == ["mpiexec", "apptainer", "python", "apptainer", "python"]
    prefix = ["exec", "--nv", "-B", "/data", "-B", "/scr a:/scratch", "--env", "PYTHONNOUSERSITE=1", str(image)]
    fit = ["python"] + WORKER + ["fit", ".", "--ranks", "6"]
    assert recorded[0]["argv"][1:] == ["-n", "6", "apptainer"] + prefix + fit
    assert recorded[1]["argv"][1:] == prefix + fit
    assert recorded[3]["argv"][1:] == prefix + ["python"] + WORKER + ["finish", "fit", ".", "--exit-code", "0"]


def test_container_wrapping_local_hostile_image_path(tmp_path):
    """An image path with a quote and ``$(...)`` reaches apptainer intact and runs nothing; with
    run.python set, that Python runs inside the image; no --nv without container.gpu."""
    for name, body in (("apptainer", APPTAINER), ("py3", PYTHON)):
        write_standin(tmp_path / "bin", name, body)
    pwned = tmp_path / "pwned"
    image = f"/img/it's $(touch {pwned}).sif"
    run = setup_run(tmp_path, [f"container.image={image}", "run.python=py3"], "local", "fit")
    full = dict(os.environ, STANDIN_LOG=str(tmp_path / "calls"), PATH=path_with(tmp_path / "bin"))
    proc = subprocess.run(["bash", "scripts/fit.sh"], cwd=run, env=full, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert not pwned.exists()
    recorded = calls(tmp_path / "calls")
    assert recorded[0]["argv"][1:] == ["exec", "--env", "PYTHONNOUSERSITE=1", image, "py3"] + WORKER + [
        "fit", ".", "--ranks", "1"]
    assert recorded[1]["program"] == "py3"


@pytest.mark.slurm
@pytest.mark.slow
def test_pbs_script_through_the_torque_qsub_of_slurm(tmp_path, slurm_cluster, monkeypatch):
    """The rendered PBS script submitted by PbsScheduler through the real qsub of slurm-wlm-torque
    (sbatch also reads the #PBS lines): both array elements run the stand-in python in the run
    directory with the real index (offset 2 + array index); `active` follows them via qstat."""
    log = tmp_path / "calls"
    python = write_standin(tmp_path / "bin", "python-host",
                           PYTHON.replace('${STANDIN_LOG:?}', str(log)).replace(
                               '${STANDIN_ENV:+${!STANDIN_ENV}}', '$DRE_ARRAY_OFFSET+$SLURM_ARRAY_TASK_ID'))
    run = setup_run(tmp_path, ["resources.prep.mem_gb=0.1"], "pbs", "prep", str(python))
    for key, value in slurm_cluster.cluster_env.items():
        monkeypatch.setenv(key, value)
    pbs = PbsScheduler(resolve(None, ["scheduler.name=pbs"]), RunDir(run))
    command = pbs.submit_commands("prep", [2, 3], "dre-prep", {})[0]
    job_id = pbs.submit(command.argv)
    slurm_cluster.wait_for([job_id.split("[")[0].split(".")[0]], timeout=60)
    recorded = calls(log)
    assert sorted((c["argv"][3], c["env"]) for c in recorded) == [
        ("finish", "2+0"), ("finish", "2+1"), ("prep", "2+0"), ("prep", "2+1")]
    assert all(c["cwd"] == str(run) for c in recorded)
