"""Exceptions for user-facing problems: bad input, config, I/O, environment, external tools.

Every `DreError` carries a message that names the file, key or command and what was
expected; the command-line layer turns it into one line and a non-zero exit code.
Per-object problems (a NaN cutout, an empty mask) are flags, never exceptions.
"""

import shlex


class DreError(Exception):
    """Base class: a problem the user can fix. `exit_code` is what the CLI returns."""

    exit_code = 2


class InputError(DreError):
    """An input file is missing, unreadable or inconsistent."""


class CubeFormatError(InputError):
    """A model cube lacks header keys or its data do not match them."""


class PSFError(InputError):
    """A PSF file cannot be used (wrong sampling, no accepted extension, bad shape)."""


class CutsFormatError(InputError):
    """A cuts file is neither the DRE layout nor the stacked layout, or has bad shapes."""


class BackendError(DreError):
    """The requested compute backend (e.g. GPU) is not available."""


class ToolNotFoundError(DreError):
    """An external program (SExtractor, PSFEx) is not installed or not where the config says."""


class ToolError(DreError):
    """An external program exited non-zero: the message carries its command line, exit code and stderr."""

    def __init__(self, command, returncode, stderr=""):
        self.command, self.returncode, self.stderr = list(map(str, command)), returncode, stderr or ""
        tail = " | ".join(line.strip() for line in self.stderr.strip().splitlines()[-3:] if line.strip())
        super().__init__(f"command `{shlex.join(self.command)}` exited with code {returncode}"
                         + (f": {tail}" if tail else " (no stderr)"))
