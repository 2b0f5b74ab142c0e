"""The tests find the project's commands where the project installs them (issue 14).

A command that a test looks up on the machine's PATH can pass on a machine where something else put
it there and fail on a fresh one. These checks keep the console scripts and test tools inside the
interpreter's environment and keep the tests from looking them up anywhere else.
"""

from __future__ import annotations

import configparser
import re
import sys
from pathlib import Path

from helpers import env_command

ROOT = Path(__file__).resolve().parents[1]
TEST_TOOLS = ("shellcheck",)  # console scripts of the test extra that the tests run


def console_scripts() -> list[str]:
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    lines = config["options.entry_points"]["console_scripts"].strip().splitlines()
    return [line.split("=")[0].strip() for line in lines]


def lookup_pattern() -> re.Pattern:
    """A PATH lookup of one of our commands: ``which("dre")`` or ``subprocess.run(["shellcheck", ...``."""
    names = "|".join(map(re.escape, console_scripts() + list(TEST_TOOLS)))
    return re.compile(r"""(?:which\(|subprocess\.\w+\(\s*\[)\s*["'](%s)["']""" % names)


def test_console_scripts_and_test_tools_are_in_the_interpreters_environment():
    names = console_scripts() + list(TEST_TOOLS)
    assert "dre" in names and "dre-batch" in names
    missing = [name for name in names if env_command(name) is None]
    assert not missing, f"not in {Path(sys.executable).parent}: {missing} (pip install -e '.[test]')"


def test_no_test_looks_up_a_project_command_on_path():
    """``shutil.which``/a bare command name for our own scripts would find a leftover global install."""
    pattern = lookup_pattern()
    offenders = []
    for path in sorted((ROOT / "tests").glob("*.py")):
        if path.name == Path(__file__).name:  # its own examples below
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                offenders.append(f"{path.name}:{number}: {line.strip()}")
    assert not offenders, "use helpers.env_command instead:\n" + "\n".join(offenders)


def test_the_lookup_check_can_fail():
    """The pattern above matches the two forms it exists to catch."""
    pattern = lookup_pattern()
    assert pattern.search('exe = shutil.which("dre")')
    assert pattern.search('subprocess.run(["shellcheck", "--shell=sh", path])')
    assert not pattern.search('subprocess.run([shellcheck(), "--shell=sh", path])')
