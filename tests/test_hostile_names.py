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

import gzip
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import yaml
from astropy.table import Table

from batch_helpers import dre_batch, flat_path, write_config
from dre_hpc.batch.rundir import is_safe_tile_name, safe_tile_name
from dre_hpc.models.psf import image_stem

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
def local_hostile(tmp_path_factory, base_tile, default_cube_file):
    if not HAVE_TOOLS:
        pytest.skip("SExtractor/PSFEx not installed")
    root = tmp_path_factory.mktemp("hostile_local")
    pwned = root / "PWNED"
    images = hostile_images(base_tile, root / "images", HOSTILE, pwned)
    tiles = nul_tiles_file(root / "tiles.nul", images.values())
    config = write_config(root / "run.yaml", chunks_per_tile=1)
    run_dir = hostile_dir(root, pwned)
    run_dir.parent.mkdir(parents=True)
    before = files_below(root, exclude=run_dir)
    steps = {"setup": dre_batch("setup", config, tiles, "--run-dir", run_dir, timeout=120)}
    check_step("setup", steps["setup"])
    for step in STEPS[1:]:
        steps[step] = dre_batch(step, run_dir, timeout=300)
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
