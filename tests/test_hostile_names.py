"""Hostile names end to end (issue 7): job scripts that cannot be hijacked, paths that cannot escape.

Every image below is a hard link to ONE tiny simulated tile (512x512, 15 galaxies, 30 stars),
named with a blank, quotes, ``;``, ``$(...)``, backticks, a newline, non-ASCII characters, a
leading dash or a glob. The ``$(...)`` and backtick names carry a command that would create the
file ``PWNED`` at an absolute path inside the test's folder if any shell ever ran it (the slashes
are written ``\\057`` for printf, since a file name cannot hold ``/``; `test_planted_command_is_live`
checks that a shell really does run it). The run directory itself lies below a folder named with
blanks, quotes, ``$(touch ABS/PWNED)`` and backticks.

- Local scheduler: one run with all hostile tiles (a NUL-separated tiles file, since one name
  holds a newline): setup, run, status, collate, link, archive through the real ``dre-batch``
  command; every step exits 0, every tile has rows in the flat catalogue, tile names are the safe
  names of the images (manifest: name <-> image), nothing is created outside the run directory,
  no planted file.
- SLURM (fixture ``slurm_cluster``): one run of several hostile tiles, 2 chunks each, in a
  hostile run directory, with a line-per-image tiles file.
- Path escapes: ``...fits``, ``..fits``, ``..`` in a tiles-file line, an absolute path, an image
  that is a symlink out: mapped to safe names, recorded; a manifest with ``../`` names refused;
  planted links ``DIR/tiles/<tile>`` and ``DIR/chunks/<tile>`` never followed (sentinels outside
  stay untouched).
- Directive values of every scheduler with newlines, ``#``, blanks and shell metacharacters: a
  setup error naming the key, nothing written.
- YAML: a ``!!python/object/apply:os.system`` config is refused, nothing runs; secrets in the
  environment of setup and run appear in no file of the run (the archive included).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import yaml
from astropy.table import Table

from batch_helpers import dre_batch, flat_path, write_config
from dre_hpc.batch.rundir import is_safe_tile_name, safe_tile_name
from dre_hpc.models.psf import image_stem
from scratch import scratch_dir

HAVE_TOOLS = shutil.which("psfex") is not None and (shutil.which("source-extractor") or shutil.which("sex"))
needs_tools = pytest.mark.skipif(not HAVE_TOOLS, reason="SExtractor/PSFEx not installed (bin/install-system-packages)")

# {cmd}: a shell command creating the planted file (see `planted_command`)
HOSTILE = {
    "space": "tile with space",
    "single_quote": "tile'quote",
    "double_quote": 'tile"dquote',
    "semicolon": "tile;semicolon",
    "dollar": "tile$({cmd})",
    "backtick": "tile`{cmd}`",
    "newline": "tile\nnewline",
    "non_ascii": "tuile_é_星",
    "leading_dash": "-dash tile",
    "glob": "tile*glob",
}
SLURM_SUBSET = ("space", "single_quote", "dollar", "backtick", "newline", "leading_dash")
STEPS = ("setup", "run", "status", "collate", "link", "archive")
SECRET = "s3cr3t-dre-test-9f1c2b"


def planted_command(target: Path) -> str:
    """A shell command without ``/`` that creates `target` (an absolute path) when a shell runs it."""
    escaped = str(target).replace("/", "\\057")
    return f"touch \"$(printf %b '{escaped}')\""


def hostile_name(key: str, target: Path) -> str:
    return HOSTILE[key].replace("{cmd}", planted_command(target))


def hostile_dir(root: Path, target: Path) -> Path:
    """A run-directory parent named with blanks, quotes, ``$(touch ABS)`` and backticks."""
    return root / f"run dir 'q' \"dq\" $(touch {target}) `touch {target}`" / "run"


def files_below(root: Path, exclude: Path | None = None) -> set:
    """Every path (files, folders, links) below `root`, without those below `exclude`."""
    found = set()
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        if exclude is not None and (here == exclude or exclude in here.parents):
            dirnames[:] = []
            continue
        found.update(here / n for n in dirnames + filenames)
    return {p for p in found if not (exclude is not None and (p == exclude or exclude in p.parents))}


@pytest.fixture(scope="session")
def base_tile(tmp_path_factory):
    """ONE simulated tile, made once a session: its image path."""
    from dre_hpc.sim.tile import TileSpec, simulate_tile
    root = tmp_path_factory.mktemp("hostile_base")
    image = root / "base.fits"
    simulate_tile(TileSpec(size=512, n_galaxies=15, n_stars=30, seed=3), image, root / "base_truth.fits")
    return image


def hostile_images(base: Path, folder: Path, keys, target: Path) -> dict:
    """``{key: image path}``: hard links to `base` named after the hostile names."""
    folder.mkdir(parents=True, exist_ok=True)
    images = {}
    for key in keys:
        image = folder / f"{hostile_name(key, target)}.fits"
        os.link(base, image)
        images[key] = image
    return images


def nul_tiles_file(path: Path, images) -> Path:
    path.write_bytes(b"".join(os.fsencode(str(i)) + b"\0" for i in images))
    return path


def check_step(name, proc):
    assert proc.returncode == 0, f"{name} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


def check_run(run_dir: Path, images: dict, pwned: Path, before: set, root: Path):
    """What every hostile run must show (shared by the local and SLURM runs)."""
    manifest = json.loads((run_dir / "manifest.json").read_text())
    by_image = {t["image"]: t["name"] for t in manifest["tiles"]}
    flat = Table.read(flat_path(run_dir))
    for key, image in images.items():
        name = by_image[str(image)]                                    # the mapping is recorded
        assert name == safe_tile_name(image_stem(image)) and is_safe_tile_name(name), (key, name)
        assert (flat["TILE"] == name).sum() > 0, f"{key}: no rows of tile {name} in the flat catalogue"
    assert not pwned.exists(), "a planted command ran"
    after = files_below(root, exclude=run_dir)
    assert after == before, f"created outside the run directory: {sorted(map(str, after - before))}"


# -- the planted command works -------------------------------------------------------------------
@pytest.mark.parametrize("key", ["dollar", "backtick"])
def test_planted_command_is_live(tmp_path, key):
    """The planted names do create the file when a shell expands them unquoted."""
    target = tmp_path / "PROOF"
    subprocess.run(["bash", "-c", f"echo {hostile_name(key, target)} >/dev/null"], check=True, timeout=30)
    assert target.exists()


# -- local scheduler: one run with every hostile tile ---------------------------------------------
@pytest.fixture(scope="module")
def local_hostile(request, tmp_path_factory, base_tile, default_cube_file):
    if not HAVE_TOOLS:
        pytest.skip("SExtractor/PSFEx not installed")
    root = scratch_dir(request, tmp_path_factory, "hostile_local")
    pwned = root / "PWNED"
    images = hostile_images(base_tile, root / "images", HOSTILE, pwned)
    tiles = nul_tiles_file(root / "tiles.nul", images.values())
    config = write_config(root / "run.yaml", chunks_per_tile=1)
    run_dir = hostile_dir(root, pwned)
    run_dir.parent.mkdir(parents=True)
    before = files_below(root, exclude=run_dir)
    env = dict(os.environ, DRE_TEST_SECRET_TOKEN=SECRET, AWS_SECRET_ACCESS_KEY=SECRET[::-1])
    steps = {"setup": dre_batch("setup", config, tiles, "--run-dir", run_dir, env=env, timeout=120)}
    check_step("setup", steps["setup"])
    for step in STEPS[1:]:
        steps[step] = dre_batch(step, run_dir, env=env, timeout=300)
    return {"root": root, "dir": run_dir, "images": images, "pwned": pwned, "before": before, "steps": steps}


@pytest.mark.slow
@pytest.mark.parametrize("step", STEPS)
def test_local_step_exits_0(local_hostile, step):
    check_step(step, local_hostile["steps"][step])


@pytest.mark.slow
@pytest.mark.parametrize("key", list(HOSTILE))
def test_local_hostile_tile(local_hostile, key):
    """The tile has its safe name, its rows, its collated files; its image is recorded."""
    run_dir, image = local_hostile["dir"], local_hostile["images"][key]
    name = safe_tile_name(image_stem(image))
    entry = [t for t in json.loads((run_dir / "manifest.json").read_text())["tiles"] if t["name"] == name]
    assert len(entry) == 1 and entry[0]["image"] == str(image)
    assert (run_dir / "collated" / f"{name}_dre.fits").is_file()
    assert (run_dir / "tiles" / name / "Cuts" / f"{name}_cuts.h5").is_file()
    assert not (run_dir / "tiles" / name / "input").exists(), "the image link of the prep was left behind"
    flat = Table.read(flat_path(run_dir))
    assert (flat["TILE"] == name).sum() > 0


@pytest.mark.slow
def test_local_hostile_run_as_a_whole(local_hostile):
    for step in STEPS:
        check_step(step, local_hostile["steps"][step])
    check_run(local_hostile["dir"], local_hostile["images"], local_hostile["pwned"],
              local_hostile["before"], local_hostile["root"])
    assert not list(Path.cwd().glob("PWNED*"))
    scripts = "".join((local_hostile["dir"] / "scripts" / f"{s}.sh").read_text() for s in ("prep", "fit"))
    assert "touch" not in scripts and "tile" not in scripts           # no path or name in the scripts
    with tarfile.open(next(local_hostile["dir"].glob("*_archive.tar.gz"))) as tar:
        names = tar.getnames()
    assert names and all(not n.startswith("/") and ".." not in Path(n).parts for n in names), names
    assert any(n.startswith("markers/prep/dash_tile") for n in names), names


# -- SLURM: one run of hostile tiles -------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.slurm
@needs_tools
def test_slurm_hostile_run(tmp_path, base_tile, slurm_cluster, default_cube_file):
    pwned = tmp_path / "PWNED"
    images = hostile_images(base_tile, tmp_path / "images", SLURM_SUBSET, pwned)
    tiles = nul_tiles_file(tmp_path / "tiles.nul", images.values())
    config = write_config(tmp_path / "run.yaml", chunks_per_tile=2, scheduler="slurm",
                          resources={"prep": {"cpus_per_task": 1, "partition": None},
                                     "fit": {"cpus_per_task": 1, "partition": None}})
    run_dir = hostile_dir(tmp_path, pwned)
    run_dir.parent.mkdir(parents=True)
    before = files_below(tmp_path, exclude=run_dir)

    def batch(*args, timeout=120):
        return subprocess.run([sys.executable, "-m", "dre_hpc.cli.dre_batch", *map(str, args)],
                              env=slurm_cluster.env, capture_output=True, text=True, timeout=timeout)

    check_step("setup", batch("setup", config, tiles, "--run-dir", run_dir))
    check_step("run", batch("run", run_dir))
    status = batch("status", run_dir, "--wait", "--interval", "0.5", timeout=240)
    if status.returncode != 0:
        logs = "".join(f"\n--- {p}:\n{p.read_text(errors='replace')[-1500:]}"
                       for p in sorted((run_dir / "logs").rglob("*")) if p.is_file())
        pytest.fail(f"status --wait exited {status.returncode}\n{status.stdout}\n{status.stderr}{logs}\n"
                    + slurm_cluster.log_tails(10))
    for step in ("collate", "link", "archive"):
        check_step(step, batch(step, run_dir))
    check_run(run_dir, images, pwned, before, tmp_path)


@pytest.mark.slow
def test_no_secret_of_the_environment_in_the_run(local_hostile):
    """Setup, run, collate, archive ran with a token and an AWS key in their environment: no file
    of the run (provenance, config, manifest, job records, markers, logs, FITS headers, HDF5,
    archive members) holds either."""
    secrets = (SECRET.encode(), SECRET[::-1].encode())
    checked = 0
    for path in local_hostile["dir"].rglob("*"):
        if path.is_symlink() or not path.is_file():
            continue
        data = path.read_bytes()
        assert not any(s in data for s in secrets), f"{path} holds a secret of the environment"
        checked += 1
        if path.name.endswith(".tar.gz"):
            with tarfile.open(path) as tar:
                for member in tar.getmembers():
                    if member.isreg():
                        content = tar.extractfile(member).read()
                        assert not any(s in content for s in secrets), f"{member.name} in {path.name}"
                        checked += 1
    assert checked > 30
    provenance = json.loads((local_hostile["dir"] / "provenance.json").read_text())
    assert {"versions", "command_line", "config_hash"} <= set(provenance) and "environment" not in provenance


# -- path escapes --------------------------------------------------------------------------------
def _setup(tmp_path, images, run="run", lines=None):
    from dre_hpc.batch.setup_run import setup_run
    tiles = tmp_path / f"{run}.txt"
    tiles.write_text("".join(f"{line}\n" for line in (lines or [str(i) for i in images])))
    config = write_config(tmp_path / f"{run}.yaml", chunks_per_tile=1)
    return setup_run(config, tiles, tmp_path / run, argv=["test"])


@pytest.mark.parametrize("image_name, expected", [
    ("...fits", "tile"), ("..fits", "tile"), (".hidden.fits", "hidden"), ("-rf.fits", "rf"),
    ("a" * 300 + ".fits", None)])
def test_escaping_image_names_are_mapped(tmp_path, base_tile, image_name, expected):
    image = tmp_path / "images" / image_name[:250]
    image.parent.mkdir()
    os.link(base_tile, image)
    entry = _setup(tmp_path, [image]).read_manifest()["tiles"][0]
    assert is_safe_tile_name(entry["name"]) and entry["image"] == str(image)
    assert entry["name"] == expected or (expected is None and len(entry["name"]) <= 64)


def test_dotdot_absolute_and_linked_images_are_read_only_inputs(tmp_path, base_tile):
    """A tiles-file line with ``..``, an absolute path and an image that is a link to a file
    elsewhere: safe names, the given paths recorded, nothing written next to the images."""
    (tmp_path / "images" / "sub").mkdir(parents=True)
    os.link(base_tile, tmp_path / "images" / "up.fits")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.link(base_tile, elsewhere / "far.fits")
    os.symlink(elsewhere / "far.fits", tmp_path / "images" / "linked.fits")
    before = files_below(tmp_path)
    lines = [str(tmp_path / "images" / "sub" / ".." / "up.fits"), str(tmp_path / "images" / "linked.fits")]
    rundir = _setup(tmp_path, None, lines=lines)
    names = {t["name"]: t["image"] for t in rundir.read_manifest()["tiles"]}
    assert names == {"up": lines[0], "linked": lines[1]}
    after = files_below(tmp_path, exclude=rundir.root) - {tmp_path / "run.txt", tmp_path / "run.yaml"}
    assert after == before


def test_manifest_with_escaping_tile_name_is_refused(tmp_path, base_tile):
    rundir = _setup(tmp_path, [base_tile])
    manifest = json.loads(rundir.manifest.read_text())
    manifest["tiles"][0]["name"] = "../../evil"
    rundir.manifest.write_text(json.dumps(manifest))
    proc = dre_batch("status", rundir.root, timeout=60)
    assert proc.returncode != 0 and "not a safe path component" in proc.stderr, proc.stderr


@pytest.mark.slow
@needs_tools
def test_planted_links_in_the_run_are_never_followed(tmp_path, base_tile, default_cube_file):
    """``tiles/<tile>`` and ``chunks/<tile>`` are links to folders outside when the prep runs: it
    removes both links (not the folders; the chunks of an earlier prep go with a new one) and
    writes a real tile folder. A ``chunks/<tile>`` link planted after the prep makes the fit
    refuse with a clear reason. Both outside folders keep exactly their sentinel."""
    rundir = _setup(tmp_path, [base_tile])
    outside = {kind: tmp_path / f"outside_{kind}" for kind in ("tiles", "chunks")}
    for kind, folder in outside.items():
        folder.mkdir()
        (folder / "sentinel.txt").write_text(kind)
        (rundir.root / kind).mkdir()
        os.symlink(folder, rundir.root / kind / "base")
    proc = dre_batch("run", rundir.root, "--stage", "prep", timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (rundir.root / "tiles" / "base").is_dir() and not (rundir.root / "tiles" / "base").is_symlink()
    assert not os.path.lexists(rundir.root / "chunks" / "base")
    assert rundir.read_marker("prep", "base")[0] == "done"
    os.symlink(outside["chunks"], rundir.root / "chunks" / "base")
    proc = dre_batch("run", rundir.root, "--stage", "fit", timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "symbolic link" in proc.stdout, proc.stdout
    for kind, folder in outside.items():
        assert [p.name for p in folder.iterdir()] == ["sentinel.txt"] and (folder / "sentinel.txt").read_text() == kind
    kind, content = rundir.read_marker("fit", "base", 0)
    assert kind == "failed" and "symbolic link" in content["reason"]


# -- directive values --------------------------------------------------------------------------------
BAD_VALUES = ["a\nb", "a#b", "a b", "a;b", "$(touch x)", "`touch x`", "a'b", "a\x00b"]
DIRECTIVE_KEYS = {"slurm": ("partition", "account", "walltime", "mem_gb", "gpus_per_node", "nodes",
                            "ntasks_per_node", "cpus_per_task"),
                  "pbs": ("queue", "account", "walltime", "mem_gb", "nodes"),
                  "local": ("walltime", "nodes", "cpus_per_task")}


@pytest.mark.parametrize("scheduler, key", [(s, k) for s, keys in DIRECTIVE_KEYS.items() for k in keys]
                         + [(s, "run.name") for s in DIRECTIVE_KEYS]
                         + [(s, "extra_directives") for s in ("slurm", "pbs")])
def test_bad_directive_values_fail_setup_naming_the_key(tmp_path, base_tile, scheduler, key):
    from dre_hpc.batch.setup_run import setup_run
    from dre_hpc.errors import DreError
    tiles = tmp_path / "tiles.txt"
    tiles.write_text(f"{base_tile}\n")
    for i, bad in enumerate(BAD_VALUES):
        if key == "extra_directives" and bad[1] not in "\n\x00":
            continue                               # verbatim by design: only line breaks and controls fail
        config = {"run": {"name": "r"}, "scheduler": {"name": scheduler},
                  "resources": {"fit": {}, "prep": {}}}
        if key == "run.name":
            config["run"]["name"] = bad
        else:
            config["resources"]["fit"][key] = [bad] if key == "extra_directives" else bad
        path = tmp_path / f"c{i}.yaml"
        path.write_text(yaml.safe_dump(config))
        run_dir = tmp_path / f"run{i}"
        with pytest.raises(DreError) as info:
            setup_run(path, tiles, run_dir, argv=["test"])
        assert key in str(info.value), (bad, str(info.value))
        assert not run_dir.exists()


# -- YAML --------------------------------------------------------------------------------------------
def test_python_tag_in_config_is_refused_and_nothing_runs(tmp_path, base_tile):
    target = tmp_path / "PWNED"
    config = tmp_path / "evil.yaml"
    config.write_text(f"run:\n  name: !!python/object/apply:os.system [\"touch {target}\"]\n")
    tiles = tmp_path / "tiles.txt"
    tiles.write_text(f"{base_tile}\n")
    proc = dre_batch("setup", config, tiles, "--run-dir", tmp_path / "run", timeout=60)
    assert proc.returncode != 0 and "evil.yaml" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not target.exists() and not (tmp_path / "run").exists()


def test_every_yaml_load_in_the_package_is_safe():
    """yaml.safe_* everywhere, or yaml.load with a Loader of the module that is a SafeLoader."""
    import importlib
    import re
    import yaml
    package = Path(__file__).resolve().parent.parent / "dre_hpc"
    for path in package.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        for match in re.finditer(r"yaml\.(\w+)\(([^()]*)", text):
            call, args = match.groups()
            if call == "load":
                loader = re.search(r"Loader=(\w+)", args)
                assert loader, f"{path}: yaml.load without a Loader"
                module = importlib.import_module(
                    ".".join(path.relative_to(package.parent).with_suffix("").parts))
                assert issubclass(getattr(module, loader.group(1)), yaml.SafeLoader), f"{path}: {loader.group(1)}"
            else:
                assert call in ("safe_load", "safe_dump", "safe_load_all", "dump"), f"{path}: yaml.{call}"
        assert "Loader=yaml.Loader" not in text and "UnsafeLoader" not in text and "FullLoader" not in text, path
