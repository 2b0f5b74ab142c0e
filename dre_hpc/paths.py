"""Where dre_hpc keeps generated files that are not outputs (the default model cube, PSF-convolved caches)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """The user cache directory: ``$DRE_HPC_CACHE``, else ``$XDG_CACHE_HOME/dre_hpc``, else ``~/.cache/dre_hpc``."""
    explicit = os.environ.get("DRE_HPC_CACHE")
    if explicit:
        path = Path(explicit)
    else:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        path = Path(base) / "dre_hpc"
    path.mkdir(parents=True, exist_ok=True)
    return path
