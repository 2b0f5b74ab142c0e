"""The one place where user-facing errors become a one-line message and an exit code."""

from __future__ import annotations

import logging
import sys

from ..errors import DreError


def run_main(prog: str, driver, argv=None) -> int:
    """Call ``driver(argv)``; turn a `DreError` into ``prog: error: message`` and its exit code."""
    logging.basicConfig(level=logging.INFO, format=f"{prog}: %(message)s")
    try:
        return int(driver(argv) or 0)
    except DreError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
