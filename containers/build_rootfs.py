"""Build containers/dre_hpc.def without Apptainer: the recipe executed in a Debian root filesystem.

Apptainer cannot be installed on the development and CI machines, so `make container-check` runs
the definition's own steps, in Apptainer's order, on a root filesystem built here:

1. ``mmdebstrap --variant=minbase SUITE`` (``From: debian:SUITE[-slim]``) from this machine's apt
   sources (/etc/apt/sources.list and sources.list.d), with the dpkg and apt settings of Docker's
   slim Debian images (unsafe I/O, no documentation, man pages or translations);
2. ``%files`` copied from the repository root (``__pycache__`` left out);
3. ``%post``, read from the definition, run as written by ``/bin/sh -e`` as root inside the rootfs
   (bubblewrap), with pip configured like this machine's pip (`host_pip`);
4. ``%environment``, ``%runscript`` and ``%test`` written where Apptainer puts them
   (``/.singularity.d``), with ``/.singularity.d/actions/exec``: sources the environment, then runs
   its arguments (the entry of dre-batch's ``container.runtime: bwrap``);
5. ``%test`` run inside the finished rootfs, read-only.

The result, ``<cache>/<key>/rootfs``, is cached by the hash of the definition, its %files sources
and this builder (`recipe_key`); a new key builds again and removes the older builds. Every mount
lives in a namespace of mmdebstrap (``--mode=unshare``) or bubblewrap (``--unshare-pid``,
``--die-with-parent``): nothing stays mounted or running when a step fails or is killed.

Usage: ``python containers/build_rootfs.py [--cache DIR] [--rebuild]``; prints the rootfs path.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from deffile import read_definition  # noqa: E402
from host_pip import SANDBOX_DIR, host_pip_setup  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFINITION = ROOT / "containers" / "dre_hpc.def"
DEFAULT_CACHE = ROOT / "build" / "container"
BUILDER = tuple(Path(__file__).resolve().parent / name for name in ("build_rootfs.py", "deffile.py", "host_pip.py"))
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
PASS_ENV = ("http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY")
SKIP = ("__pycache__", "*.pyc", "*.egg-info")
# what Docker's debian:*-slim images set (debuerreotype: /etc/dpkg/dpkg.cfg.d/docker and
# docker-apt-speedup, /etc/apt/apt.conf.d/docker-no-languages, docker-autoremove-suggests)
SLIM_DPKG = ("force-unsafe-io", "path-exclude=/usr/share/doc/*", "path-include=/usr/share/doc/*/copyright",
             "path-exclude=/usr/share/groff/*", "path-exclude=/usr/share/info/*", "path-exclude=/usr/share/linda/*",
             "path-exclude=/usr/share/lintian/overrides/*", "path-exclude=/usr/share/locale/*",
             "path-include=/usr/share/locale/locale.alias", "path-exclude=/usr/share/man/*")
SLIM_APT = ('Acquire::Languages "none"', 'APT::AutoRemove::SuggestsImportant "false"')
EXEC_ACTION = """#!/bin/sh
# `apptainer exec` without Apptainer: the image's environment scripts, then the command
for f in /.singularity.d/env/*.sh; do
    if [ -r "$f" ]; then . "$f"; fi
done
exec "$@"
"""


class BuildError(RuntimeError):
    """A build step failed or cannot start; the message names the step and the log."""


def cache_dir() -> Path:
    """``$DRE_CONTAINER_CACHE`` or the repository's ``build/container``."""
    return Path(os.environ.get("DRE_CONTAINER_CACHE") or DEFAULT_CACHE)


# -- what the build depends on ---------------------------------------------------------------------
def _tree(path: Path):
    """Files under `path` (or `path` itself), sorted, without SKIP patterns."""
    if path.is_file():
        yield path
        return
    for sub in sorted(path.iterdir()):
        if not any(sub.match(pattern) for pattern in SKIP):
            yield from _tree(sub)


def recipe_key(definition, context=ROOT) -> str:
    """16 hex digits of the sha256 of the definition, its %files sources and this builder."""
    definition = read_definition(definition)
    digest = hashlib.sha256(definition.path.read_bytes())
    for path in BUILDER:
        digest.update(path.read_bytes())
    for source, destination in definition.files:
        for path in _tree(Path(context) / source):
            digest.update(f"\0{destination}\0{path.relative_to(context)}\0".encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def debian_suite(definition) -> str:
    """The Debian suite of ``From: debian:SUITE[-slim]``; a BuildError for any other base."""
    image = definition.header.get("from", "")
    name, _, tag = image.partition(":")
    if definition.header.get("bootstrap") != "docker" or name not in ("debian", "library/debian") or not tag:
        raise BuildError(f"{definition.path}: only 'Bootstrap: docker' from debian:SUITE can be built "
                         f"without Apptainer, not {image!r}")
    return tag.removesuffix("-slim")


def apt_sources() -> list:
    """This machine's apt source files (one-line .list and deb822 .sources)."""
    etc = Path("/etc/apt")
    files = [etc / "sources.list"] + sorted((etc / "sources.list.d").glob("*.list")) + \
        sorted((etc / "sources.list.d").glob("*.sources"))
    found = [str(f) for f in files if f.is_file() and f.read_text().strip()]
    if not found:
        raise BuildError("no apt sources in /etc/apt/sources.list or /etc/apt/sources.list.d")
    return found


# -- steps -----------------------------------------------------------------------------------------
def run_logged(argv, log: Path, step: str, timeout: float = 1800) -> None:
    """Run `argv` in its own process group, each output line appended to `log` with the seconds
    since the start; on failure, timeout or interruption the whole group is killed and a
    BuildError names the step and the log."""
    start = time.monotonic()
    with log.open("a") as out:
        out.write(f"\n==> {step}: {' '.join(map(str, argv))}\n")
        out.flush()
        proc = subprocess.Popen(list(map(str, argv)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        timer = threading.Timer(timeout, os.killpg, (proc.pid, signal.SIGKILL))
        timer.start()
        try:
            for line in proc.stdout:
                out.write(f"[{time.monotonic() - start:6.1f}s] {line.decode(errors='replace')}")
            code = proc.wait()
        except BaseException:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
        finally:
            timer.cancel()
            proc.stdout.close()
    if code != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
        why = f"timed out after {timeout:g} s" if time.monotonic() - start >= timeout else f"failed (exit {code})"
        raise BuildError(f"{step} {why}; log: {log}\n{tail}")


def sandbox(rootfs, argv, *, writable=False, binds=(), env=None) -> list:
    """The bwrap command running `argv` as root inside `rootfs`: own PID namespace (its processes
    die with it), fresh /tmp, the host's /dev, /proc, /sys; `binds` are ``(src, dest)`` read-only."""
    command = ["bwrap", "--bind" if writable else "--ro-bind", str(rootfs), "/", "--dev-bind", "/dev", "/dev",
               "--proc", "/proc", "--ro-bind", "/sys", "/sys", "--perms", "1777", "--tmpfs", "/tmp", "--unshare-pid",
               "--unshare-ipc", "--die-with-parent", "--clearenv"]
    if writable:   # a build: dpkg needs root's capabilities, apt and pip the host's DNS
        command += ["--cap-add", "ALL", "--ro-bind", "/etc/resolv.conf", "/etc/resolv.conf"]
    for source, dest in binds:
        command += ["--ro-bind", str(source), str(dest)]
    for key, value in {"PATH": SYSTEM_PATH, "HOME": "/root", "LANG": "C.UTF-8", **(env or {})}.items():
        command += ["--setenv", key, value]
    return command + list(argv)


def copy_files(definition, context: Path, rootfs: Path) -> None:
    """%files: each source copied to its destination inside the rootfs (parents created)."""
    for source, destination in definition.files:
        src, dest = context / source, rootfs / destination.lstrip("/")
        if not src.exists():
            raise BuildError(f"%files: {src} does not exist")
        dest.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dest, symlinks=True, ignore=shutil.ignore_patterns(*SKIP))
        else:
            shutil.copy2(src, dest)


def run_post(definition, rootfs: Path, work: Path, log: Path) -> None:
    """%post as written, ``/bin/sh -e`` as root in the writable rootfs, the host's pip settings."""
    work.mkdir(parents=True, exist_ok=True)
    (work / "post.sh").write_text(definition.section("post"))
    pip = host_pip_setup(work / "pip")
    made = [Path(folder) for folder in pip.folders if not (rootfs / folder.lstrip("/")).exists()]
    binds = [(work / "post.sh", "/tmp/dre-build/post.sh"), (work / "pip", SANDBOX_DIR)]
    binds += [(folder, folder) for folder in pip.folders]
    env = {"PIP_CONFIG_FILE": f"{SANDBOX_DIR}/pip.conf", "APPTAINER_ROOTFS": "/", "PYTHONUNBUFFERED": "1",
           **{k: os.environ[k] for k in PASS_ENV if k in os.environ}}
    try:
        run_logged(sandbox(rootfs, ["/bin/sh", "-e", "/tmp/dre-build/post.sh"], writable=True,
                           binds=binds, env=env), log, "%post")
    finally:
        for folder in made:        # the empty mount points bwrap made for the pip folders
            _remove_empty(rootfs, folder)


def _remove_empty(rootfs: Path, folder: Path) -> None:
    path = rootfs / str(folder).lstrip("/")
    while path != rootfs and path.is_dir() and not any(path.iterdir()):
        path.rmdir()
        path = path.parent


def install_layout(definition, rootfs: Path) -> None:
    """%environment, %runscript, %test and the exec action where Apptainer keeps them, and the
    files Apptainer binds from the host (/etc/hosts, /etc/resolv.conf) made when missing."""
    for name in ("hosts", "resolv.conf"):
        (rootfs / "etc" / name).touch()
    base = rootfs / ".singularity.d"
    (base / "env").mkdir(parents=True, exist_ok=True)
    (base / "actions").mkdir(exist_ok=True)
    scripts = {"env/90-environment.sh": definition.section("environment"),
               "runscript": definition.section("runscript"), "test": definition.section("test")}
    for name, text in scripts.items():
        (base / name).write_text("#!/bin/sh\n" + text)
        (base / name).chmod(0o755)
    (base / "actions" / "exec").write_text(EXEC_ACTION)
    (base / "actions" / "exec").chmod(0o755)


def test_command(rootfs) -> list:
    """``apptainer test`` in bwrap: %test with the image's environment, the rootfs read-only."""
    return sandbox(rootfs, ["/.singularity.d/actions/exec", "/bin/sh", "/.singularity.d/test"])


# -- the cached build --------------------------------------------------------------------------------
def mounts_under(path) -> list:
    """Mount points at or below `path` (from /proc/self/mountinfo)."""
    path = os.path.realpath(path)
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].encode().decode("unicode_escape")
        if point == path or point.startswith(path.rstrip("/") + "/"):
            found.append(point)
    return found


def remove_tree(path: Path) -> None:
    """Delete a build folder, never one with something mounted inside."""
    if not path.exists():
        return
    mounted = mounts_under(path)
    if mounted:
        raise BuildError(f"refusing to delete {path}: mounted inside: {', '.join(mounted)}")
    shutil.rmtree(path)


def mmdebstrap(suite: str, rootfs: Path, log: Path) -> None:
    """A minimal Debian `suite` in `rootfs` from this machine's apt sources, configured like
    Docker's ``debian:SUITE-slim`` (`SLIM_DPKG`, `SLIM_APT`)."""
    options = [f"--dpkgopt={o}" for o in SLIM_DPKG] + [f"--aptopt={o}" for o in SLIM_APT]
    run_logged(["mmdebstrap", "--mode=unshare", "--variant=minbase", *options, suite, rootfs, *apt_sources()],
               log, "mmdebstrap")


def _steps(definition, context: Path, rootfs: Path, work: Path, log: Path, say, bootstrap) -> dict:
    """Run the build steps into `rootfs`; seconds per step."""
    timings = {}
    suite = debian_suite(definition)
    steps = (("mmdebstrap", lambda: bootstrap(suite, rootfs, log)),
             ("%files", lambda: copy_files(definition, context, rootfs)),
             ("%post", lambda: run_post(definition, rootfs, work, log)),
             ("layout", lambda: install_layout(definition, rootfs)),
             ("%test", lambda: run_logged(test_command(rootfs), log, "%test", timeout=300)))
    for name, step in steps:
        start = time.monotonic()
        step()
        timings[name] = round(time.monotonic() - start, 1)
        say(f"build_rootfs: {name} {timings[name]} s")
    return timings


def build(definition=DEFINITION, cache=None, context=ROOT, rebuild=False, say=print, bootstrap=mmdebstrap) -> Path:
    """The rootfs of `definition`, built unless a build of the same key is cached (see module doc);
    `bootstrap(suite, rootfs, log)` makes the base system (tests replace mmdebstrap)."""
    for tool in ("mmdebstrap", "bwrap"):
        if shutil.which(tool) is None:
            raise BuildError(f"{tool} not found: apt-get install mmdebstrap bubblewrap (bin/install-system-packages)")
    cache = Path(cache or cache_dir())
    cache.mkdir(parents=True, exist_ok=True)
    with (cache / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        key = recipe_key(definition, context)
        final = cache / key
        if (final / "build.json").is_file() and not rebuild:
            return final / "rootfs"
        partial, log = cache / f"{key}.partial", cache / f"{key}.log"
        remove_tree(partial)
        remove_tree(final)
        partial.mkdir()
        log.write_text("")
        start = time.monotonic()
        try:
            timings = _steps(read_definition(definition), Path(context), partial / "rootfs", partial / "work",
                             log, say, bootstrap)
        except BaseException:
            remove_tree(partial)
            raise
        remove_tree(partial / "work")
        record = {"key": key, "definition": str(definition), "seconds": round(time.monotonic() - start, 1),
                  "steps": timings}
        (partial / "build.json").write_text(json.dumps(record, indent=1) + "\n")
        shutil.move(str(log), partial / "build.log")
        partial.rename(final)
        for old in cache.iterdir():       # one build kept: each rootfs is about 1 GB
            if old.name == key or old.name.startswith("."):
                continue
            if old.is_dir():
                remove_tree(old)
            else:
                old.unlink()
        return final / "rootfs"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--definition", default=str(DEFINITION))
    parser.add_argument("--cache", help="build folder (default: $DRE_CONTAINER_CACHE or build/container)")
    parser.add_argument("--rebuild", action="store_true", help="build even when cached")
    args = parser.parse_args(argv)
    try:
        rootfs = build(args.definition, args.cache, rebuild=args.rebuild,
                       say=lambda text: print(text, file=sys.stderr, flush=True))
    except BuildError as exc:
        print(f"build_rootfs: {exc}", file=sys.stderr)
        return 1
    print(rootfs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
