"""This machine's pip configuration, handed to pip inside the build sandbox.

The recipe's %post installs from a package index with pip; inside the root filesystem pip must
reach it as the host's pip does (index URLs, local indexes, a CA bundle for a proxy, constraints),
and none of that may be written into the repository. `host_pip_setup(workdir)` reads the host's
resolved settings (``pip config list``: its config files and ``PIP_*`` variables) and writes them
as one ``pip.conf`` into `workdir`, which the sandbox sees at `SANDBOX_DIR`:

- a local *file* named by a setting (``cert``, ``constraint``, ...) is copied into `workdir` and
  the setting points to the copy (the rootfs has its own file at the host's path, e.g. the CA
  bundle of its ca-certificates package);
- a local *folder* (``find-links``, a ``file://`` index) is bound read-only at its own path; for
  an index, its parent folder, since the pages of a local index link to their files relatively
  (``ROOT/simple/NAME/`` to ``../../files/``).
"""

from __future__ import annotations

import ast
import configparser
import shutil
import subprocess
import sys
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

SANDBOX_DIR = "/tmp/dre-build/pip"


@dataclass(frozen=True)
class PipSetup:
    config: Path            # the pip.conf written into workdir (PIP_CONFIG_FILE in the sandbox)
    folders: tuple          # host folders to bind read-only at their own path


def host_settings() -> dict:
    """``{(section, key): value}`` of the host's pip, environment variables over config files."""
    proc = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True)
    files, env = {}, {}
    for line in proc.stdout.splitlines():
        name, sep, value = line.partition("=")
        section, _, key = name.rpartition(".")
        if not sep or not section:
            continue
        value = ast.literal_eval(value)
        if section == ":env:":
            env[("global", key)] = value
        else:
            files[(section, key)] = value
    return {**files, **env}


def _localise(token: str, workdir: Path, copied: list, folders: set) -> str:
    """`token` with a local file replaced by its copy in `workdir`; folders are kept and noted."""
    is_url = token.startswith("file://")
    path = Path(urllib.parse.urlparse(token).path) if is_url else Path(token)
    if not path.is_absolute() or not path.exists():
        return token
    if path.is_dir():
        folders.add(str(path.parent if is_url and path.parent != path.parent.parent else path))
        return token
    name = f"{len(copied)}-{path.name}"
    shutil.copyfile(path, workdir / name)
    copied.append(name)
    inside = f"{SANDBOX_DIR}/{name}"
    return f"file://{inside}" if is_url else inside


def host_pip_setup(workdir, settings: dict | None = None) -> PipSetup:
    """Write ``workdir/pip.conf`` from the host's pip settings (see the module docstring)."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    settings = host_settings() if settings is None else settings
    parser = configparser.ConfigParser(interpolation=None)
    copied, folders = [], set()
    for (section, key), value in settings.items():
        tokens = [_localise(token, workdir, copied, folders) for token in str(value).split()]
        if not parser.has_section(section):
            parser.add_section(section)
        parser.set(section, key, " ".join(tokens))
    config = workdir / "pip.conf"
    with config.open("w") as handle:
        parser.write(handle)
    return PipSetup(config, tuple(sorted(folders)))
