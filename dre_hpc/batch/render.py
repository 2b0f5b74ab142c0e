"""Job scripts from the Jinja2 templates in ``templates/`` (base.sh.j2; slurm, pbs, local extend it).

``render_script(config, scheduler_name, stage, context)`` is called by ``dre-batch setup`` with
exactly this render context::

    {"run_name": str,        # config run.name
     "stage": "prep"|"fit",  # the stage (must equal the `stage` argument)
     "python": str,          # absolute path of the Python that jobs run on the host
     "job_name": str}        # scheduler job name

Everything else comes from the config: ``resources.<stage>`` (directives, launcher, prologue,
epilogue), ``container`` (image, binds, gpu, runtime: ``apptainer exec`` or ``bwrap`` into a root
filesystem folder), ``run.python`` and ``scheduler.warning_seconds``
(SLURM fit jobs: ``--signal=B:USR1@N``). With a container image the
payload runs the image's Python: ``run.python`` when set, else ``python`` from the image's PATH
(the host's interpreter does not exist inside the image), so ``context["python"]`` is then unused.

Every value that reaches a script goes through the ``shquote`` filter (``shlex.quote``); only
``prologue``, ``epilogue`` and ``extra_directives`` are inserted verbatim. Directive values are
validated per scheduler first (no line breaks or other control characters, walltime format, names), failing with a `RenderError`
that names the config key. Templates are found in the installed package (``dre_hpc/templates``,
put there by setup.py when a wheel is built) or else in the source tree's top-level ``templates/``.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import jinja2

from dre_hpc.errors import DreError

SCHEDULERS = ("slurm", "pbs", "local")
STAGES = ("prep", "fit", "collate")
CONTEXT_KEYS = ("run_name", "stage", "python", "job_name")
SIGNAL_MAX = 65535               # seconds: the largest sig_time of sbatch --signal
_WALLTIME = re.compile(r"^(?:(\d+)-)?(\d{1,3}):([0-5]\d):([0-5]\d)$")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\x85\u2028\u2029]")
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.@+-]*$")
_JOB_NAME = {"slurm": re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+-]*$"),
             "pbs": re.compile(r"^[A-Za-z][A-Za-z0-9_.+-]{0,235}$"),
             "local": re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+-]*$")}


class RenderError(DreError):
    """A job script cannot be rendered: a config value the scheduler would not accept."""


# -- filters (the maths of the directives) ----------------------------------------------------
def shquote(value) -> str:
    """``value`` as one shell word (``shlex.quote`` of its text); lists: the words joined."""
    if isinstance(value, (list, tuple)):
        return " ".join(shquote(v) for v in value)
    if isinstance(value, bool) or value is None:
        raise RenderError(f"cannot put {value!r} into a job script")
    return shlex.quote(str(value))


def walltime_seconds(text: str) -> int:
    """Seconds of a walltime ``HH:MM:SS`` or ``D-HH:MM:SS``."""
    match = _WALLTIME.match(str(text))
    if not match:
        raise RenderError(f'walltime {text!r}: expected "HH:MM:SS" or "D-HH:MM:SS"')
    days, hours, minutes, seconds = (int(g or 0) for g in match.groups())
    return ((days * 24 + hours) * 60 + minutes) * 60 + seconds


def walltime_hms(text: str) -> str:
    """A walltime as ``HH:MM:SS`` with days folded into the hours (PBS): 1-06:00:00 -> 30:00:00."""
    total = walltime_seconds(text)
    return f"{total // 3600:02d}:{total % 3600 // 60:02d}:{total % 60:02d}"


def walltime_slurm(text: str) -> str:
    """A walltime for ``--time``: ``D-HH:MM:SS`` with days, else ``HH:MM:SS`` (both normalised)."""
    total = walltime_seconds(text)
    days, rest = divmod(total, 86400)
    hms = f"{rest // 3600:02d}:{rest % 3600 // 60:02d}:{rest % 60:02d}"
    return f"{days}-{hms}" if days else hms


def _memory(mem_gb, giga: str, mega: str) -> str:
    mem_gb = float(mem_gb)
    if mem_gb <= 0:
        raise RenderError(f"memory {mem_gb} GB: must be positive")
    if mem_gb.is_integer():
        return f"{int(mem_gb)}{giga}"
    return f"{max(1, round(mem_gb * 1024))}{mega}"


def mem_slurm(mem_gb) -> str:
    """Memory for ``--mem``: whole GB as ``8G``, else MB (``0.5`` -> ``512M``)."""
    return _memory(mem_gb, "G", "M")


def mem_pbs(mem_gb) -> str:
    """Memory for a PBS select chunk: ``8GB``, else ``512MB``."""
    return _memory(mem_gb, "GB", "MB")


def pbs_select(res) -> str:
    """The PBS Pro chunk statement ``select=N:ncpus=C:mpiprocs=M[:mem=XGB][:ngpus=G]`` of one node
    type: ``ncpus`` = ranks per node x cores per rank, ``mem`` per node (omitted when 0)."""
    ranks = int(res["ntasks_per_node"])
    parts = [f"select={int(res['nodes'])}", f"ncpus={ranks * int(res['cpus_per_task'])}",
             f"mpiprocs={ranks}"]
    if float(res["mem_gb"]) > 0:
        parts.append(f"mem={mem_pbs(res['mem_gb'])}")
    if int(res["gpus_per_node"]) > 0:
        parts.append(f"ngpus={int(res['gpus_per_node'])}")
    return ":".join(parts)


def total_ranks(res) -> int:
    """MPI ranks of one job: nodes x ranks per node."""
    return int(res["nodes"]) * int(res["ntasks_per_node"])


def bwrap_bind(spec: str) -> str:
    """An Apptainer bind ``SRC[:DST[:ro|rw]]`` as bubblewrap options: ``--bind SRC DST`` or
    ``--ro-bind SRC DST`` (quoted)."""
    parts = str(spec).split(":")
    if len(parts) > 3 or not parts[0] or (len(parts) == 3 and parts[2] not in ("ro", "rw")):
        raise RenderError(f"container.binds: {spec!r}: expected SRC[:DST[:ro|rw]] for the bwrap runtime")
    source, dest = parts[0], parts[1] if len(parts) > 1 and parts[1] else parts[0]
    option = "--ro-bind" if len(parts) == 3 and parts[2] == "ro" else "--bind"
    return f"{option} {shquote(source)} {shquote(dest)}"


FILTERS = {"shquote": shquote, "walltime_hms": walltime_hms, "walltime_slurm": walltime_slurm,
           "mem_slurm": mem_slurm, "mem_pbs": mem_pbs, "pbs_select": pbs_select, "bwrap_bind": bwrap_bind}


# -- templates ---------------------------------------------------------------------------------
def template_dirs() -> list:
    """Folders holding the templates: the installed package's, then the source tree's."""
    here = Path(__file__).resolve().parent.parent          # .../dre_hpc
    candidates = [here / "templates", here.parent / "templates"]
    return [str(p) for p in candidates if (p / "base.sh.j2").is_file()]


def environment() -> jinja2.Environment:
    """The Jinja2 environment: strict undefined, no autoescape, trimmed blocks, our filters."""
    dirs = template_dirs()
    if not dirs:
        raise RenderError("job-script templates not found (base.sh.j2 in dre_hpc/templates or the "
                          "source tree's templates/): reinstall dre_hpc")
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(dirs), undefined=jinja2.StrictUndefined,
                             autoescape=False, trim_blocks=True, lstrip_blocks=True,
                             keep_trailing_newline=True)
    env.filters.update(FILTERS)
    return env


# -- validation --------------------------------------------------------------------------------
def _one_line(key: str, value) -> None:
    if isinstance(value, str) and ("\n" in value or "\r" in value):
        raise RenderError(f"{key}: {value!r} contains a line break (a directive is one line)")
    if isinstance(value, str) and _CONTROL.search(value):
        raise RenderError(f"{key}: {value!r} contains a control character (a directive is one line of text)")


def _check_name(key: str, value, pattern=_NAME, what="a name of letters, digits, _ . @ + -") -> None:
    _one_line(key, value)
    if value is not None and not pattern.match(str(value)):
        raise RenderError(f"{key}: {value!r} is not valid here: expected {what}")


def validate(config, scheduler: str, stage: str, context: dict) -> None:
    """Raise a RenderError naming the key of the first value `scheduler` would not accept."""
    if scheduler not in SCHEDULERS:
        raise RenderError(f"scheduler.name: {scheduler!r} is not one of {', '.join(SCHEDULERS)}")
    if stage not in STAGES:
        raise RenderError(f"stage {stage!r} is not one of {', '.join(STAGES)}")
    missing = [k for k in CONTEXT_KEYS if k not in context]
    if missing:
        raise RenderError(f"render context lacks {', '.join(missing)} (expected {', '.join(CONTEXT_KEYS)})")
    if context["stage"] != stage:
        raise RenderError(f"render context stage {context['stage']!r} differs from stage {stage!r}")
    res, key = config.resources[stage], f"resources.{stage}"
    for name in ("partition", "queue", "account"):
        _check_name(f"{key}.{name}", res[name])
    try:
        walltime_seconds(res["walltime"])
    except RenderError as exc:
        raise RenderError(f"{key}.walltime: {exc}") from None
    for i, line in enumerate(res["extra_directives"]):
        _one_line(f"{key}.extra_directives[{i}]", line)
    what = "a letter first (PBS), then letters, digits, _ . + -, at most 236" if scheduler == "pbs" \
        else "letters, digits, _ . + -"
    _check_name("job name (from run.name)", context["job_name"], _JOB_NAME[scheduler], what)
    _check_name("run.name", context["run_name"])
    if scheduler == "slurm" and stage == "fit":
        _check_warning(int(config.scheduler["warning_seconds"]), res["walltime"])
    if not str(context["python"]).strip():
        raise RenderError("run.python: empty Python path")
    if config.container["image"] and config.container["runtime"] == "bwrap":
        _check_rootfs(config.container)


def _check_rootfs(container) -> None:
    """``container.runtime: bwrap`` enters a root filesystem folder; it has no --nv."""
    image = Path(container["image"])
    if container["gpu"]:
        raise RenderError("container.gpu: true needs container.runtime apptainer (--nv); bwrap passes no GPUs")
    if image.is_file():
        raise RenderError(f"container.image: {image} is a file; container.runtime bwrap enters a root "
                          f"filesystem folder (make container-check builds one; apptainer runs SIF files)")
    if image.is_dir() and not (image / ".singularity.d" / "actions" / "exec").is_file():
        raise RenderError(f"container.image: {image} has no .singularity.d/actions/exec: not a root filesystem "
                          f"built by containers/build_rootfs.py or apptainer build --sandbox")


def _check_warning(warning: int, walltime: str) -> None:
    """``--signal=B:USR1@warning``: SLURM takes at most 65535 s, and a warning as long as the
    walltime would interrupt every fit job as soon as it starts."""
    if warning > SIGNAL_MAX:
        raise RenderError(f"scheduler.warning_seconds: {warning} s is more than SLURM's --signal "
                          f"accepts ({SIGNAL_MAX} s)")
    if warning and warning >= walltime_seconds(walltime):
        raise RenderError(f"scheduler.warning_seconds: {warning} s is not shorter than "
                          f"resources.fit.walltime {walltime}: every fit would be interrupted at once "
                          f"(lower it, or 0 for no warning)")


def _payload_python(config, context) -> str:
    if config.container["image"]:
        return config.run["python"] or "python"
    return str(context["python"])


def render_script(config, scheduler_name: str, stage: str, context: dict) -> str:
    """The job script of `stage` for `scheduler_name` (``slurm``, ``pbs`` or ``local``)."""
    validate(config, scheduler_name, stage, context)
    res = config.resources[stage]
    values = dict(context, res=res, ranks=total_ranks(res), container=config.container,
                  python=_payload_python(config, context), scheduler=scheduler_name,
                  warning_seconds=int(config.scheduler["warning_seconds"]))
    try:
        return environment().get_template(f"{scheduler_name}.sh.j2").render(**values)
    except jinja2.TemplateError as exc:
        raise RenderError(f"template {scheduler_name}.sh.j2: {exc}") from None
