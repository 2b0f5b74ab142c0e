"""An Apptainer definition file read as Apptainer reads it: header, %files, shell sections.

`read_definition(path)` gives the header keys (``Bootstrap``, ``From``, ...), the raw text of each
``%section`` and the ``%files`` entries as ``(source, destination)`` pairs. The text of a section
is what Apptainer hands to ``/bin/sh``: every line up to the next ``%section`` line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

SECTIONS = ("setup", "files", "post", "environment", "runscript", "startscript", "test", "labels",
            "help", "arguments")
_SECTION = re.compile(r"^%(\w+)\s*$")


class DefinitionError(ValueError):
    """The definition file cannot be read as an Apptainer definition."""


@dataclass(frozen=True)
class Definition:
    path: Path
    header: dict
    sections: dict

    def section(self, name: str) -> str:
        """The text of ``%name`` ('' when the definition has none)."""
        return self.sections.get(name, "")

    @property
    def files(self) -> list:
        """``(source, destination)`` of each %files line; a lone source is copied to its own path."""
        pairs = []
        for line in self.section("files").splitlines():
            words = line.split()
            if words and not words[0].startswith("#"):
                if len(words) > 2:
                    raise DefinitionError(f"{self.path}: %files line {line.strip()!r}: expected SOURCE [DEST]")
                pairs.append((words[0], words[-1]))
        return pairs


def read_definition(path) -> Definition:
    """Parse `path`; a DefinitionError names the file and the line that is not understood."""
    path = Path(path)
    header, sections, name = {}, {}, None
    for number, line in enumerate(path.read_text().splitlines(), 1):
        match = _SECTION.match(line)
        if match:
            name = match.group(1).lower()
            if name not in SECTIONS:
                raise DefinitionError(f"{path}:{number}: unknown section %{match.group(1)}")
            sections[name] = []
        elif name is not None:
            sections[name].append(line)
        elif line.strip() and not line.lstrip().startswith("#"):
            key, sep, value = line.partition(":")
            if not sep:
                raise DefinitionError(f"{path}:{number}: expected 'Key: value' in the header, got {line!r}")
            header[key.strip().lower()] = value.strip()
    if "bootstrap" not in header:
        raise DefinitionError(f"{path}: no 'Bootstrap:' line in the header")
    return Definition(path, header, {k: "\n".join(v).strip("\n") + "\n" for k, v in sections.items()})
