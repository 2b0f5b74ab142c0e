"""Scratch directories for module-scoped fixtures that free their disk when the module is done.

The suite writes many run directories of a few hundred MB each (every tile's convolved model cube);
kept to the end of the session they add up to about 20 GB. Function-scoped ``tmp_path`` directories
go when their test passes (``tmp_path_retention_policy = failed`` in setup.cfg); these go when their
fixture's scope ends, unless a test failed meanwhile, so a failure keeps what it needs to be read.
"""

from __future__ import annotations

import shutil


def scratch_dir(request, tmp_path_factory, name: str):
    """``tmp_path_factory.mktemp(name)``, removed at the end of the requesting fixture's scope if no
    test failed while it existed."""
    path = tmp_path_factory.mktemp(name)
    failed_before = request.session.testsfailed

    def remove():
        if request.session.testsfailed == failed_before:
            shutil.rmtree(path, ignore_errors=True)

    request.addfinalizer(remove)
    return path
