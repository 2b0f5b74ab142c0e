"""Job-script rendering: golden scripts per scheduler, the filters, validation, quoting.

Golden scripts live in tests/golden/<scheduler>_<stage>.sh; regenerate them after an intended
template change with ``DRE_UPDATE_GOLDEN=1 python -m pytest tests/test_render.py`` and review
the diff. Every golden script must pass ``bash -n`` and ``shellcheck``.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import jinja2
import pytest

from dre_hpc.batch import render
from dre_hpc.batch.config import RunConfig, load_config, resolve
from dre_hpc.batch.render import RenderError, render_script
from dre_hpc.errors import DreError

from helpers import shellcheck
from standins import PYTHON, calls, write_standin

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).resolve().parent / "golden"
PY = "/opt/dre/venv/bin/python"            # a fixed host Python: golden scripts do not depend on this machine
CASES = [(s, stage) for s in ("slurm", "pbs", "local") for stage in ("prep", "fit")]


def context(config, stage, python=PY):
    name = config.run["name"]
    return {"run_name": name, "stage": stage, "python": python, "job_name": f"{name}-{stage}"}


def golden_config(scheduler):
    """The example run config of `scheduler`, with two changes so that shellcheck has nothing to
    report: the SLURM prologue quotes ``$HOME`` (it is verbatim user shell), and the PBS bind
    ``/scratch/$USER`` (which would reach apptainer literally: values are quoted, never expanded)
    names a fixed folder."""
    data = load_config(ROOT / "run_configs" / f"{scheduler}.yaml").as_dict()
    if scheduler == "slurm":
        data["resources"]["fit"]["prologue"] = data["resources"]["fit"]["prologue"].replace(
            "source $HOME/venvs/dre_hpc/bin/activate", 'source "$HOME/venvs/dre_hpc/bin/activate"')
    if scheduler == "pbs":
        data["container"]["binds"] = ["/project/data", "/scratch/dre:/scratch"]
    return RunConfig(data)


def render_example(scheduler, stage):
    config = golden_config(scheduler)
    return render_script(config, scheduler, stage, context(config, stage))


@pytest.mark.parametrize("scheduler,stage", CASES)
def test_golden(scheduler, stage):
    text = render_example(scheduler, stage)
    path = GOLDEN / f"{scheduler}_{stage}.sh"
    if os.environ.get("DRE_UPDATE_GOLDEN") == "1":
        path.write_text(text)
    assert path.is_file(), f"{path} missing: run with DRE_UPDATE_GOLDEN=1 to create it"
    assert text == path.read_text(), f"{path.name} differs from the rendered script"


@pytest.mark.parametrize("scheduler,stage", CASES)
def test_golden_scripts_are_valid_shell(scheduler, stage):
    path = GOLDEN / f"{scheduler}_{stage}.sh"
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0
    # SC1091: a file sourced by the prologue (on the cluster) cannot be followed here
    proc = subprocess.run([shellcheck(), "--shell=bash", "--exclude=SC1091", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_golden_contents():
    """What the scripts must say, independent of the exact golden text."""
    slurm = (GOLDEN / "slurm_fit.sh").read_text()
    assert "#SBATCH --gres=gpu:4\n" in slurm and "#SBATCH --time=06:00:00\n" in slurm
    assert slurm.index("#SBATCH --output=logs/slurm/%x-%A_%a.out") < slurm.index("#SBATCH --constraint=a100")
    assert f"\nsrun {PY} -m dre_hpc.batch.worker fit . --ranks 4 &\npayload=$!\n" in slurm
    assert "#SBATCH --signal=B:USR1@300\n" in slurm          # scheduler.warning_seconds, fit only
    assert "--signal" not in (GOLDEN / "slurm_prep.sh").read_text()
    assert "trap 'interrupted=1; if [ -n \"$payload\" ]; then kill -USR1 \"$payload\" 2>/dev/null; fi' " \
           "TERM USR1\n" in slurm
    pbs = (GOLDEN / "pbs_fit.sh").read_text()
    assert "#PBS -l select=2:ncpus=16:mpiprocs=16:mem=64GB\n" in pbs
    assert "\nmpiexec -n 32 apptainer exec -B /project/data -B /scratch/dre:/scratch " \
           "--env PYTHONNOUSERSITE=1 /project/containers/dre_hpc.sif python -m dre_hpc.batch.worker fit . " \
           "--ranks 32 &\n" in pbs
    lines = pbs.splitlines()
    first_command = next(i for i, line in enumerate(lines) if line and not line.startswith("#"))
    assert all(not line.startswith("#PBS") for line in lines[first_command:])
    local = (GOLDEN / "local_prep.sh").read_text()
    assert f"\n{PY} -m dre_hpc.batch.worker prep . &\n" in local          # --ranks: fit only
    assert f"\n{PY} -m dre_hpc.batch.worker finish prep . --exit-code \"$status\"\n" in local
    assert local.rstrip().endswith('exit "$status"')


# -- filters -------------------------------------------------------------------------------------
def test_walltime_filters():
    assert render.walltime_seconds("01:30:00") == 5400
    assert render.walltime_hms("1-06:00:00") == "30:00:00"
    assert render.walltime_hms("100:00:05") == "100:00:05"
    assert render.walltime_slurm("0-06:00:00") == "06:00:00"
    assert render.walltime_slurm("30:00:00") == "1-06:00:00"
    with pytest.raises(RenderError):
        render.walltime_seconds("1:60:00")


def test_memory_and_select_filters():
    assert render.mem_slurm(8) == "8G" and render.mem_slurm(0.5) == "512M"
    assert render.mem_pbs(64.0) == "64GB" and render.mem_pbs(1.5) == "1536MB"
    with pytest.raises(RenderError):
        render.mem_slurm(0)
    res = {"nodes": 2, "ntasks_per_node": 4, "cpus_per_task": 3, "mem_gb": 16, "gpus_per_node": 2}
    assert render.pbs_select(res) == "select=2:ncpus=12:mpiprocs=4:mem=16GB:ngpus=2"
    assert render.pbs_select(dict(res, mem_gb=0, gpus_per_node=0)) == "select=2:ncpus=12:mpiprocs=4"
    assert render.total_ranks(res) == 8


def test_shquote():
    assert render.shquote("plain/path-1.0") == "plain/path-1.0"
    assert render.shquote("a b") == "'a b'"
    assert render.shquote("it's $(x)") == "'it'\"'\"'s $(x)'"
    assert render.shquote(["a", "b c"]) == "a 'b c'" and render.shquote(3) == "3"
    with pytest.raises(RenderError):
        render.shquote(None)


def test_zero_memory_leaves_the_directive_out():
    config = resolve(None, ["scheduler.name=slurm", "resources.fit.mem_gb=0"])
    text = render_script(config, "slurm", "fit", context(config, "fit"))
    assert "--mem" not in text and "#SBATCH --time=04:00:00" in text


# -- errors --------------------------------------------------------------------------------------
def test_strict_undefined():
    with pytest.raises(jinja2.UndefinedError):
        render.environment().from_string("{{ nowhere }}").render()
    config = resolve()
    ctx = context(config, "fit")
    del ctx["job_name"]
    with pytest.raises(RenderError, match="job_name"):
        render_script(config, "local", "fit", ctx)


@pytest.mark.parametrize("override,scheduler,key", [
    ("resources.fit.partition=gpu q", "slurm", "resources.fit.partition"),
    ("resources.fit.account=a;rm -rf", "slurm", "resources.fit.account"),
    ("resources.fit.queue=work$q", "pbs", "resources.fit.queue"),
])
def test_bad_directive_values_name_the_key(override, scheduler, key):
    config = resolve(None, [override])
    with pytest.raises(RenderError, match=key.replace(".", r"\.")) as info:
        render_script(config, scheduler, "fit", context(config, "fit"))
    assert isinstance(info.value, DreError)


def test_newline_in_extra_directive_and_bad_walltime():
    data = resolve().as_dict()
    data["resources"]["fit"]["extra_directives"] = ["--constraint=a100\nrm -rf ~"]
    with pytest.raises(RenderError, match=r"resources\.fit\.extra_directives\[0\].*line break"):
        render_script(RunConfig(data), "slurm", "fit", context(RunConfig(data), "fit"))
    data = resolve().as_dict()
    data["resources"]["prep"]["walltime"] = "2 hours"
    with pytest.raises(RenderError, match=r"resources\.prep\.walltime"):
        render_script(RunConfig(data), "pbs", "prep", context(RunConfig(data), "prep"))


def test_warning_seconds_directive_and_its_limits():
    config = resolve(None, ["scheduler.name=slurm", "scheduler.warning_seconds=0"])
    assert "--signal" not in render_script(config, "slurm", "fit", context(config, "fit"))
    config = resolve(None, ["scheduler.name=slurm", "scheduler.warning_seconds=90"])
    assert "\n#SBATCH --signal=B:USR1@90\n" in render_script(config, "slurm", "fit", context(config, "fit"))
    config = resolve(None, ["scheduler.warning_seconds=600", "resources.fit.walltime=00:10:00"])
    with pytest.raises(RenderError, match=r"scheduler\.warning_seconds: 600 s is not shorter than "
                                          r"resources\.fit\.walltime 00:10:00"):
        render_script(config, "slurm", "fit", context(config, "fit"))
    render_script(config, "slurm", "prep", context(config, "prep"))      # prep jobs get no warning
    render_script(config, "pbs", "fit", context(config, "fit"))          # SLURM only
    config = resolve(None, ["scheduler.warning_seconds=70000", "resources.fit.walltime=2-00:00:00"])
    with pytest.raises(RenderError, match="65535"):
        render_script(config, "slurm", "fit", context(config, "fit"))


def test_pbs_job_name_must_start_with_a_letter():
    config = resolve(None, ["run.name=2024run"])
    with pytest.raises(RenderError, match="job name"):
        render_script(config, "pbs", "fit", context(config, "fit"))
    assert "--job-name=2024run-fit" in render_script(config, "slurm", "fit", context(config, "fit"))


# -- quoting: a hostile path never executes ---------------------------------------------------
def test_hostile_python_path_is_quoted_and_never_runs(tmp_path):
    """A Python path with a quote, ``$(touch ...)``, a backtick and a newline reaches the stand-in
    python intact, and nothing in it is executed."""
    pwned = tmp_path / "pwned"
    evil_dir = tmp_path / f"it's $(touch {pwned}) `touch {pwned}`\nx"
    python = write_standin(evil_dir, "python3", PYTHON)
    config = resolve(None, ["resources.fit.prologue=echo prologue-ran", "resources.fit.epilogue=echo epilogue-ran"])
    script = render_script(config, "local", "fit", context(config, "fit", str(python)))
    run = tmp_path / "run"
    (run / "scripts").mkdir(parents=True)
    (run / "manifest.json").write_text("{}")
    (run / "scripts" / "fit.sh").write_text(script)
    log = tmp_path / "calls"
    log.mkdir()
    env = dict(os.environ, STANDIN_LOG=str(log), STANDIN_EXIT="3")
    proc = subprocess.run(["bash", "scripts/fit.sh"], cwd=run, env=env, capture_output=True, text=True)
    assert proc.returncode == 3, proc.stderr
    assert not pwned.exists()
    assert proc.stdout.splitlines() == ["prologue-ran", "epilogue-ran"]
    recorded = calls(log)
    assert [c["argv"] for c in recorded] == [
        [str(python), "-m", "dre_hpc.batch.worker", "fit", ".", "--ranks", "1"],
        [str(python), "-m", "dre_hpc.batch.worker", "finish", "fit", ".", "--exit-code", "3"]]
    assert recorded[0]["cwd"] == str(run)


def test_script_refuses_a_directory_without_manifest(tmp_path):
    config = resolve()
    (tmp_path / "fit.sh").write_text(render_script(config, "local", "fit", context(config, "fit")))
    proc = subprocess.run(["bash", "fit.sh"], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 2 and "not a dre-batch run directory" in proc.stderr


# -- container.runtime: bwrap (a root filesystem folder in place of apptainer exec) --------------
def rootfs_folder(tmp_path):
    """A folder with the exec action of an image (what build_rootfs.py and apptainer --sandbox make)."""
    image = tmp_path / "image root"
    (image / ".singularity.d" / "actions").mkdir(parents=True)
    (image / ".singularity.d" / "actions" / "exec").write_text("#!/bin/sh\nexec \"$@\"\n")
    return image


def test_bwrap_runtime_enters_the_folder_with_the_image_environment(tmp_path):
    image = rootfs_folder(tmp_path)
    config = resolve(None, [f"container.image={image}", "container.runtime=bwrap",
                            "container.binds=[/data, '/x y:/mnt/x:ro', '/s:/scratch:rw']",
                            "resources.fit.ntasks_per_node=2"])
    text = render_script(config, "local", "fit", context(config, "fit"))
    prefix = (f"bwrap --ro-bind '{image}' / --dev-bind /dev /dev --proc /proc --ro-bind /sys /sys "
              "--ro-bind /etc/hosts /etc/hosts --bind /tmp /tmp --bind /var/tmp /var/tmp "
              "--bind \"$PWD\" \"$PWD\" --bind /data /data --ro-bind '/x y' /mnt/x --bind /s /scratch "
              "--chdir \"$PWD\" --setenv PYTHONNOUSERSITE 1 /.singularity.d/actions/exec python")
    assert f"\nmpirun --oversubscribe --bind-to none -n 2 {prefix} -m dre_hpc.batch.worker fit . --ranks 2 &\n" in text
    assert f"\n{prefix} -m dre_hpc.batch.worker finish fit . --exit-code \"$status\"\n" in text
    script = tmp_path / "fit.sh"
    script.write_text(text)
    proc = subprocess.run([shellcheck(), "--shell=bash", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


@pytest.mark.parametrize("override,message", [
    ("container.gpu=true", "container.gpu: true needs container.runtime apptainer"),
    ("container.binds=[/a:/b:rx]", r"container.binds: '/a:/b:rx': expected SRC\[:DST\[:ro\|rw\]\]"),
])
def test_bwrap_runtime_refuses_what_it_cannot_do(tmp_path, override, message):
    config = resolve(None, [f"container.image={rootfs_folder(tmp_path)}", "container.runtime=bwrap", override])
    with pytest.raises(RenderError, match=message):
        render_script(config, "slurm", "fit", context(config, "fit"))


def test_bwrap_runtime_needs_a_root_filesystem_folder(tmp_path):
    sif = tmp_path / "dre_hpc.sif"
    sif.write_bytes(b"SIF")
    for image, message in ((sif, "is a file; container.runtime bwrap enters a root filesystem folder"),
                           (tmp_path, "has no .singularity.d/actions/exec")):
        config = resolve(None, [f"container.image={image}", "container.runtime=bwrap"])
        with pytest.raises(RenderError, match=message):
            render_script(config, "local", "prep", context(config, "prep"))
    with pytest.raises(DreError, match="container.runtime: 'docker' is not one of apptainer, bwrap"):
        resolve(None, ["container.runtime=docker"])
