"""``dre-batch``: chunked runs of the tile workflow on SLURM, PBS or this machine.

Subcommands: setup, run, status, collate, link, report, archive, clean. Each parses its arguments and
calls one driver function of `dre_hpc.batch`; errors become one line and an exit code in
`common.run_main`.
"""

from __future__ import annotations

import argparse
import json
import sys

from .common import run_main


def _setup(args, argv):
    from ..batch.setup_run import setup_run
    rundir = setup_run(args.config, args.tiles, args.run_dir, args.set, args.clobber,
                       argv=["dre-batch"] + list(argv))
    tiles = rundir.tiles()
    print(f"run directory {rundir.root}: {len(tiles)} tiles, scripts in {rundir.root / 'scripts'}; "
          f"nothing submitted (next: dre-batch run {args.run_dir})")
    return 0


def _run(args, argv):
    from ..batch.run import run
    return run(args.run_dir, dry_run=args.dry_run, failed_only=args.failed_only, stage=args.stage,
               out=lambda text: print(text, flush=True))


def _status(args, argv):
    from ..batch.rundir import RunDir
    from ..batch.status import collect, format_progress, format_table, wait
    from ..batch.config import load_config
    from ..batch.schedulers import get_scheduler
    rundir = RunDir(args.run_dir).require()
    scheduler = get_scheduler(load_config(rundir.config), rundir)
    live = sys.stderr.isatty() and not args.json
    if args.wait:
        def show(status):
            if live:
                print("\r" + format_progress(status), end="", file=sys.stderr, flush=True)
        status = wait(rundir, scheduler, interval=args.interval, on_update=show)
        if live:
            print(file=sys.stderr)
    else:
        status = collect(rundir, scheduler)
    if args.json:
        print(json.dumps(status.to_json(), indent=1))
    else:
        print(format_table(status))
    return 0 if status.all_done else 1


def _collate(args, argv):
    from ..batch.collate import collate
    from ..batch.rundir import RunDir
    report = collate(RunDir(args.run_dir).require(), allow_missing=args.allow_missing)
    missing = f"; {len(report.missing)} chunks missing (--allow-missing)" if report.missing else ""
    print(f"collated {report.objects} objects of {len(report.rows)} tiles in {report.seconds:.1f} s{missing}")
    for path in report.outputs:
        print(f"  {path}")
    return 0


def _link(args, argv):
    from ..batch.archive import link
    from ..batch.rundir import RunDir
    rundir = RunDir(args.run_dir).require()
    linked = link(rundir)
    print(f"{len(linked)} files in {rundir.output_dir}: {', '.join(p.name for p in linked)}")
    return 0


def _report(args, argv):
    from ..report.build import build_report, text_summary
    if args.gallery < 0:
        from ..errors import InputError
        raise InputError(f"--gallery must be >= 0, got {args.gallery}")
    report = build_report(args.run_dir, truth_dir=args.truth_dir, gallery=args.gallery, write=not args.text)
    print(text_summary(report))
    if report.page:
        print(f"report: {report.page}")
    return 0


def _archive(args, argv):
    from ..batch.archive import archive
    from ..batch.rundir import RunDir
    report = archive(RunDir(args.run_dir).require())
    print(f"archived {report.members} files into {report.path}; removed: {', '.join(report.removed) or 'nothing'}")
    for entry in report.skipped:
        print(f"  left out: {entry}")
    return 0


def _clean(args, argv):
    from ..batch.archive import clean
    from ..batch.rundir import RunDir
    what = ("tiles", "chunks", ".cache") if args.what == "all" else (args.what,)
    removed = clean(RunDir(args.run_dir).require(), what)
    print(f"removed: {', '.join(removed) or 'nothing (already clean)'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dre-batch", description="Chunked runs of the tile workflow "
                                "(SExtractor, PSFEx, cuts, fits) on SLURM, PBS or this machine.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    s = sub.add_parser("setup", help="create a run directory and render its job scripts; submit nothing")
    s.add_argument("config", help="run config (YAML; see run_configs/)")
    s.add_argument("tiles", help="text file with one image path a line")
    s.add_argument("--run-dir", required=True, help="run directory to create")
    s.add_argument("--clobber", action="store_true", help="replace an existing run directory")
    s.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value (repeatable)")
    s.set_defaults(func=_setup)
    r = sub.add_parser("run", help="submit the jobs (local scheduler: run them here)")
    r.add_argument("run_dir")
    r.add_argument("--dry-run", action="store_true", help="print the submit commands, submit nothing")
    r.add_argument("--failed-only", action="store_true", help="resubmit only failed or vanished jobs")
    r.add_argument("--stage", choices=("prep", "fit"), help="submit only this stage")
    r.set_defaults(func=_run)
    st = sub.add_parser("status", help="state of every tile and chunk; exit 0 only when all are done")
    st.add_argument("run_dir")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    st.add_argument("--wait", action="store_true", help="block until nothing is pending or running")
    st.add_argument("--interval", type=float, default=10.0, help="--wait polling interval in s (default 10)")
    st.set_defaults(func=_status)
    c = sub.add_parser("collate", help="verify the chunks and merge them per tile and into one catalogue")
    c.add_argument("run_dir")
    c.add_argument("--allow-missing", action="store_true", help="collate what is done; list the rest")
    c.set_defaults(func=_collate)
    for name, func, text in (("link", _link, "put the final files into DIR/output/"),
                             ("archive", _archive, "pack logs, scripts and markers; remove chunk files")):
        a = sub.add_parser(name, help=text)
        a.add_argument("run_dir")
        a.set_defaults(func=func)
    rp = sub.add_parser("report", help="figures, validation and an HTML page in DIR/output/report/")
    rp.add_argument("run_dir")
    rp.add_argument("--text", action="store_true", help="print the headline numbers only; write nothing")
    rp.add_argument("--truth-dir", help="where <tile>_truth.fits are (default: next to the tile images)")
    rp.add_argument("--gallery", type=int, default=12, metavar="N",
                    help="mosaics of N random and N worst fits (default 12; 0: none)")
    rp.set_defaults(func=_report)
    cl = sub.add_parser("clean", help="remove intermediates of a collated run")
    cl.add_argument("run_dir")
    cl.add_argument("what", nargs="?", default="tiles", choices=("tiles", "chunks", "all"),
                    help="tiles: prep products and model caches (default); chunks: chunk outputs; "
                         "all: both and the compiled kernels' cache")
    cl.set_defaults(func=_clean)
    return p


def _driver(argv):
    from ..batch.rundir import mask_world_writable
    mask_world_writable()             # files of a run: the user's umask, and never world-writable
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    return args.func(args, argv)


def main(argv=None) -> int:
    return run_main("dre-batch", _driver, argv)


if __name__ == "__main__":
    sys.exit(main())
