"""``dre-batch setup``: create a run directory from a run config and a list of tiles; submit nothing.

The run directory gets the resolved config, the provenance record, the manifest (tile index ->
name, image, chunk count) and one rendered job script per stage (array jobs: the prep array runs
over tiles, each tile's fit array over its chunks; see `rundir`). An existing run directory is
never overwritten without ``clobber``, and ``clobber`` removes only a directory that is a run.
"""

from __future__ import annotations

import getpass
import hashlib
import importlib.metadata
import platform
import shutil
import socket
import sys
from pathlib import Path

from dre_hpc import __version__
from dre_hpc.errors import InputError
from dre_hpc.preprocess.layout import tile_name

from .config import RunConfig, load_config, site_defaults_path
from .render import render_script
from .rundir import RunDir, safe_tile_name, utc_now, write_atomic, write_json
from .tile_inputs import ENTRY_KEYS, absolute_paths

STAGES = ("prep", "fit")
_PACKAGES = ("numpy", "scipy", "astropy", "h5py", "jinja2", "PyYAML", "mpi4py", "cupy-cuda12x")


def read_tiles_file(path) -> list:
    """Absolute image paths from a text file, one a line (relative to the current directory;
    blank lines and ``#`` comments skipped), or, when the file holds a NUL byte, one path per
    NUL-terminated entry taken verbatim (``find -print0``: any file name, newlines and leading or
    trailing blanks included). Every image must exist, once. Images are only ever read.

    A line may name the tile's own maps and PSF after the image: ``IMAGE [weight=PATH]
    [flags=PATH] [psf=PATH]`` (`split_options`). Returns ``[(image, {key: absolute path})]``."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        text = raw.decode("utf-8")
    except FileNotFoundError:
        raise InputError(f"{path}: tiles file not found (a text file with one image path a line)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read the tiles file: {exc}") from None
    if "\0" in text:
        listed = [(number, entry) for number, entry in enumerate(text.split("\0"), 1) if entry.strip()]
        where = "entry"
    else:
        listed = [(number, line.strip()) for number, line in enumerate(text.splitlines(), 1)
                  if line.strip() and not line.strip().startswith("#")]
        where = "line"
    images, seen = [], {}
    for number, entry in listed:
        entry, extras = (entry, {}) if where == "entry" else split_options(entry, f"{path}, line {number}")
        image = Path(entry).expanduser().absolute()
        if not image.is_file():
            raise InputError(f"{path}, {where} {number}: image {entry!r} not found")
        if image in seen:
            raise InputError(f"{path}, {where} {number}: image {entry!r} is listed twice "
                             f"(also {where} {seen[image]})")
        seen[image] = number
        images.append((image, extras))
    if not images:
        raise InputError(f"{path}: no image paths in the tiles file")
    return images


def split_options(line: str, where: str) -> tuple:
    """``(image, {key: absolute path})`` of a tiles-file line: words ``KEY=PATH`` at its end, with
    KEY one of `ENTRY_KEYS`, are the tile's own inputs (a whole line that names a file is just an
    image, whatever it holds); each must exist."""
    extras, rest = {}, line
    while not Path(rest).expanduser().is_file():
        head, sep, word = rest.rpartition(" ")
        key, eq, value = word.partition("=")
        if not (sep and eq and key in ENTRY_KEYS):
            break
        if key in extras:
            raise InputError(f"{where}: {key}= given twice")
        path = Path(value).expanduser().absolute()
        if not path.is_file():
            raise InputError(f"{where}: {key}={value}: file not found (expected IMAGE [weight=PATH] "
                             f"[flags=PATH] [psf=PATH])")
        extras[key], rest = str(path), head.rstrip()
    return rest, extras


def tile_entries(images, n_chunks, source="tiles file") -> list:
    """Manifest entries: index, unique safe name, image, chunk count (None: known after prep).
    The name is `safe_tile_name` of the image's stem (``..fits``, ``a b;c``, ``$(x)`` give harmless
    names); the entry keeps the image's own path, so the manifest records name -> image."""
    entries, names = [], {}
    for index, item in enumerate(images):
        image, extras = item if isinstance(item, tuple) else (item, {})
        name = safe_tile_name(tile_name(image))
        if name in names:
            raise InputError(f"{source}: tiles {names[name]} and {image} both give the tile name {name!r}; "
                             f"tile names must be unique in a run (rename one)")
        names[name] = image
        entries.append({"index": index, "name": name, "image": str(image), "n_chunks": n_chunks, **extras})
    return entries


def provenance(config, argv, python) -> dict:
    """What produced the run: versions, seed, config hash, command line, host and time (no environment)."""
    versions = {"dre_hpc": __version__, "python": platform.python_version()}
    for package in _PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue
    return {"run": config.run["name"], "seed": config.run["seed"], "config_hash": config.hash(),
            "command_line": list(argv), "python": python, "versions": versions,
            "created": utc_now(),
            "host": socket.gethostname(), "user": _user(), "cwd": str(Path.cwd())}


def site_defaults_record():
    """The site-defaults file that setup applied: its path and sha256 (None without one)."""
    path = site_defaults_path()
    if path is None:
        return None
    return {"path": str(Path(path).absolute()), "sha256": hashlib.sha256(Path(path).read_bytes()).hexdigest()}


def _user():
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return None


def prepare_directory(root: Path, clobber: bool) -> None:
    """Refuse an existing, non-empty directory unless ``clobber`` and it is a dre-batch run."""
    if root.exists() and not root.is_dir():
        raise InputError(f"{root}: exists and is not a directory")
    if root.is_dir() and any(root.iterdir()):
        if not RunDir(root).exists():
            raise InputError(f"{root}: exists, is not empty and is not a dre-batch run; "
                             f"choose another --run-dir (--clobber removes only run directories)")
        if not clobber:
            raise InputError(f"{root}: a run exists there already; use --clobber to replace it "
                             f"(this deletes its outputs)")
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)


def setup_run(config_path, tiles_file, run_dir, overrides=(), clobber=False, argv=None) -> RunDir:
    """Create the run directory `run_dir`; return its `RunDir`. Nothing is submitted."""
    config = load_config(config_path, overrides, site=True)
    config = RunConfig(absolute_paths(config.as_dict(), str(config_path)))   # a typo fails here
    images = read_tiles_file(tiles_file)
    chunks = config.chunking["chunks_per_tile"]
    entries = tile_entries(images, chunks, tiles_file)
    python = config.run["python"] or sys.executable
    root = Path(run_dir).absolute()
    scripts = {stage: render_script(config, config.scheduler["name"], stage,
                                    {"run_name": config.run["name"], "stage": stage, "python": python,
                                     "job_name": f"{config.run['name']}-{stage}"})
               for stage in STAGES}                        # render first: a bad value writes nothing
    prepare_directory(root, clobber)
    rundir = RunDir(root)
    try:
        write_atomic(rundir.config, config.to_yaml())
        record = provenance(config, list(sys.argv if argv is None else argv), python)
        record["site_defaults"] = site_defaults_record()
        write_json(rundir.provenance, record)
        for stage, text in scripts.items():
            write_atomic(rundir.script(stage), text, mode=0o777)
        # The manifest last: its presence is what makes the directory a run.
        write_json(rundir.manifest, {"run": config.run["name"], "scheduler": config.scheduler["name"],
                                     "config_hash": config.hash(), "chunking": dict(config.chunking),
                                     "created": record["created"], "tiles": entries})
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    return rundir
