"""User mistakes and bad data through the ``dre`` command.

A mistake in the inputs (a broken cube, an unusable PSF, a missing file) stops the run with a
non-zero exit code and one line naming the file and what is wrong, never a traceback. Bad pixels
or a bad object never stop a run: the object gets a row, FLAGS bits and fill values, and the
other objects are fitted normally.
"""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

from dre_hpc.cli.dre import main
from dre_hpc.flags import UNFITTED, FitFlag
from dre_hpc.io.cuts import write_cuts
from dre_hpc.sim.cutouts import SimSpec, simulate_cutouts

from helpers import psfex_hdu, write_psfex
from scratch import scratch_dir

IMG = "tile7"
N = 9
EDGE = int(FitFlag.EDGE_LOGR_MIN | FitFlag.EDGE_LOGR_MAX | FitFlag.EDGE_AX_RATIO_MIN | FitFlag.EDGE_INDEX)
# index of each damaged object in the cuts file
NAN_PIX, ZERO_RMS, EMPTY_MASK, ZERO_DATA, ALL_NAN, INF_RMS = 1, 3, 4, 6, 7, 8
GOOD = [0, 2, 5]


@pytest.fixture(scope="module")
def sim():
    cuts, truth, psf = simulate_cutouts(SimSpec(n_objects=N, seed=31, snr=(100.0, 200.0), logr=(0.3, 1.0)))
    c = 64
    cuts.data[NAN_PIX, c - 3:c + 2, c + 1:c + 4] = np.nan          # NaN pixels inside the mask
    cuts.rms[ZERO_RMS, c - 6:c - 2, c - 6:c + 6] = 0.0               # zero rms inside the mask
    cuts.mask[EMPTY_MASK] = False                                    # nothing to fit
    cuts.data[ZERO_DATA] = 0.0                                       # a blank cut
    cuts.data[ALL_NAN] = np.nan                                      # no usable pixel at all
    cuts.rms[INF_RMS, c - 2:c + 2, :] = np.inf                       # infinite rms: non-finite input
    return cuts, truth, psf


@pytest.fixture(scope="module")
def workdir(request, tmp_path_factory, sim):
    cuts, _, psf = sim
    root = scratch_dir(request, tmp_path_factory, "bad_inputs")
    (root / "Cuts").mkdir()
    (root / "CutsDRE").mkdir()
    write_cuts(root / "Cuts" / f"{IMG}_cuts.h5", cuts)
    write_cuts(root / "CutsDRE" / f"{IMG}_cuts.h5", cuts, layout="dre")
    fits.PrimaryHDU(psf).writeto(root / "psf.fits")
    return root


def run(argv, capsys):
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def base_args(workdir, cube, out):
    return ["-m", cube, "--psf", workdir / "psf.fits", "-i", workdir / "Cuts", "-o", out / "S",
            "--chi", out / "C", "--catalogs", out / "none"]


def check_user_error(code, err, *needles):
    """Non-zero exit, one ``dre: error:`` line containing every needle, no traceback."""
    assert code != 0
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("dre: error: ")]
    assert len(errors) == 1, err
    for needle in needles:
        assert str(needle) in errors[0], (needle, errors[0])


def read_summary(path):
    return Table.read(path, hdu=1, mask_invalid=False)


# -- input mistakes: one clear line, non-zero exit ----------------------------------------------

def test_cube_missing_header_key(tmp_path, workdir, default_cube_file, capsys):
    broken = tmp_path / "cube_without_nlogh.fits"
    with fits.open(default_cube_file) as hdul:
        hdul[0].header.remove("NLOGH")
        hdul.writeto(broken)
    code, err = run(base_args(workdir, broken, tmp_path), capsys)
    check_user_error(code, err, broken, "NLOGH")
    assert not (tmp_path / "S").exists()


def test_cube_missing_file_and_not_fits(tmp_path, workdir, capsys):
    code, err = run(base_args(workdir, tmp_path / "nope.fits", tmp_path), capsys)
    check_user_error(code, err, tmp_path / "nope.fits", "not found")
    garbage = tmp_path / "garbage.fits"
    garbage.write_bytes(b"not a FITS file at all\n" * 300)
    code, err = run(base_args(workdir, garbage, tmp_path), capsys)
    check_user_error(code, err, garbage)


def test_psfex_oversampled(tmp_path, workdir, sim, default_cube_file, capsys):
    _, _, psf = sim
    path = write_psfex(tmp_path / f"{IMG}.psf", [psfex_hdu(psf[None], accepted=20, samp=0.5)])
    args = base_args(workdir, default_cube_file, tmp_path)
    args[args.index("--psf") + 1] = path
    code, err = run(args, capsys)
    check_user_error(code, err, path, "PSF_SAMPLING", "0.5")


@pytest.mark.parametrize("where", ["missing file", "empty directory"])
def test_missing_psf(tmp_path, workdir, default_cube_file, capsys, where):
    args = base_args(workdir, default_cube_file, tmp_path)
    if where == "missing file":
        psf = tmp_path / "nope.psf"
        needles = (psf, "does not exist")
    else:
        psf = tmp_path / "PSF"
        psf.mkdir()
        needles = (psf, f"{IMG}.psf")
    args[args.index("--psf") + 1] = psf
    code, err = run(args, capsys)
    check_user_error(code, err, *needles)


def test_default_psf_directory_missing(tmp_path, workdir, default_cube_file, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)                          # no ./PSF here
    code, err = run(["-m", default_cube_file, "-i", workdir / "Cuts", "-o", "S", "--chi", "C"], capsys)
    check_user_error(code, err, "PSF")


def test_cuts_input_mistakes(tmp_path, workdir, default_cube_file, capsys):
    args = base_args(workdir, default_cube_file, tmp_path)
    i = args.index("-i") + 1
    args[i] = tmp_path / "NoCuts"
    check_user_error(*run(args, capsys), tmp_path / "NoCuts")
    (tmp_path / "EmptyCuts").mkdir()
    args[i] = tmp_path / "EmptyCuts"
    check_user_error(*run(args, capsys), tmp_path / "EmptyCuts", "_cuts.h5")
    (tmp_path / "BadCuts").mkdir()
    garbage = tmp_path / "BadCuts" / f"{IMG}_cuts.h5"
    garbage.write_text("not HDF5\n" * 100)
    args[i] = tmp_path / "BadCuts"
    check_user_error(*run(args, capsys), garbage, "HDF5")
    with h5py.File(garbage, "w") as h5:
        h5["data"] = np.zeros((2, 100, 100), np.float32)
    check_user_error(*run(args, capsys), garbage)


def test_bad_option_values(tmp_path, workdir, default_cube_file, capsys):
    args = base_args(workdir, default_cube_file, tmp_path)
    check_user_error(*run(args + ["--chunk", "0"], capsys), "--chunk")
    check_user_error(*run(args + ["--gain", "-2"], capsys), "gain")


def test_unreadable_catalogue(tmp_path, workdir, default_cube_file, capsys):
    cats = tmp_path / "Sextracted"
    cats.mkdir()
    (cats / f"{IMG}_cat.fits").write_text("garbage\n" * 100)
    args = base_args(workdir, default_cube_file, tmp_path)
    args[args.index("--catalogs") + 1] = cats
    check_user_error(*run(args, capsys), cats / f"{IMG}_cat.fits")


def test_argparse_mistakes_exit_2_without_traceback(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--statistic", "median"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice" in err and "Traceback" not in err


# -- bad objects: flagged rows, the others fitted -----------------------------------------------

@pytest.fixture(scope="module")
def bad_run(workdir, default_cube_file):
    code = main([str(a) for a in ["-m", default_cube_file, "--psf", workdir / "psf.fits", "-i", workdir / "Cuts",
                                  "-o", workdir / "S", "--chi", workdir / "C", "--catalogs", workdir / "none",
                                  "--zero-point", 30, "--chunk", 4, "--mosaics", "--mosaics-dir",
                                  workdir / "M", "--mosaic-png"]])
    return code, read_summary(workdir / "S" / f"{IMG}_dre.fits")


def test_bad_objects_do_not_stop_the_run(bad_run, sim, workdir):
    code, t = bad_run
    cuts, _, _ = sim
    assert code == 0
    assert len(t) == N
    np.testing.assert_array_equal(t["NUMBER"], cuts.objects["NUMBER"])
    with h5py.File(workdir / "C" / f"{IMG}_chi.h5", "r") as h5:
        assert len(h5) == N
    # a mosaic (FITS and PNG) for every object, the unfitted ones with an empty model panel
    for name in (f"00_{k:04d}" for k in cuts.objects["NUMBER"]):
        assert (workdir / "M" / IMG / f"{IMG}_{name}_mosaic.fits").is_file()
        assert (workdir / "M" / IMG / f"{IMG}_{name}_mosaic.png").is_file()
    for i in (EMPTY_MASK, ALL_NAN):
        panels = fits.getdata(workdir / "M" / IMG / f"{IMG}_00_{cuts.objects['NUMBER'][i]:04d}_mosaic.fits")
        assert panels.shape == (128, 512) and not np.any(panels[:, 256:384])


def flags_of(t, i):
    return int(t["FLAGS"][i])


def test_good_objects_fitted_normally(bad_run, sim):
    _, t = bad_run
    _, truth, _ = sim
    for i in GOOD:
        assert flags_of(t, i) & ~EDGE == 0, (i, FitFlag(flags_of(t, i)))
        assert np.all(np.asarray(t["MODEL_IDX"][i]) >= 0)
        assert abs(t["AX_RATIO"][i] - truth["AX_RATIO"][i]) <= 0.1 + 1e-9
        assert abs(t["LOGR"][i] - truth["LOGR"][i]) <= 0.12 + 1e-9
        assert abs(t["FLUX"][i] / truth["FLUX"][i] - 1) < 0.1
        assert np.isfinite(t["MAG"][i]) and t["CHI2"][i] / t["DOF"][i] < 2


def test_nonfinite_and_bad_rms_pixels_are_ignored(bad_run, sim):
    """NaN data, zero rms and infinite rms inside the mask: flagged, those pixels dropped, still fitted."""
    _, t = bad_run
    _, truth, _ = sim
    for i, bit in ((NAN_PIX, FitFlag.NONFINITE_INPUT), (INF_RMS, FitFlag.NONFINITE_INPUT),
                   (ZERO_RMS, FitFlag.BAD_RMS)):
        flags = flags_of(t, i)
        assert flags & int(bit), (i, FitFlag(flags))
        assert flags & ~EDGE == int(bit), (i, FitFlag(flags))
        assert np.all(np.asarray(t["MODEL_IDX"][i]) >= 0)
        assert np.isfinite(t["CHI2"][i]) and np.isfinite(t["FLUX"][i]) and t["FLUX"][i] > 0
        assert abs(t["AX_RATIO"][i] - truth["AX_RATIO"][i]) <= 0.1 + 1e-9
        assert abs(t["LOGR"][i] - truth["LOGR"][i]) <= 0.12 + 1e-9
        assert t["NPIX"][i] < t["NPIX"][GOOD].max() or t["NPIX"][i] > 0


def unfitted(t, i):
    assert flags_of(t, i) & int(UNFITTED)
    np.testing.assert_array_equal(np.asarray(t["MODEL_IDX"][i]), -1)
    for name in ("CHI", "FLUX", "FLUX_ERR", "MAG", "AX_RATIO", "ANGLE", "LOGR", "INDEX", "AX_RATIO_MEAN",
                 "LOGR_ERR", "LOGR_PARAB"):
        assert np.isnan(t[name][i]), (i, name, t[name][i])


def test_empty_mask(bad_run):
    _, t = bad_run
    flags = flags_of(t, EMPTY_MASK)
    assert flags & int(FitFlag.EMPTY_MASK), FitFlag(flags)
    assert t["NPIX"][EMPTY_MASK] == 0
    unfitted(t, EMPTY_MASK)


def test_all_nan_object(bad_run):
    _, t = bad_run
    flags = flags_of(t, ALL_NAN)
    assert flags & int(FitFlag.NONFINITE_INPUT) and flags & int(FitFlag.FEW_PIXELS), FitFlag(flags)
    assert t["NPIX"][ALL_NAN] == 0
    unfitted(t, ALL_NAN)


def test_all_zero_data(bad_run):
    _, t = bad_run
    flags = flags_of(t, ZERO_DATA)
    assert flags & int(FitFlag.NONPOSITIVE_FLUX | FitFlag.FIT_FAILED), FitFlag(flags)
    assert not flags & int(FitFlag.NONFINITE_INPUT | FitFlag.BAD_RMS | FitFlag.EMPTY_MASK)
    assert not t["FLUX"][ZERO_DATA] > 0
    assert np.isnan(t["MAG"][ZERO_DATA])


def test_dre_layout_without_catalogue_flags_no_centre(workdir, default_cube_file, bad_run, tmp_path, capsys):
    """Without positions (DRE layout, no catalogue) every object is flagged NO_CENTRE; the rest is alike."""
    _, stacked = bad_run
    code, err = run(["-m", default_cube_file, "--psf", workdir / "psf.fits", "-i", workdir / "CutsDRE",
                     "-o", tmp_path / "S", "--chi", tmp_path / "C", "--catalogs", tmp_path / "none",
                     "--mosaics", "--mosaics-dir", tmp_path / "M", "--mosaic-png"], capsys)
    assert code == 0 and "Traceback" not in err
    t = read_summary(tmp_path / "S" / f"{IMG}_dre.fits")
    assert len(t) == N
    assert len(list((tmp_path / "M" / IMG).glob("*.png"))) == N
    nc = int(FitFlag.NO_CENTRE)
    assert all(flags_of(t, i) & nc for i in range(N))
    keep = ~(EDGE | nc)
    np.testing.assert_array_equal(np.asarray(t["FLAGS"]) & keep, np.asarray(stacked["FLAGS"]) & keep)
    assert np.isnan(t["DX"]).all()


@pytest.mark.parametrize("with_catalogue", [False, True])
def test_empty_cuts_file(tmp_path, workdir, default_cube_file, capsys, with_catalogue):
    """A tile without objects gives an empty summary, not an error (with or without a catalogue)."""
    (tmp_path / "Cuts").mkdir()
    (tmp_path / "Sextracted").mkdir()
    h5py.File(tmp_path / "Cuts" / f"{IMG}_cuts.h5", "w").close()
    if with_catalogue:
        cols = [fits.Column(name="NUMBER", format="J", array=[1, 2]),
                fits.Column(name="X_IMAGE", format="D", array=[10.0, 20.0]),
                fits.Column(name="Y_IMAGE", format="D", array=[10.0, 20.0]),
                fits.Column(name="FLAGS", format="I", array=[0, 3])]
        objs = fits.BinTableHDU.from_columns(cols)
        objs.header["EXTNAME"] = "LDAC_OBJECTS"
        fits.HDUList([fits.PrimaryHDU(), objs]).writeto(tmp_path / "Sextracted" / f"{IMG}_cat.fits")
    code, err = run(["-m", default_cube_file, "--psf", workdir / "psf.fits", "-i", tmp_path / "Cuts",
                     "-o", tmp_path / "S", "--chi", tmp_path / "C", "--catalogs", tmp_path / "Sextracted",
                     "--mosaics", "--mosaics-dir", tmp_path / "M"], capsys)
    assert code == 0, err
    assert "Traceback" not in err
    t = read_summary(tmp_path / "S" / f"{IMG}_dre.fits")
    assert len(t) == 0 and "MODEL_IDX" in t.colnames and "FLAGS" in t.colnames
    assert ("SEX_FLAGS" in t.colnames) == with_catalogue


@pytest.mark.parametrize("option", ["-o", "--chi", "--mosaics-dir"])
def test_output_path_is_a_file(tmp_path, workdir, default_cube_file, capsys, option):
    """An output directory that is an existing file: one line naming it, no traceback."""
    blocker = tmp_path / "blocker"
    blocker.write_text("I am a file\n")
    args = base_args(workdir, default_cube_file, tmp_path) + ["--mosaics", "--mosaics-dir", tmp_path / "M"]
    i = len(args) - 1 - args[::-1].index(option)
    args[i + 1] = blocker
    code, err = run(args, capsys)
    check_user_error(code, err, "cannot write", blocker)


def test_mosaic_png_without_matplotlib(tmp_path, workdir, default_cube_file, capsys, monkeypatch):
    """Without matplotlib, ``--mosaic-png`` is refused before any fit (a None entry in sys.modules
    makes ``import matplotlib`` fail as if it were not installed)."""
    import sys
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    args = base_args(workdir, default_cube_file, tmp_path) + ["--mosaics", "--mosaic-png"]
    code, err = run(args, capsys)
    check_user_error(code, err, "matplotlib", "pip install")
    assert not (tmp_path / "S").exists()


def test_bad_objects_with_the_dre_statistic(tmp_path, workdir, default_cube_file, capsys):
    """The original statistic meets the same bad objects: rows for all, the same input flags."""
    code, err = run(["-m", default_cube_file, "--psf", workdir / "psf.fits", "-i", workdir / "Cuts",
                     "-o", tmp_path / "S", "--chi", tmp_path / "C", "--catalogs", tmp_path / "none",
                     "--statistic", "dre"], capsys)
    assert code == 0 and "Traceback" not in err
    t = read_summary(tmp_path / "S" / f"{IMG}_dre.fits")
    assert len(t) == N
    for i in GOOD:
        assert flags_of(t, i) & ~EDGE == 0, (i, FitFlag(flags_of(t, i)))
        assert np.isfinite(t["CHI"][i]) and t["FLUX"][i] > 0
    for i, bit in ((NAN_PIX, FitFlag.NONFINITE_INPUT), (INF_RMS, FitFlag.NONFINITE_INPUT),
                   (ZERO_RMS, FitFlag.BAD_RMS)):
        assert flags_of(t, i) & ~EDGE == int(bit), (i, FitFlag(flags_of(t, i)))
        assert t["FLUX"][i] > 0
    assert flags_of(t, EMPTY_MASK) & int(FitFlag.EMPTY_MASK)
    assert flags_of(t, ALL_NAN) & int(FitFlag.NONFINITE_INPUT | FitFlag.FEW_PIXELS) == \
        int(FitFlag.NONFINITE_INPUT | FitFlag.FEW_PIXELS)
    for i in (EMPTY_MASK, ALL_NAN):
        unfitted(t, i)
    assert flags_of(t, ZERO_DATA) & int(FitFlag.NONPOSITIVE_FLUX | FitFlag.FIT_FAILED)
