"""The Apptainer definition containers/dre_hpc.def, checked without building it.

Apptainer cannot be installed here (not in Debian, no binary on PyPI); tests/test_container_build.py
executes the recipe without it (containers/build_rootfs.py). Here the definition is parsed with
spython (PyPI), its sections and packages are checked, and every shell section (%post,
%environment, %runscript, %test) must pass shellcheck as POSIX sh: Apptainer runs them with
/bin/sh (dash on Debian).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from spython.main.parse.parsers import SingularityParser

from helpers import shellcheck

ROOT = Path(__file__).resolve().parents[1]
DEF = ROOT / "containers" / "dre_hpc.def"
SHELL_SECTIONS = ("post", "environment", "runscript", "test")


def sections(path: Path) -> dict:
    """Raw text of each ``%section`` of a definition file, by lower-case name."""
    found, name = {}, None
    for line in path.read_text().splitlines():
        match = re.match(r"^%(\w+)", line)
        if match:
            name = match.group(1).lower()
            found[name] = []
        elif name:
            found[name].append(line)
    return {k: "\n".join(v).strip() + "\n" for k, v in found.items()}


@pytest.fixture(scope="module")
def recipe():
    return SingularityParser(str(DEF)).recipe["spython-base"]


def test_header_files_and_labels(recipe):
    text = DEF.read_text()
    assert re.search(r"^Bootstrap:\s*docker$", text, re.M)
    assert recipe.fromHeader == "debian:bookworm-slim"
    sources = {entry.split()[0] for entry in recipe.files}
    assert {"dre_hpc", "templates", "setup.py", "setup.cfg", "pyproject.toml"} <= sources
    assert all((ROOT / source).exists() for source in sources), "every %files source exists in the repo"
    assert any(label.startswith("org.opencontainers.image.title dre_hpc") for label in recipe.labels)


def test_post_installs_tools_and_builds_mpi4py_against_the_image_mpi(recipe):
    post = "\n".join(recipe.install)
    for package in ("source-extractor", "psfex", "openmpi-bin", "libopenmpi-dev", "python3-venv",
                    "python3-dev", "build-essential"):
        assert package in post
    assert "python3 -m venv /opt/venv" in post
    assert "--no-binary mpi4py mpi4py" in post
    assert re.search(r"pip install .*/opt/src/dre_hpc$", post, re.M)


def test_environment_runscript_and_test(recipe):
    assert "PYTHONNOUSERSITE=1" in recipe.environ
    assert any(e.startswith("PATH=") and "/opt/venv/bin" in e for e in recipe.environ)
    raw = sections(DEF)
    assert 'exec "$@"' in raw["runscript"]
    for command in ("source-extractor --version", "psfex --version", "import dre_hpc, mpi4py"):
        assert command in raw["test"]


@pytest.mark.parametrize("section", SHELL_SECTIONS)
def test_shell_sections_pass_shellcheck(section, tmp_path):
    text = sections(DEF)[section]
    script = tmp_path / f"{section}.sh"
    script.write_text("#!/bin/sh\n" + text)
    proc = subprocess.run([shellcheck(), "--shell=sh", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout
    assert subprocess.run(["sh", "-n", str(script)]).returncode == 0


def test_shellcheck_catches_a_broken_section(tmp_path):
    """The check above can fail: an unquoted expansion in a section is reported."""
    script = tmp_path / "bad.sh"
    script.write_text("#!/bin/sh\nrm -rf $TARGET/*\n")
    assert subprocess.run([shellcheck(), "--shell=sh", str(script)], capture_output=True).returncode != 0
