"""containers/dre_hpc.def built for real, and a dre-batch run inside the result.

Apptainer cannot be installed here, so `containers/build_rootfs.py` (``make container-check``)
executes the recipe itself on a Debian root filesystem built from this machine's apt sources:
%files copied, %post run as written, %environment installed, %test run. The build is cached by the
hash of the recipe, its %files sources and the builder (``build/container`` or
``$DRE_CONTAINER_CACHE``); a cold build takes minutes, a cached one a second.

Then a local dre-batch run enters that rootfs the way ``container.image`` would, with
``container.runtime: bwrap`` in place of ``apptainer exec``: prep with the image's SExtractor and
PSFEx, fits on 2 ranks under the host's mpirun with the image's mpi4py, and the catalogue equals
the host's one-process run. The failure paths leave nothing mounted or running.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from batch_helpers import (assert_same_catalogue, dre_batch, flat_path, local_reference,  # noqa: F401
                           sim_tiles, write_config)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "containers"))
import build_rootfs  # noqa: E402
from build_rootfs import BuildError, mounts_under, recipe_key, run_logged, sandbox  # noqa: E402

NEEDS = [tool for tool in ("mmdebstrap", "bwrap") if shutil.which(tool) is None]
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(os.geteuid() != 0, reason="the rootfs build runs as root (mmdebstrap, bwrap)"),
              pytest.mark.skipif(bool(NEEDS), reason=f"{' and '.join(NEEDS)} not installed "
                                                     "(bin/install-system-packages)")]
OMPI_ROOT = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}


@pytest.fixture(scope="module")
def rootfs():
    """The built (or cached) rootfs of containers/dre_hpc.def."""
    return build_rootfs.build(say=lambda text: print(text, file=sys.stderr))


def inside(rootfs, command: str) -> subprocess.CompletedProcess:
    """`command` run by /bin/sh inside the image, with its %environment (as apptainer exec)."""
    argv = sandbox(rootfs, ["/.singularity.d/actions/exec", "/bin/sh", "-c", command])
    return subprocess.run(argv, capture_output=True, text=True, timeout=120)


def processes_with(token: str) -> list:
    """PIDs whose command line contains `token`."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and token.encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


# -- the build ---------------------------------------------------------------------------------------
def test_the_recipe_builds_and_its_test_section_passes(rootfs):
    record = json.loads((rootfs.parent / "build.json").read_text())
    assert record["key"] == recipe_key(build_rootfs.DEFINITION) == rootfs.parent.name
    assert list(record["steps"]) == ["mmdebstrap", "%files", "%post", "layout", "%test"]
    proc = subprocess.run(build_rootfs.test_command(rootfs), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Source Extractor version" in proc.stdout and "PSFEx version" in proc.stdout
    assert "dre_hpc" in proc.stdout and "mpi4py" in proc.stdout


def test_the_image_has_its_tools_and_mpi4py_built_against_its_open_mpi(rootfs):
    proc = inside(rootfs, "for c in python source-extractor psfex mpirun; do command -v $c; done; "
                          "grep '^Tag:' /opt/venv/lib/python3*/site-packages/mpi4py-*.dist-info/WHEEL; "
                          "ldd \"$(python -c 'import mpi4py.MPI as m; print(m.__file__)')\" | grep -o 'libmpi.so.* =>'; "
                          "python -c 'from mpi4py import MPI; print(MPI.Get_library_version())'; "
                          "if dpkg -s build-essential >/dev/null 2>&1; then echo build-essential left; fi; "
                          "echo $PYTHONNOUSERSITE")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[:4] == ["/opt/venv/bin/python", "/usr/bin/source-extractor", "/usr/bin/psfex", "/usr/bin/mpirun"]
    assert re.fullmatch(r"Tag: cp3\d+-cp3\d+-linux_\w+", lines[4])    # a wheel built here, not manylinux
    assert lines[5] == "libmpi.so.40 =>" and lines[6].startswith("Open MPI v4.1")
    assert "build-essential left" not in proc.stdout
    assert lines[-1] == "1" and not (rootfs / "opt" / "src" / "dre_hpc").exists()


def test_a_second_build_is_the_cached_one(rootfs):
    start = time.monotonic()
    assert build_rootfs.build(say=lambda text: None) == rootfs
    assert time.monotonic() - start < 30


def test_the_cache_key_follows_the_recipe_and_the_package(tmp_path):
    context = tmp_path / "repo"
    definition = build_rootfs.read_definition(build_rootfs.DEFINITION)
    for source, _ in definition.files:
        src = ROOT / source
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, context / source)
    (context / "containers").mkdir()
    recipe = context / "containers" / "dre_hpc.def"
    shutil.copy2(build_rootfs.DEFINITION, recipe)
    key = recipe_key(recipe, context)
    (context / "dre_hpc" / "__pycache__").mkdir(exist_ok=True)
    (context / "dre_hpc" / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"cache")
    assert recipe_key(recipe, context) == key                     # byte-code is not the package
    (context / "dre_hpc" / "__init__.py").write_text((context / "dre_hpc" / "__init__.py").read_text() + "\n")
    changed = recipe_key(recipe, context)
    assert changed != key
    recipe.write_text(recipe.read_text().replace("apt-get clean", "apt-get clean\n    true"))
    assert recipe_key(recipe, context) not in (key, changed)


# -- failures leave nothing behind ---------------------------------------------------------------------
def test_a_failing_step_leaves_nothing_running_or_mounted(rootfs, tmp_path):
    log = tmp_path / "build.log"
    argv = sandbox(rootfs, ["/bin/sh", "-c", "sleep 987 & echo started; exit 3"])
    with pytest.raises(BuildError, match=r"(?s)%post failed \(exit 3\); log: .*\] started"):
        run_logged(argv, log, "%post")
    with pytest.raises(BuildError, match=r"%post timed out after 2 s"):   # killed, group and all
        run_logged(sandbox(rootfs, ["/bin/sh", "-c", "sleep 986 & sleep 985"]), log, "%post", timeout=2)
    time.sleep(0.5)
    assert processes_with("sleep 98") == []
    assert mounts_under(rootfs) == [] and mounts_under(tmp_path) == []


def test_a_failed_build_removes_its_folder(rootfs, tmp_path):
    """A recipe whose %post fails: BuildError with the log, no partial rootfs, nothing mounted.
    The Debian base is a hard-linked copy of the built rootfs (no second mmdebstrap)."""
    recipe = tmp_path / "bad.def"
    recipe.write_text("Bootstrap: docker\nFrom: debian:bookworm-slim\n\n%files\n    setup.cfg /opt/setup.cfg\n\n"
                      "%post\n    set -eu\n    test -f /opt/setup.cfg\n    sleep 984 &\n    exit 7\n")

    def bootstrap(suite, target, log):
        assert suite == "bookworm"
        subprocess.run(["cp", "-al", str(rootfs), str(target)], check=True)

    cache = tmp_path / "cache"
    with pytest.raises(BuildError, match=r"%post failed \(exit 7\)"):
        build_rootfs.build(recipe, cache, bootstrap=bootstrap, say=lambda text: None)
    assert sorted(p.name for p in cache.iterdir()) == [".lock", f"{recipe_key(recipe)}.log"]
    assert processes_with("sleep 984") == [] and mounts_under(tmp_path) == []


def test_only_debian_bases_are_built(tmp_path):
    recipe = tmp_path / "other.def"
    recipe.write_text("Bootstrap: docker\nFrom: ubuntu:24.04\n\n%post\n    true\n")
    with pytest.raises(BuildError, match="only 'Bootstrap: docker' from debian:SUITE"):
        build_rootfs.build(recipe, tmp_path / "cache", say=lambda text: None)


# -- a run inside it ---------------------------------------------------------------------------------
@pytest.mark.mpi
@pytest.mark.skipif(shutil.which("mpirun") is None, reason="Open MPI not installed")
def test_two_rank_run_inside_the_image_equals_the_host_run(rootfs, tmp_path, sim_tiles, local_reference):
    """Host PATH without any `python`: only the image's /opt/venv/bin/python can run the payloads."""
    system_path = "/usr/sbin:/usr/bin:/sbin:/bin"
    if shutil.which("python", path=system_path):
        pytest.skip("a `python` in the system's directories would hide a payload run outside the image")
    env = {**os.environ, **OMPI_ROOT, "PATH": system_path}
    config = write_config(tmp_path / "run.yaml", chunks_per_tile=2,
                          resources={"fit": {"ntasks_per_node": 2, "cpus_per_task": 1}},
                          container={"image": str(rootfs), "runtime": "bwrap"})
    run_dir = tmp_path / "run"
    setup = dre_batch("setup", config, sim_tiles, "--run-dir", run_dir, env=env)
    assert setup.returncode == 0, setup.stderr
    script = (run_dir / "scripts" / "fit.sh").read_text()
    assert f"mpirun --oversubscribe --bind-to none -n 2 bwrap --ro-bind {rootfs} / " in script
    result = dre_batch("run", run_dir, env=env, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert dre_batch("collate", run_dir, env=env).returncode == 0
    reference = local_reference[0]
    if not flat_path(reference).exists():
        assert dre_batch("collate", reference).returncode == 0
    assert_same_catalogue(flat_path(run_dir), flat_path(reference))
    ranks = {json.loads(p.read_text())["ranks"] for p in (run_dir / "markers" / "fit").glob("*/*.done")}
    assert ranks == {2}
    assert mounts_under(rootfs) == []
