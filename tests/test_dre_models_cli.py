"""The dre-models command: options, defaults, output file and one-line errors."""

import logging
import subprocess
import sys

import numpy as np
import pytest
from astropy.io import fits

from dre_hpc.cli.dre_models import main
from dre_hpc.models.cube_io import read_cube
from dre_hpc.models.grid import ModelGrid
from dre_hpc.models.sersic import render_sersic

SMALL = ["--ax-ratio", "0.4", "0.6", "2", "--angle", "10", "40", "2", "--logr", "0", "0.25", "3",
         "--boxsize", "24"]


def test_writes_the_requested_grid_without_index_axis(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    out = tmp_path / "sub" / "cube.fits"
    assert main(SMALL + ["-o", str(out)]) == 0
    cube, grid = read_cube(out)
    assert not grid.has_index_axis and grid.shape == (1, 2, 2, 3) and grid.boxsize == 24
    np.testing.assert_allclose(grid.ax_ratio.values, [0.4, 1.0])
    np.testing.assert_allclose(grid.angle.values, [10.0, 50.0])
    assert fits.getdata(out).shape == (2, 48, 72) and "NINDEX" not in fits.getheader(out)
    expected = render_sersic(4.0, 0.4, 50.0, 10 ** 0.5, boxsize=24)
    np.testing.assert_array_equal(cube[0, 0, 1, 2], expected)
    assert "9 distinct models of 12" in caplog.text and f"wrote {out}" in caplog.text


def test_index_option_adds_the_axis(tmp_path):
    out = tmp_path / "cube.fits"
    assert main(SMALL + ["--index", "1", "3", "2", "-o", str(out)]) == 0
    header = fits.getheader(out)
    assert (header["NINDEX"], header["INDEX0"], header["DINDEX"]) == (2, 1.0, 3.0)
    assert fits.getdata(out).shape == (2, 2, 48, 72)
    cube, grid = read_cube(out)
    assert grid.has_index_axis and cube.shape == (2, 2, 2, 3, 24, 24)
    np.testing.assert_array_equal(cube[0, 1, 0, 0], render_sersic(1.0, 1.0, 10.0, 1.0, boxsize=24))


def test_unset_axes_take_the_default_grid(tmp_path):
    out = tmp_path / "cube.fits"
    assert main(["--angle", "0", "15", "1", "--logr", "0.5", "0.1", "1", "--boxsize", "16",
                 "-o", str(out)]) == 0
    _, grid = read_cube(out)
    default = ModelGrid.default()
    np.testing.assert_allclose(grid.ax_ratio.values, default.ax_ratio.values)
    assert grid.index == default.index


def test_refuses_to_overwrite_unless_asked(tmp_path, capsys):
    out = tmp_path / "cube.fits"
    assert main(SMALL + ["-o", str(out)]) == 0
    capsys.readouterr()
    assert main(SMALL + ["-o", str(out)]) == 2
    assert "already exists; use --overwrite" in capsys.readouterr().err
    assert main(SMALL + ["-o", str(out), "--overwrite"]) == 0


@pytest.mark.parametrize("args, message", [
    (["--ax-ratio", "0", "0.1", "3"], "--ax-ratio: axis ratio b/a must lie in [0.05, 1]"),
    (["--ax-ratio", "0.5", "0.5", "3"], "runs from 0.5 to 1.5"),
    (["--index", "1", "x", "2"], "--index: STEP must be a number, got 'x'"),
    (["--index", "0.1", "1", "2"], "--index: Sersic index n must lie in [0.2, 10]"),
    (["--logr", "0", "0.1", "2.5"], "--logr: COUNT must be a whole number, got '2.5'"),
    (["--angle", "0", "0", "3"], "--angle: STEP must be > 0 when COUNT > 1"),
    (["--logr", "nan", "0.1", "2"], "--logr: START must be finite"),
    (["--boxsize", "4"], "--boxsize must lie in [8, 1024], got 4"),
    (["--boxsize", "big"], "--boxsize must be a whole number"),
])
def test_bad_values_give_one_line_errors(tmp_path, capsys, args, message):
    out = tmp_path / "cube.fits"
    assert main(args + ["-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dre-models: error: ") and message in err and "\n" not in err
    assert not out.exists()


def test_runs_as_a_module(tmp_path):
    out = tmp_path / "cube.fits"
    done = subprocess.run([sys.executable, "-m", "dre_hpc.cli.dre_models", *SMALL, "-o", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert read_cube(out)[1].shape == (1, 2, 2, 3)
    missing = subprocess.run([sys.executable, "-m", "dre_hpc.cli.dre_models"],
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "-o/--output" in missing.stderr


def tiny_default():
    from dre_hpc.models.grid import Axis
    return ModelGrid(Axis("INDEX", 4.0, 0.0, 1), Axis("AX_RATIO", 0.5, 0.5, 2),
                     Axis("ANGLE", 0.0, 90.0, 2), Axis("LOGR", 0.0, 0.5, 2), boxsize=16,
                     has_index_axis=False)


def test_preset_and_workers(tmp_path, monkeypatch, capsys):
    """--preset takes a preset's grid (here from a tiny patched default grid); --workers does not
    change the file; --preset without -o makes the cached cube and prints its path."""
    from dre_hpc.models import generate
    monkeypatch.setattr(ModelGrid, "default", classmethod(lambda cls: tiny_default()))
    monkeypatch.setenv("DRE_HPC_CACHE", str(tmp_path / "cache"))
    one, two = tmp_path / "w1.fits", tmp_path / "w2.fits"
    assert main(["--preset", "sersic", "--workers", "1", "-o", str(one)]) == 0
    assert main(["--preset", "sersic", "--workers", "2", "-o", str(two)]) == 0
    assert one.read_bytes() == two.read_bytes()
    _, grid = read_cube(one)
    assert grid == generate.sersic_grid() and grid.shape == (12, 2, 2, 2)
    assert main(["--preset", "bulge", "-o", str(tmp_path / "b.fits")]) == 0
    assert read_cube(tmp_path / "b.fits")[1] == tiny_default()
    capsys.readouterr()
    assert main(["--preset", "sersic"]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed == str(generate.resolve_model("sersic"))
    assert fits.getdata(printed).tobytes() == fits.getdata(one).tobytes()


@pytest.mark.parametrize("args, message", [
    (["--preset", "sersic", "--index", "1", "1", "2"], "--preset sersic sets the whole grid; it "
     "cannot be combined with --index"),
    (["--preset", "bulge", "--boxsize", "64", "--logr", "0", "1", "2"], "with --logr, --boxsize"),
    (["--workers", "0"], "--workers must be >= 1, got 0"),
    (["--workers", "two"], "--workers must be a whole number, got 'two'"),
])
def test_preset_and_workers_errors(tmp_path, capsys, args, message):
    out = tmp_path / "cube.fits"
    assert main(args + ["-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dre-models: error: ") and message in err and "\n" not in err
    assert not out.exists()


def test_output_is_required_without_preset(capsys):
    assert main(SMALL) == 2
    assert "-o/--output is required (or --preset NAME alone" in capsys.readouterr().err
