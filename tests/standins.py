"""Stand-in executables for job-script tests: small bash scripts that record how they were called.

Each call writes one file into a log folder: its argv ($0 first), NUL-separated, then the
working directory and selected environment variables. `calls(folder)` reads them back in order.
Stand-ins exist because the real programs (a cluster's mpiexec, Apptainer) cannot run here, and
a recording `python` lets a test check the exact argv a job script passes.
"""

from __future__ import annotations

import os
from pathlib import Path

RECORD = r'''#!/bin/bash
log="${STANDIN_LOG:?}/$(date +%s%N)-$$-$(basename "$0")"
{ printf '%s\0' "$0" "$@"; printf '\n@cwd=%s\n@env=%s\n' "$(pwd)" "${STANDIN_ENV:+${!STANDIN_ENV}}"; } > "$log"
'''

PYTHON = RECORD + r'''if [ "$3" = finish ]; then exit 0; fi
exit "${STANDIN_EXIT:-0}"
'''

# apptainer exec [--nv] [-B BIND]... --env K=V IMAGE CMD...: record, then run CMD on the host.
APPTAINER = RECORD + r'''[ "$1" = exec ] || { echo "stand-in apptainer: only exec" >&2; exit 64; }
shift
while [ $# -gt 0 ]; do
    case "$1" in
        --nv) shift ;;
        -B|--bind|--env) shift 2 ;;
        *) break ;;
    esac
done
shift   # the image
exec "$@"
'''

# mpiexec -n N CMD... / mpirun [--oversubscribe] [--bind-to X] -n N CMD...: record, run CMD once.
LAUNCHER = RECORD + r'''while [ $# -gt 0 ]; do
    case "$1" in
        -n|--bind-to) shift 2 ;;
        --*) shift ;;
        *) break ;;
    esac
done
exec "$@"
'''


def write_standin(folder: Path, name: str, body: str) -> Path:
    """An executable `name` in `folder` with the bash `body` (a ``#!/bin/bash`` line is added
    when missing: without it exec fails and a same-named program later on PATH would run)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(body if body.startswith("#!") else "#!/bin/bash\n" + body)
    path.chmod(0o755)
    return path


def calls(log: Path) -> list:
    """``[{"argv": [...], "cwd": str, "env": str}, ...]`` of every recorded call, oldest first."""
    out = []
    for path in sorted(Path(log).iterdir(), key=lambda p: int(p.name.split("-")[0])):
        raw = path.read_bytes()
        head, _, tail = raw.rpartition(b"\0\n@cwd=")
        cwd, _, env = tail.decode().partition("\n@env=")
        out.append({"argv": [a.decode() for a in head.split(b"\0")], "cwd": cwd,
                    "env": env.rstrip("\n"), "program": path.name.split("-", 2)[2]})
    return out


def path_with(folder: Path) -> str:
    """PATH with `folder` first (the test process's PATH after it)."""
    return f"{folder}{os.pathsep}{os.environ.get('PATH', '')}"
