"""The job-script templates travel with an installed wheel (setup.py copies templates/ into
dre_hpc/templates): build a wheel, install it into a fresh venv and render a script from there."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("dre_hpc", "templates", "setup.py", "setup.cfg", "pyproject.toml", "README.md", "MANIFEST.in")
RENDER = """
import sys
import dre_hpc
from dre_hpc.batch.config import resolve
from dre_hpc.batch.render import render_script, template_dirs
cfg = resolve(None, ["scheduler.name=slurm", "run.name=wheel"])
sys.stderr.write(dre_hpc.__file__ + "\\n" + template_dirs()[0] + "\\n")
sys.stdout.write(render_script(cfg, "slurm", "fit", {"run_name": "wheel", "stage": "fit",
                 "python": "/py", "job_name": "wheel-fit"}))
"""


@pytest.mark.slow
def test_wheel_carries_the_templates(tmp_path):
    src = tmp_path / "src"          # a copy: the build writes build/ and *.egg-info
    src.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "dist"), str(src)], check=True, capture_output=True)
    wheel = next((tmp_path / "dist").glob("dre_hpc-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"dre_hpc/templates/{n}.sh.j2" for n in ("base", "slurm", "pbs", "local")} <= names
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                    "--ignore-installed", str(wheel)], check=True, capture_output=True)
    proc = subprocess.run([str(python), "-c", RENDER], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    module, templates = proc.stderr.splitlines()[-2:]
    assert module.startswith(str(venv)) and templates.startswith(str(venv))
    assert templates.endswith("dre_hpc/templates")
    assert "#SBATCH --job-name=wheel-fit\n" in proc.stdout
    assert "\n/py -m dre_hpc.batch.worker fit . --ranks 1 &\n" in proc.stdout
