"""The dre-batch run config: one defaults table, YAML loading, overrides, strict validation.

`TABLE` is the only place where keys, defaults, types and meanings are written. A run config file
(YAML) sets any subset of it; ``section.key=value`` overrides (values read as YAML scalars) come
on top. Unknown keys, wrong types and bad choices fail with a `ConfigError` that names the file,
the dotted key and what is accepted. The result, `RunConfig`, is frozen; its `to_yaml()` is
written into every run and its `hash()` identifies the resolved config.

Site defaults: where ``$DRE_BATCH_DEFAULTS`` names a YAML file of run-config keys (a centre's
partition and account, the model cube...), ``dre-batch setup`` applies it over the built-in
defaults and under the run config and ``--set`` (`site_defaults`). Only setup reads it: the run
directory's resolved config is complete, and its jobs never look at the environment.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from types import MappingProxyType

import yaml

from dre_hpc.errors import DreError


class ConfigError(DreError):
    """A run config file or override is missing, malformed or invalid."""


@dataclass(frozen=True)
class Key:
    """One leaf of the table: default value, kind (see `_CHECKS`), meaning, allowed choices."""

    default: object
    kind: str
    doc: str
    choices: tuple = ()
    nullable: bool = False
    minimum: float | None = None


def _resources(walltime, mem_gb):
    """The one resource vocabulary, the same for every stage."""
    return {
        "nodes": Key(1, "int", "nodes per job", minimum=1),
        "ntasks_per_node": Key(1, "int", "MPI ranks per node", minimum=1),
        "cpus_per_task": Key(1, "int", "CPU cores per rank", minimum=1),
        "gpus_per_node": Key(0, "int", "GPUs per node", minimum=0),
        "mem_gb": Key(mem_gb, "number", "memory per node in GB", minimum=0),
        "walltime": Key(walltime, "walltime", 'time limit, a quoted "HH:MM:SS" or "D-HH:MM:SS"'),
        "partition": Key(None, "str", "SLURM partition", nullable=True),
        "queue": Key(None, "str", "PBS queue", nullable=True),
        "account": Key(None, "str", "account/project charged", nullable=True),
        "extra_directives": Key([], "strlist", "further scheduler directives, verbatim"),
        "prologue": Key("", "str", "shell lines run before the payload (e.g. module loads)"),
        "epilogue": Key("", "str", "shell lines run after the payload"),
    }


TABLE = {
    "run": {
        "name": Key("dre_run", "name", "run name: file names and job names"),
        "seed": Key(0, "int", "master seed; object seeds derive from (seed, tile, object)", minimum=0),
        "python": Key(None, "str", "Python that jobs run; null: the one running dre-batch setup",
                      nullable=True),
    },
    "fit": {
        "model": Key("sersic", "str", "model cube FITS file, or a preset: sersic (a Sersic-index axis "
                     "n = 0.5..6, the default) or bulge (the original's n = 4 grid, also null)", nullable=True),
        "statistic": Key("wls", "str", "chi-square statistic", choices=("wls", "dre")),
        "backend": Key("cpu", "str", "cpu (NumPy) or gpu (CuPy)", choices=("cpu", "gpu")),
        "zero_point": Key(None, "number_or_header", "magnitude zero-point (adds MAG): a number or "
                          "header:KEY (per tile, e.g. header:MAGZERO); null: none", nullable=True),
        "gain": Key(None, "number_or_header", "gain in e-/ADU for the Poisson term: a number or "
                    "header:KEY (per tile); null: none", nullable=True, minimum=0),
        "batch_size": Key(None, "int", "objects fitted together in one batch; null: from the grid "
                          "(1024 for the default cube, 512 for sersic)", nullable=True, minimum=1),
        "centre": Key(True, "bool", "move cutouts to the sub-pixel centre"),
        "min_pixels": Key(16, "int", "fewest usable mask pixels to fit", minimum=1),
        "psf_pixel": Key("included", "str", "whether the PSF contains the pixel response",
                         choices=("included", "excluded")),
        "checkpoint_seconds": Key(300, "number", "write a checkpoint at least this often (seconds; "
                                  "0: only when stopped by a signal)", minimum=0),
        "checkpoint_objects": Key(None, "int", "also write one after this many fitted objects; "
                                  "null: by time only", nullable=True, minimum=1),
        "shared_models": Key(True, "bool", "one convolved model cube per node in MPI shared memory "
                             "(false: one per rank)"),
        "schedule": Key("dynamic", "str", "how MPI ranks share a chunk's fitting units: dynamic "
                        "(next free unit) or static (unit i on rank i mod ranks)",
                        choices=("dynamic", "static")),
    },
    "prep": {
        "sextractor_config": Key(None, "str", "SExtractor config; null: shipped dre.sex", nullable=True),
        "sextractor_param": Key(None, "str", "SExtractor params; null: shipped dre.param", nullable=True),
        "psfex_config": Key(None, "str", "PSFEx config; null: shipped dre.psfex", nullable=True),
        "gain": Key("counts", "gain", "counts (header gain), cps (gain x EXPTIME), a number or "
                    "header:KEY"),
        "psf": Key(None, "str", "null: PSFEx per tile; a PSF file (.psf or FITS image) for every tile "
                   "(PSFEx skipped); or a directory of <image stem>.psf or .fits per tile",
                   nullable=True),
        "psf_fallback": Key(None, "str", "PSF file used only for a tile where PSFEx accepts no star "
                            "(or fails its checks); null: such a tile fails", nullable=True),
        "seeing": Key("auto", "seeing", "SExtractor SEEING_FWHM (for CLASS_STAR): auto (measured: "
                      "stellar locus of a first pass, else the PSF), a number of pixels, header:KEY "
                      "(pixels), or config (the SExtractor config's value)"),
        "weights": Key(None, "str", "weight maps: a directory of <image stem>_wht.fits, or a suffix "
                       "such as _wht.fits beside each image; null: none", nullable=True),
        "weight_type": Key("MAP_WEIGHT", "str", "what the weight maps hold",
                           choices=("MAP_WEIGHT", "MAP_RMS", "MAP_VAR")),
        "flags": Key(None, "str", "flag maps (pixels != 0 are masked): a directory of "
                     "<image stem>_flag.fits, or a suffix such as _flag.fits; null: none", nullable=True),
        "margin": Key(80, "number", "keep objects at least this far from the edges (pixels)", minimum=0),
        "max_stellarity": Key(0.5, "number", "keep objects with CLASS_STAR below this"),
        "filters": Key([], "filters", "catalogue cuts, a list of [PARAM, MIN, MAX]"),
        "layout": Key("stacked", "str", "cuts layout", choices=("stacked", "dre")),
        "compression": Key("none", "str", "cuts compression", choices=("none", "low", "medium", "high")),
        "neighbours": Key(False, "bool", "second pass: fit the tile once in the prep, then cut it again "
                          "with the neighbours' models subtracted and the background estimated again "
                          "(make_cuts --neighbours)"),
    },
    "chunking": {
        "objects_per_chunk": Key(1000, "int", "objects per fit job (default when neither is set), "
                                 "in whole fitting units of fit.batch_size objects",
                                 nullable=True, minimum=1),
        "chunks_per_tile": Key(None, "int", "fit jobs per tile (instead of objects_per_chunk)",
                               nullable=True, minimum=1),
    },
    "scheduler": {
        "name": Key("local", "str", "where jobs run", choices=("local", "slurm", "pbs")),
        "max_parallel": Key(None, "int", "local: most jobs at once; null: CPU count", nullable=True,
                            minimum=1),
        "max_array_size": Key(1000, "int", "most elements per submitted array (SLURM MaxArraySize - 1)",
                              minimum=1),
        "retries": Key(2, "int", "times an interrupted (retryable) job item is resubmitted "
                       "automatically; a Python error is never retried", minimum=0),
        "warning_seconds": Key(300, "int", "SLURM: SIGUSR1 to fit jobs this long before the "
                               "walltime, so they checkpoint and retry (0: none)", minimum=0),
    },
    "resources": {
        "prep": _resources("01:00:00", 4),
        # the default `sersic` cube: a fit job that convolves it (no prep cache) peaks at 7.1-7.3 GB
        # (its models, their squares and the model-major copy, 1.8 GB each, and the mapped cube's
        # pages), so 8 GB left no margin; one that maps the tile's cache peaks at about 2.6 GB
        "fit": _resources("04:00:00", 12),
        "collate": _resources("01:00:00", 8),
    },
    "container": {
        "image": Key(None, "str", "Apptainer image; null: run on the host", nullable=True),
        "binds": Key([], "strlist", "bind mounts, SRC[:DST[:OPTS]]"),
        "gpu": Key(False, "bool", "pass --nv to apptainer exec"),
        "runtime": Key("apptainer", "str", "how payloads enter the image: apptainer (exec of a SIF image) or "
                       "bwrap (bubblewrap into image = a root filesystem folder, to test an image without "
                       "Apptainer; containers/README.md)", choices=("apptainer", "bwrap")),
    },
}

_WALLTIME = re.compile(r"^(?:(\d+)-)?(\d{1,3}):([0-5]\d):([0-5]\d)$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value):
    return _is_int(value) or isinstance(value, float)


def _is_finite(value):
    """A number that is finite as a float (not NaN or infinite, and no integer beyond float range)."""
    if not _is_number(value):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def _walltime(value):
    if not isinstance(value, str):
        hint = (" (YAML reads an unquoted 1:00:00 as the number 3600, in base 60)" if _is_number(value)
                else "")
        raise TypeError(f'a quoted string "HH:MM:SS" or "D-HH:MM:SS"{hint}: quote it, '
                        f'e.g. walltime: "01:00:00"')
    if not _WALLTIME.fullmatch(value):
        raise TypeError('a string "HH:MM:SS" or "D-HH:MM:SS" (minutes and seconds below 60)')
    return value


def _filters(value):
    ok = isinstance(value, list) and all(
        isinstance(f, list) and len(f) == 3 and isinstance(f[0], str) and all(map(_is_finite, f[1:]))
        for f in value)
    if not ok:
        raise TypeError("a list of [PARAM, MIN, MAX] with a column name and two finite numbers")
    return [[f[0], float(f[1]), float(f[2])] for f in value]


_HEADER = re.compile(r"^header:[A-Za-z0-9_-]{1,8}$")
_HEADER_HINT = "header:KEY (a FITS key of up to 8 letters, digits, _ or -, e.g. header:MAGZERO)"


def _header_key(value):
    """'header:KEY' with KEY upper-cased, or None when `value` is not such a string."""
    if isinstance(value, str) and _HEADER.fullmatch(value.strip()):
        return "header:" + value.strip()[7:].upper()
    if isinstance(value, str) and value.strip().lower().startswith("header:"):
        raise TypeError(_HEADER_HINT)
    return None


def _number_or_header(value):
    key = _header_key(value)
    if key:
        return key
    if not _is_finite(value):
        raise TypeError(f"a number (finite) or {_HEADER_HINT}")
    return float(value)


def _seeing(value):
    key = _header_key(value)
    if key or value in ("auto", "config"):
        return key or value
    if _is_finite(value) and value > 0:
        return float(value)
    raise TypeError(f'"auto", "config", a positive number of pixels or {_HEADER_HINT}')


def _gain(value):
    if value in ("counts", "cps"):
        return value
    if _header_key(value):
        return _header_key(value)
    if _is_finite(value) and value > 0:
        return float(value)
    raise TypeError(f'"counts", "cps" or a positive number (e-/ADU; finite), or {_HEADER_HINT}')


def _expect(test, what, convert=lambda v: v):
    def check(value):
        if not test(value):
            raise TypeError(what)
        return convert(value)
    return check


_CHECKS = {
    "int": _expect(_is_int, "an integer"),
    "number": _expect(_is_finite, "a number (finite)", float),
    "bool": _expect(lambda v: isinstance(v, bool), "true or false"),
    "str": _expect(lambda v: isinstance(v, str), "a string"),
    "name": _expect(lambda v: isinstance(v, str) and bool(_NAME.fullmatch(v)),
                    "a name of letters, digits, '_', '.', '-' (starting with a letter or digit)"),
    "strlist": _expect(lambda v: isinstance(v, list) and all(isinstance(s, str) for s in v),
                       "a list of strings", list),
    "walltime": _walltime,
    "filters": _filters,
    "gain": _gain,
    "number_or_header": _number_or_header,
    "seeing": _seeing,
}


def _check(key, value, dotted, source):
    """The validated (and canonical) value of leaf `dotted`, or a ConfigError."""
    if value is None and key.nullable:
        return None
    try:
        value = _CHECKS[key.kind](value)
    except TypeError as exc:
        raise ConfigError(f"{source}: {dotted}: expected {exc}, got {value!r} "
                          f"({type(value).__name__})") from None
    if key.choices and value not in key.choices:
        raise ConfigError(f"{source}: {dotted}: {value!r} is not one of {', '.join(key.choices)}")
    if key.minimum is not None and not isinstance(value, str) and value < key.minimum:
        raise ConfigError(f"{source}: {dotted}: must be >= {key.minimum}, got {value!r}")
    return value


def _unknown(name, dotted, level, source):
    where = f"{dotted}.{name}" if dotted else name
    return ConfigError(f"{source}: unknown key {where!r}; valid keys"
                       f"{' in ' + repr(dotted) if dotted else ''}: {', '.join(level)}")


def _merge(raw, table, out, dotted, source, given):
    """Validate mapping `raw` against `table` and write it into `out`, recording keys in `given`."""
    if raw is None:
        return
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: {dotted or 'top level'}: expected a mapping of "
                          f"{', '.join(table)}, got {raw!r}")
    for name, value in raw.items():
        if name not in table:
            raise _unknown(name, dotted, table, source)
        path = f"{dotted}.{name}" if dotted else name
        if isinstance(table[name], dict):
            _merge(value, table[name], out[name], path, source, given)
        else:
            out[name] = _check(table[name], value, path, source)
            given.add(path)


def _defaults(table, dotted=""):
    """The defaults, canonicalised by the same checks as user values (so 8 and 8.0 hash alike)."""
    return {k: _defaults(v, f"{dotted}{k}.") if isinstance(v, dict)
            else _check(v, copy.deepcopy(v.default), dotted + k, "defaults table") for k, v in table.items()}


def _override(text, out, given):
    """Apply one ``section.key=value`` override to `out`."""
    source = f"override {text!r}"
    path, sep, raw = text.partition("=")
    if not sep or not path.strip():
        raise ConfigError(f"{source}: expected section.key=value, e.g. fit.statistic=dre")
    names = path.strip().split(".")
    table, target = TABLE, out
    for depth, name in enumerate(names):
        dotted = ".".join(names[:depth])
        if not isinstance(table, dict):
            raise ConfigError(f"{source}: {dotted} is a key, not a section")
        if name not in table:
            raise _unknown(name, dotted, table, source)
        if depth < len(names) - 1:
            table, target = table[name], target[name]
    key = table[names[-1]]
    if isinstance(key, dict):
        raise ConfigError(f"{source}: {path.strip()} is a section; set one of its keys: {', '.join(key)}")
    try:
        value = yaml.load(raw, Loader=_Loader) if raw.strip() else ""
    except (yaml.YAMLError, ValueError, OverflowError, RecursionError) as exc:
        # ValueError: a YAML date that does not exist (2001-02-30) fails while being constructed
        raise ConfigError(f"{source}: {path.strip()}: the value is not valid YAML: {exc}") from None
    # On the command line the text is unambiguous: a string key keeps it as written (12:00:00, 007).
    if key.kind in ("str", "name", "walltime") and not isinstance(value, str) and value is not None:
        value = raw.strip()
    target[names[-1]] = _check(key, value, path.strip(), source)
    given.add(path.strip())


def _resolve_chunking(out, given, source):
    """Exactly one of objects_per_chunk, chunks_per_tile; the default applies only if neither is given."""
    chunking = out["chunking"]
    opc_given = "chunking.objects_per_chunk" in given and chunking["objects_per_chunk"] is not None
    cpt_given = "chunking.chunks_per_tile" in given and chunking["chunks_per_tile"] is not None
    if opc_given and cpt_given:
        raise ConfigError(f"{source}: chunking: set exactly one of objects_per_chunk and "
                          f"chunks_per_tile, not both")
    if cpt_given:
        chunking["objects_per_chunk"] = None
    if (chunking["objects_per_chunk"] is None) == (chunking["chunks_per_tile"] is None):
        raise ConfigError(f"{source}: chunking: set exactly one of objects_per_chunk and chunks_per_tile")


class _Loader(yaml.SafeLoader):
    """safe_load, but a date that does not exist (2001-02-30) is a YAML error with its line and
    column instead of a bare ValueError."""

    def construct_yaml_timestamp(self, node):
        try:
            return super().construct_yaml_timestamp(node)
        except (ValueError, OverflowError) as exc:
            raise yaml.constructor.ConstructorError(None, None, f"not a valid date ({exc})",
                                                    node.start_mark) from None


_Loader.add_constructor("tag:yaml.org,2002:timestamp", _Loader.construct_yaml_timestamp)


def _read_yaml(path, what="run config"):
    try:
        with open(path, encoding="utf-8") as handle:
            return yaml.load(handle, Loader=_Loader)
    except FileNotFoundError:
        raise ConfigError(f"{path}: {what} not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: {what} is a directory, expected a YAML file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the {what}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{path}:{where}: not valid YAML: {problem}") from None
    except (ValueError, OverflowError, RecursionError) as exc:   # e.g. a date 2001-02-30
        raise ConfigError(f"{path}: not valid YAML: {type(exc).__name__}: {exc}") from None


#: The environment variable that names the site-defaults file (see the module docstring).
SITE_DEFAULTS_ENV = "DRE_BATCH_DEFAULTS"


def site_defaults_path():
    """The site-defaults file named by ``$DRE_BATCH_DEFAULTS``, or None where it is unset or empty."""
    return os.environ.get(SITE_DEFAULTS_ENV, "").strip() or None


def site_defaults():
    """``(mapping, label)`` of the site-defaults file (`site_defaults_path`), or ``(None, None)``
    without one. Its chunking cannot be defaulted (a run sets exactly one of two keys)."""
    path = site_defaults_path()
    if path is None:
        return None, None
    label = f"{path} (site defaults, ${SITE_DEFAULTS_ENV})"
    raw = _read_yaml(path, what=f"site-defaults file named by ${SITE_DEFAULTS_ENV}")
    if isinstance(raw, dict) and "chunking" in raw:
        raise ConfigError(f"{label}: chunking has no site default; set it in the run config")
    return raw, label


def resolve(raw=None, overrides=(), source="<config>", site=False):
    """A `RunConfig` from an already-parsed mapping `raw` (None: all defaults) and overrides; with
    ``site``, over the site defaults (`site_defaults`) rather than the built-in ones alone."""
    out, given = _defaults(TABLE), set()
    if site:
        site_raw, label = site_defaults()
        _merge(site_raw, TABLE, out, "", label, set())
    _merge(raw, TABLE, out, "", source, given)
    for text in overrides:
        _override(text, out, given)
    _resolve_chunking(out, given, source)
    return RunConfig(out)


def load_config(path, overrides=(), site=False):
    """Read, validate and resolve the run config at `path`, then apply `overrides` (key=value);
    ``site``: over the site defaults (``dre-batch setup`` only)."""
    return resolve(_read_yaml(path), overrides, source=str(path), site=site)


def _freeze(value):
    if isinstance(value, dict):
        return MappingProxyType({k: _freeze(v) for k, v in value.items()})
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


class RunConfig:
    """The resolved, read-only run config: ``cfg["fit"]["statistic"]`` or ``cfg.fit["statistic"]``."""

    __slots__ = ("_data", "_frozen")

    def __init__(self, data):
        object.__setattr__(self, "_data", copy.deepcopy(data))
        object.__setattr__(self, "_frozen", _freeze(self._data))

    def __getitem__(self, section):
        return self._frozen[section]

    def __getattr__(self, section):
        try:
            return self._frozen[section]
        except KeyError:
            raise AttributeError(section) from None

    def __setattr__(self, name, value):
        raise AttributeError("RunConfig is read-only")

    def __eq__(self, other):
        return isinstance(other, RunConfig) and self.hash() == other.hash()

    def __hash__(self):
        return hash(self.hash())

    def __repr__(self):
        return f"RunConfig({self._data['run']['name']!r}, hash={self.hash()[:12]})"

    def as_dict(self):
        """A mutable deep copy of the resolved config, sections in table order."""
        return copy.deepcopy(self._data)

    def to_yaml(self):
        """The resolved config as YAML; loading it gives an equal config."""
        return yaml.safe_dump(self._data, sort_keys=False, default_flow_style=False)

    def hash(self):
        """SHA-256 (hex) of the canonical JSON of the resolved config."""
        text = json.dumps(self._data, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()
