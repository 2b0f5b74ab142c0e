"""The one place where user-facing errors become a one-line message and an exit code."""

from __future__ import annotations

import logging
import sys

from ..errors import DreError


_HANDLER = logging.StreamHandler()


def _log_as(prog: str) -> None:
    """Log INFO lines as ``prog: message`` on stderr, unless the application (e.g. pytest) has
    configured logging itself; one handler, re-labelled when another command runs in-process."""
    root = logging.getLogger()
    if root.handlers and _HANDLER not in root.handlers:
        return
    _HANDLER.setFormatter(logging.Formatter(f"{prog}: %(message)s"))
    if _HANDLER not in root.handlers:
        root.addHandler(_HANDLER)
        root.setLevel(logging.INFO)


def run_main(prog: str, driver, argv=None) -> int:
    """Call ``driver(argv)``; turn a `DreError` into ``prog: error: message`` and its exit code."""
    _log_as(prog)
    try:
        return int(driver(argv) or 0)
    except DreError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
