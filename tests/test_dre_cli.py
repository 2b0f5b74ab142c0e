"""The ``dre`` command end to end, on a working directory laid out like the original DRE's.

The directory holds ``Cuts/<img>_cuts.h5`` in our stacked layout and, separately, in the original
one-group-per-object layout; the PSF as a plain FITS image and as a PSFEx ``.psf``; and a
SExtractor FITS_LDAC catalogue. The cutouts are 12 simulated n = 4 galaxies (GalSim) with known
truth, cut like the original make_cuts (astropy ``Cutout2D``): every object sits in (63, 64] in
cut pixels, i.e. DX, DY in (-1, 0].
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

from dre_hpc.cli.dre import main
from dre_hpc.fit.centering import centre_cutouts
from dre_hpc.io.cuts import write_cuts
from dre_hpc.io.outputs import write_chi
from dre_hpc.models.grid import ModelGrid
from dre_hpc.preprocess.masks import clean_mask
from dre_hpc.sim.cutouts import SimSpec, draw_galaxy, simulate_cutouts
from dre_hpc.sim.match import angle_distance

from helpers import env_command, psfex_hdu, write_psfex
from scratch import scratch_dir

IMG = "field1"
B = 128
N = 12
ZERO_POINT = 25.0
ORIGINAL = ["ROW", "MODEL_IDX", "CHI", "CHI_STD", "LOGR_CHI", "LOGR_VAR", "LOGR_CHI_VAR", "LOGR_PARAB",
            "LOGR_STD", "INDEX", "LOGR", "AX_RATIO", "ANGLE", "EXT_NUMBER", "NUMBER"]
OURS = ["FLUX", "FLUX_ERR", "MAG", "MAG_ERR", "CHI2", "DOF", "NPIX", "INDEX_MEAN", "INDEX_ERR",
        "AX_RATIO_MEAN", "AX_RATIO_ERR", "ANGLE_MEAN", "ANGLE_ERR", "LOGR_MEAN", "LOGR_ERR",
        "DX", "DY", "FLAGS"]
ELONGATED = 1          # NUMBER of the galaxy drawn at b/a = 0.3, angle 2 degrees


# -- building a working directory ----------------------------------------------------------------

def simulate(n=N, seed=7):
    """Cutouts in the original Cutout2D convention (offsets in (-1, 0]), their truth and PSF.

    Object ``ELONGATED`` is replaced by a bright galaxy with b/a = 0.3 at angle 2 degrees (major
    axis along +x, array axis 1).
    """
    import galsim
    spec = SimSpec(n_objects=n, seed=seed, snr=(150.0, 250.0), logr=(0.3, 1.0), ax_ratio=(0.2, 0.9))
    cuts, truth, psf = simulate_cutouts(spec)
    i = ELONGATED - 1
    truth["AX_RATIO"][i], truth["ANGLE"][i], truth["LOGR"][i] = 0.3, 2.0, 0.9
    truth["DX"][i], truth["DY"][i], truth["SNR"][i] = 0.3, -0.2, 250.0
    clean = draw_galaxy(spec, truth[i], galsim.Moffat(beta=spec.psf_beta, fwhm=spec.psf_fwhm))
    sigma = np.sqrt((clean ** 2).sum()) / truth["SNR"][i]
    cuts.data[i] = clean + np.random.default_rng(99).normal(0, sigma, clean.shape)
    cuts.rms[i] = sigma
    cuts.mask[i] = clean_mask(clean > sigma)
    cuts.objects["DX"][i], cuts.objects["DY"][i] = truth["DX"][i], truth["DY"][i]
    # Cutout2D puts the object in (63, 64]: a cut whose object is at 64 + d with d > 0 starts one
    # pixel later, so the content moves by -1 pixel and the offset becomes d - 1
    for field, axis in (("DX", 1), ("DY", 0)):
        for k in np.flatnonzero(cuts.objects[field] > 0):
            cuts.data[k] = np.roll(cuts.data[k], -1, axis=axis)
            cuts.mask[k] = np.roll(cuts.mask[k], -1, axis=axis)
            cuts.objects[field][k] -= 1.0
    # image positions: the cut's first pixel (0-based) is X0, Y0; the object is at X0 + 64 + DX
    cuts.objects["X0"] = 300 + 150 * np.arange(n)
    cuts.objects["Y0"] = 200 + 37 * np.arange(n)
    cuts.objects["X_IMAGE"] = cuts.objects["X0"] + B // 2 + cuts.objects["DX"] + 1.0   # FITS 1-based
    cuts.objects["Y_IMAGE"] = cuts.objects["Y0"] + B // 2 + cuts.objects["DY"] + 1.0
    assert np.all((cuts.objects["DX"] > -1) & (cuts.objects["DX"] <= 0))
    return cuts, truth, psf


def psfex_file(path, psf, samp=1.0):
    """A PSFEx ``.psf`` whose PSF_MASK cell is (3, ny, nx), the constant term first."""
    comps = np.concatenate([psf[None], np.random.default_rng(1).normal(0, 1e-4, (2,) + psf.shape)])
    return write_psfex(path, [psfex_hdu(comps, accepted=35, samp=samp)])


def ldac_catalog(path, objects, ext_number=None):
    """A SExtractor FITS_LDAC catalogue: LDAC_IMHEAD, then LDAC_OBJECTS with a VIGNET column."""
    n = len(objects)
    cols = [fits.Column(name="NUMBER", format="J", array=objects["NUMBER"]),
            fits.Column(name="X_IMAGE", format="D", array=objects["X_IMAGE"]),
            fits.Column(name="Y_IMAGE", format="D", array=objects["Y_IMAGE"]),
            fits.Column(name="MAG_AUTO", format="E", array=np.linspace(18, 22, n)),
            fits.Column(name="CLASS_STAR", format="E", array=np.linspace(0.01, 0.2, n)),
            fits.Column(name="FLAGS", format="I", array=np.arange(n) % 4),
            fits.Column(name="VIGNET", format="225E", dim="(15, 15)", array=np.ones((n, 15, 15)))]
    if ext_number is not None:
        cols.insert(1, fits.Column(name="EXT_NUMBER", format="I", array=np.full(n, ext_number)))
    objs = fits.BinTableHDU.from_columns(cols)
    objs.header["EXTNAME"] = "LDAC_OBJECTS"
    head = fits.BinTableHDU.from_columns([fits.Column(name="Field Header Card", format="1680A",
                                                      array=["SIMPLE  =                    T"])])
    head.header["EXTNAME"] = "LDAC_IMHEAD"
    path.parent.mkdir(parents=True, exist_ok=True)
    fits.HDUList([fits.PrimaryHDU(), head, objs]).writeto(path, overwrite=True)
    return path


def make_workdir(root, cuts, psf):
    root = Path(root)
    for d in ("Cuts", "CutsDRE", "PSF"):
        (root / d).mkdir(parents=True, exist_ok=True)
    write_cuts(root / "Cuts" / f"{IMG}_cuts.h5", cuts, layout="stacked")
    write_cuts(root / "CutsDRE" / f"{IMG}_cuts.h5", cuts, layout="dre")
    fits.PrimaryHDU(psf.astype(np.float32)).writeto(root / "psf.fits")
    psfex_file(root / "PSF" / f"{IMG}.psf", psf)
    ldac_catalog(root / "Sextracted" / f"{IMG}_cat.fits", cuts.objects)
    return root


def run(argv, capsys=None):
    """``dre`` main with ``argv``; returns (exit code, stderr) when capsys is given."""
    code = main([str(a) for a in argv])
    if capsys is None:
        return code
    return code, capsys.readouterr().err


# -- fixtures: one working directory and the runs on it, shared by the module --------------------

@pytest.fixture(scope="module")
def sim():
    return simulate()


@pytest.fixture(scope="module")
def workdir(request, tmp_path_factory, sim):
    cuts, _, psf = sim
    return make_workdir(scratch_dir(request, tmp_path_factory, "dre_cli"), cuts, psf)


@pytest.fixture(scope="module")
def runs(workdir, default_cube_file):
    """The stacked cuts with default paths (run from the working directory), the plain FITS PSF,
    mosaics and a zero-point; then the DRE-layout cuts with the PSFEx directory, no zero-point."""
    mp = pytest.MonkeyPatch()
    mp.chdir(workdir)
    try:
        stacked = run(["-m", default_cube_file, "--psf", "psf.fits", "--mosaics", "--mosaic-png",
                       "--zero-point", ZERO_POINT])
        dre = run(["-m", default_cube_file, "--psf", "PSF", "-i", "CutsDRE", "-o", "SummaryDRE",
                   "--chi", "ChiDRE", "--compression", "none"])
    finally:
        mp.undo()
    return {"stacked": stacked, "dre": dre}


def summary(workdir, sub="Summary"):
    return Table.read(workdir / sub / f"{IMG}_dre.fits", hdu=1, mask_invalid=False)


# -- tests ---------------------------------------------------------------------------------------

def test_exit_codes(runs):
    assert runs == {"stacked": 0, "dre": 0}


def test_summary_columns(runs, workdir, sim):
    cuts, _, _ = sim
    t = summary(workdir)
    assert len(t) == N
    assert t.colnames[:len(ORIGINAL)] == ORIGINAL                 # the original's columns, in order
    assert set(OURS) <= set(t.colnames)
    np.testing.assert_array_equal(t["ROW"], np.arange(N))
    np.testing.assert_array_equal(t["NUMBER"], cuts.objects["NUMBER"])
    np.testing.assert_array_equal(t["EXT_NUMBER"], 0)
    idx = np.asarray(t["MODEL_IDX"])
    assert idx.shape == (N, 4) and np.issubdtype(idx.dtype, np.integer)
    assert np.all(idx[:, 0] == 0) and np.all((idx >= 0).all(axis=1))
    np.testing.assert_allclose(t["AX_RATIO"], 0.1 + 0.1 * idx[:, 1])
    np.testing.assert_allclose(t["ANGLE"], 15.0 * idx[:, 2])
    np.testing.assert_allclose(t["LOGR"], -0.7 + 0.12 * idx[:, 3])
    np.testing.assert_allclose(t["INDEX"], 4.0)
    for name in ("CHI", "CHI_STD", "FLUX", "FLUX_ERR", "CHI2", "AX_RATIO_ERR", "LOGR_ERR", "ANGLE_ERR"):
        assert np.isfinite(t[name]).all(), name
    assert (t["FLUX"] > 0).all() and (t["FLUX_ERR"] > 0).all()
    assert (t["DOF"] > 0).all() and (t["DOF"] < t["NPIX"]).all()
    np.testing.assert_allclose(t["CHI"], t["CHI2"] / t["DOF"], rtol=1e-6)   # wls: CHI is chi2/dof
    np.testing.assert_allclose(t["DX"], cuts.objects["DX"])
    # MAG with --zero-point
    np.testing.assert_allclose(t["MAG"], ZERO_POINT - 2.5 * np.log10(t["FLUX"]), rtol=1e-12)
    np.testing.assert_allclose(t["MAG_ERR"], 2.5 / np.log(10) * t["FLUX_ERR"] / t["FLUX"], rtol=1e-12)
    # catalogue joined on NUMBER: VIGNET dropped, clashing names prefixed with SEX_
    assert not [c for c in t.colnames if "VIGNET" in c]
    np.testing.assert_array_equal(t["SEX_FLAGS"], np.arange(N) % 4)
    np.testing.assert_allclose(t["CLASS_STAR"], np.linspace(0.01, 0.2, N), rtol=1e-6)
    np.testing.assert_allclose(t["MAG_AUTO"], np.linspace(18, 22, N), rtol=1e-6)
    np.testing.assert_allclose(t["SEX_X_IMAGE"], cuts.objects["X_IMAGE"])
    assert t.colnames.count("FLAGS") == 1 and t["FLAGS"].dtype.kind == "i"
    # clean fits: no flag beyond a grid-edge bit
    assert np.all((np.asarray(t["FLAGS"]) & ~15) == 0), list(t["FLAGS"])
    header = fits.getheader(workdir / "Summary" / f"{IMG}_dre.fits", 1)
    assert all(len(k) <= 8 for k in header)                        # no HIERARCH cards


def test_mag_nan_without_zero_point(runs, workdir):
    t = summary(workdir, "SummaryDRE")
    assert np.isnan(t["MAG"]).all() and np.isnan(t["MAG_ERR"]).all()
    assert np.isfinite(t["FLUX"]).all()


def test_chi_files(runs, workdir, sim):
    cuts, _, _ = sim
    t = summary(workdir)
    for sub in ("Chi", "ChiDRE"):
        with h5py.File(workdir / sub / f"{IMG}_chi.h5", "r") as h5:
            assert sorted(h5) == [f"00_{k:04d}" for k in cuts.objects["NUMBER"]]
            assert h5.attrs["statistic"] == "wls" and int(h5.attrs["NLOGH"]) == 21
            # uncompressed surfaces live in their datasets' headers (compact: faster to write)
            layouts = {h5[k].id.get_create_plist().get_layout() for k in h5}
            assert layouts == {h5py.h5d.COMPACT if sub == "ChiDRE" else h5py.h5d.CHUNKED}
            for row in t:
                chi = h5[f"00_{row['NUMBER']:04d}"][()]
                assert chi.shape == (1, 10, 12, 21) and chi.dtype == np.float32
                # the surface holds the statistic: CHI at MODEL_IDX, and nothing lower
                assert chi[tuple(row["MODEL_IDX"])] == pytest.approx(row["CHI"], rel=1e-5)
                assert np.nanmin(chi) >= row["CHI"] * (1 - 1e-4)


@pytest.mark.parametrize("compression", ["none", "medium"])
def test_chi_files_are_the_same_bytes_every_time(tmp_path, compression):
    """Written twice, a second apart, the chi file is the same file (no timestamps in it): runs
    and checkpoints are compared by their outputs' checksums."""
    grid = ModelGrid.default()
    surfaces = np.random.default_rng(1).random((5, grid.size)).astype(np.float32)
    names = [f"00_{k:04d}" for k in range(1, 6)]
    digests = []
    for i in range(2):
        if i:
            time.sleep(1.1)
        path = tmp_path / f"{i}" / "x_chi.h5"
        write_chi(path, names, surfaces, grid, "wls", compression)
        digests.append(hashlib.sha256(path.read_bytes()).hexdigest())
    assert digests[0] == digests[1]


def test_model_cache_is_mapped_on_the_next_run(runs, workdir, default_cube_file, tmp_path, monkeypatch, caplog):
    """--model-cache DIR: the first run convolves and writes the entry, the next one maps it
    without convolving (or reading the cube's stamps), and both give the catalogue and chi
    values of a run without the cache; the log says how long the models took, as benchmarks read it."""
    from dre_hpc.fit.model_matrix import NodeModels
    from dre_hpc.fit.tiles import FIT_LOG
    cache = tmp_path / "models"
    monkeypatch.chdir(workdir)
    convolved = []
    original = NodeModels._convolve
    monkeypatch.setattr(NodeModels, "_convolve", lambda self, *psfs: convolved.append(1) or original(self, *psfs))
    seconds = []
    for k in (1, 2):
        caplog.clear()
        with caplog.at_level("INFO"):
            assert run(["-m", default_cube_file, "--psf", "PSF", "-i", "CutsDRE", "-o", tmp_path / f"Summary{k}",
                        "--chi", tmp_path / f"Chi{k}", "--compression", "none", "--model-cache", cache]) == 0
        assert len(convolved) == 1, f"run {k} convolved {len(convolved)} time(s) in all"
        (objects, fit_s, models_s), = FIT_LOG.findall(caplog.text)   # what the benchmarks read
        assert int(objects) == N and 0 <= float(models_s) <= float(fit_s)
        seconds.append(float(models_s))
    assert seconds[0] > 0 and seconds[1] < seconds[0] / 2            # mapped, not convolved
    assert len(list(cache.glob("models-*/models.npy"))) == 1
    reference = summary(workdir, "SummaryDRE")
    for k in (1, 2):
        table = Table.read(tmp_path / f"Summary{k}" / f"{IMG}_dre.fits", hdu=1, mask_invalid=False)
        for name in ("MODEL_IDX", "CHI", "FLUX", "LOGR_FIT", "FLUX_FIT", "FLAGS"):
            assert np.array_equal(np.asarray(table[name]), np.asarray(reference[name]), equal_nan=True), name
        with h5py.File(tmp_path / f"Chi{k}" / f"{IMG}_chi.h5") as mine, \
                h5py.File(workdir / "ChiDRE" / f"{IMG}_chi.h5") as theirs:
            assert sorted(mine) == sorted(theirs)
            assert all(np.array_equal(mine[n][()], theirs[n][()], equal_nan=True) for n in mine)


def test_mosaics(runs, workdir, sim):
    cuts, truth, _ = sim
    t = summary(workdir)
    out = workdir / "Mosaics" / IMG
    files = sorted(out.glob("*_mosaic.fits"))
    assert [f.name for f in files] == [f"{IMG}_00_{k:04d}_mosaic.fits" for k in cuts.objects["NUMBER"]]
    pngs = sorted(out.glob("*_mosaic.png"))
    assert len(pngs) == N and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    for i, path in enumerate(files):
        with fits.open(path) as hdul:
            panels, header = hdul[0].data.astype(np.float64), hdul[0].header
        assert panels.shape == (B, 4 * B)
        assert header["NUMBER"] == cuts.objects["NUMBER"][i] and header["FLAGS"] == t["FLAGS"][i]
        data, mask, model, resid = (panels[:, k * B:(k + 1) * B] for k in range(4))
        # panel 0 is the centred data in the data's own orientation (not transposed)
        centred, _, cmask, _ = centre_cutouts(np, cuts.data[i:i + 1], cuts.rms[i:i + 1],
                                              cuts.mask[i:i + 1], np.zeros((1, B, B), bool),
                                              cuts.offsets[i:i + 1])
        np.testing.assert_allclose(data, centred[0], rtol=1e-5, atol=1e-5 * np.abs(data).max())
        np.testing.assert_array_equal(mask > 0, cmask[0])
        np.testing.assert_allclose(resid, data - model, atol=1e-4 * np.abs(data).max())
        # the best model, scaled by FLUX, explains the data inside the mask
        inside = cmask[0]
        assert ((resid[inside] / cuts.rms[i][inside]) ** 2).mean() < 3.0
        assert model.sum() == pytest.approx(t["FLUX"][i], rel=0.2)
    # the b/a = 0.3 galaxy at angle 2 degrees is elongated along axis 1 (x) in panel 0 and in the model
    with fits.open(out / f"{IMG}_00_{ELONGATED:04d}_mosaic.fits") as hdul:
        panels = hdul[0].data.astype(np.float64)
    y, x = np.mgrid[:B, :B] - B // 2
    sigma = cuts.rms[ELONGATED - 1].max()
    for img in (panels[:, :B], panels[:, 2 * B:3 * B]):
        w = np.where(img > 5 * sigma, img, 0.0)          # second moments of the bright part
        var_x, var_y = (w * x ** 2).sum() / w.sum(), (w * y ** 2).sum() / w.sum()
        assert var_x > 3 * var_y, (var_x, var_y)        # about 5: b/a = 0.3 blurred by the PSF
    row = t[ELONGATED - 1]
    assert angle_distance(row["ANGLE"], truth["ANGLE"][ELONGATED - 1]) <= 15.0
    assert abs(row["AX_RATIO"] - 0.3) <= 0.1 + 1e-9


def test_layouts_agree(runs, workdir, sim):
    """The DRE layout has no positions: they come from the catalogue (Cutout2D convention) and
    equal the stacked file's; the fits agree (plain FITS PSF and PSFEx PSF hold the same PSF)."""
    cuts, _, _ = sim
    a, b = summary(workdir), summary(workdir, "SummaryDRE")
    assert len(b) == N
    np.testing.assert_array_equal(a["NUMBER"], b["NUMBER"])
    np.testing.assert_allclose(b["DX"], cuts.objects["DX"], atol=1e-9)
    np.testing.assert_allclose(b["DY"], cuts.objects["DY"], atol=1e-9)
    np.testing.assert_allclose(b["DX"], a["DX"], atol=1e-9)
    np.testing.assert_allclose(b["DY"], a["DY"], atol=1e-9)
    np.testing.assert_allclose(b["X_IMAGE"], a["X_IMAGE"])
    np.testing.assert_allclose(b["Y_IMAGE"], a["Y_IMAGE"])
    np.testing.assert_array_equal(np.asarray(a["MODEL_IDX"]), np.asarray(b["MODEL_IDX"]))
    for name in ("AX_RATIO", "ANGLE", "LOGR"):
        np.testing.assert_array_equal(a[name], b[name])
    for name in ("FLUX", "CHI2", "CHI", "AX_RATIO_MEAN", "LOGR_MEAN", "LOGR_PARAB"):
        np.testing.assert_allclose(a[name], b[name], rtol=1e-5, err_msg=name)
    np.testing.assert_array_equal(a["FLAGS"], b["FLAGS"])           # no NO_CENTRE: positions found
    np.testing.assert_array_equal(b["SEX_FLAGS"], np.arange(N) % 4)


def test_recovers_truth(runs, workdir, sim):
    _, truth, _ = sim
    t = summary(workdir)
    q_ok = np.abs(t["AX_RATIO"] - truth["AX_RATIO"]) <= 0.1 + 1e-9
    r_ok = np.abs(t["LOGR"] - truth["LOGR"]) <= 0.12 + 1e-9
    assert q_ok.sum() >= N - 1 and r_ok.sum() >= N - 1, (q_ok, r_ok)
    assert np.median(np.abs(t["AX_RATIO_MEAN"] - truth["AX_RATIO"])) < 0.05
    assert np.median(np.abs(t["LOGR_MEAN"] - truth["LOGR"])) < 0.06
    elongated = truth["AX_RATIO"] < 0.7
    assert np.all(angle_distance(t["ANGLE"], truth["ANGLE"])[elongated] <= 15.0 + 1e-9)
    assert np.median(np.abs(t["FLUX"] / truth["FLUX"] - 1)) < 0.05


def test_statistic_dre_and_single_cuts_file(workdir, default_cube_file, tmp_path):
    """``--statistic dre`` (the original's chi), with ``-i`` naming one file and ``--psf`` a .psf file."""
    code = run(["-m", default_cube_file, "--statistic", "dre", "-i", workdir / "Cuts" / f"{IMG}_cuts.h5",
                "--psf", workdir / "PSF" / f"{IMG}.psf", "-o", tmp_path / "S", "--chi", tmp_path / "C",
                "--catalogs", workdir / "Sextracted", "--chunk", 5])
    assert code == 0
    t = Table.read(tmp_path / "S" / f"{IMG}_dre.fits", mask_invalid=False)
    wls = summary(workdir)
    assert len(t) == N and t.meta.get("STATISTC", t.meta.get("STATISTIC")) == "dre"
    assert np.isfinite(t["CHI"]).all() and (t["CHI"] > 0).all()
    assert np.isfinite(t["FLUX"]).all() and (t["FLUX"] > 0).all()
    with h5py.File(tmp_path / "C" / f"{IMG}_chi.h5", "r") as h5:
        assert h5.attrs["statistic"] == "dre"
        for row in t:
            chi = h5[f"00_{row['NUMBER']:04d}"][()]
            assert chi[tuple(row["MODEL_IDX"])] == pytest.approx(row["CHI"], rel=1e-5)
            assert np.nanmin(chi) == pytest.approx(row["CHI"], rel=1e-5)
    # a different statistic, the same galaxies: mostly the same shapes
    assert (np.abs(t["AX_RATIO"] - wls["AX_RATIO"]) <= 0.1 + 1e-9).mean() >= 0.75
    assert (np.abs(t["LOGR"] - wls["LOGR"]) <= 0.12 + 1e-9).mean() >= 0.75


def test_ext_number_catalogue(tmp_path, sim, default_cube_file):
    """A catalogue with EXT_NUMBER (= 1 for a single-extension image) and DRE groups ``01_NNNN``."""
    cuts, _, psf = sim
    cuts = cuts.subset(slice(0, 4))
    cuts.objects["EXT_NUMBER"] = 1
    (tmp_path / "Cuts").mkdir()
    write_cuts(tmp_path / "Cuts" / f"{IMG}_cuts.h5", cuts, layout="dre")
    psfex_file(tmp_path / f"{IMG}.psf", psf)
    ldac_catalog(tmp_path / "Sextracted" / IMG / f"{IMG}_cat.fits", cuts.objects, ext_number=1)  # --subdir
    code = run(["-m", default_cube_file, "-i", tmp_path / "Cuts", "--psf", tmp_path / f"{IMG}.psf",
                "--catalogs", tmp_path / "Sextracted", "-o", tmp_path / "S", "--chi", tmp_path / "C"])
    assert code == 0
    t = Table.read(tmp_path / "S" / f"{IMG}_dre.fits", mask_invalid=False)
    np.testing.assert_array_equal(t["EXT_NUMBER"], 1)
    np.testing.assert_allclose(t["DX"], cuts.objects["DX"], atol=1e-9)
    np.testing.assert_array_equal(t["SEX_FLAGS"], np.arange(4) % 4)
    assert np.all((np.asarray(t["FLAGS"]) & ~15) == 0)
    with h5py.File(tmp_path / "C" / f"{IMG}_chi.h5", "r") as h5:
        assert sorted(h5) == [f"01_{k:04d}" for k in cuts.objects["NUMBER"]]


def test_console_script(runs, workdir, default_cube_file, tmp_path):
    exe = env_command("dre")
    assert exe, f"the dre console script is not in {Path(sys.executable).parent} (pip install -e .)"
    proc = subprocess.run([exe, "-m", str(default_cube_file), "--psf", "psf.fits", "-o", str(tmp_path / "S"),
                           "--chi", str(tmp_path / "C")], cwd=workdir, capture_output=True, text=True,
                          env=dict(os.environ), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "12 objects" in proc.stderr
    t = Table.read(tmp_path / "S" / f"{IMG}_dre.fits", mask_invalid=False)
    np.testing.assert_allclose(t["FLUX"], summary(workdir)["FLUX"], rtol=1e-6)
    help_ = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60)
    assert help_.returncode == 0 and "--statistic" in help_.stdout and "NONFINITE_INPUT" in help_.stdout


def gpu_available():
    try:
        import cupy
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def check_gpu_refused(code, err):
    assert code != 0
    assert "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("dre: error: ") and "gpu" in lines[0].lower()
    assert "--backend cpu" in lines[0] or "CuPy" in lines[0]


def test_backend_gpu_without_gpu(workdir, default_cube_file, tmp_path, capsys, monkeypatch):
    argv = ["-m", default_cube_file, "--backend", "gpu", "-i", workdir / "Cuts", "--psf", workdir / "psf.fits",
            "-o", tmp_path / "S", "--chi", tmp_path / "C", "--catalogs", workdir / "Sextracted"]
    code, err = run(argv, capsys)
    if gpu_available():                       # a machine with a GPU and CuPy: the run works
        assert code == 0, err
    else:                                     # CuPy without a device, or no CuPy: one clear line
        check_gpu_refused(code, err)
        assert not (tmp_path / "S").exists()
    # without CuPy (a None entry in sys.modules makes ``import cupy`` fail as if it were absent)
    monkeypatch.setitem(sys.modules, "cupy", None)
    code, err = run(argv, capsys)
    check_gpu_refused(code, err)
    assert "CuPy" in err and "pip install" in err


def test_multi_extension_image(tmp_path, sim, default_cube_file):
    """A two-extension image: NUMBER restarts per extension, the FITS_LDAC catalogue has one
    LDAC_OBJECTS HDU per extension and the PSFEx file one PSF_DATA HDU per extension."""
    cuts, _, psf = sim
    cuts = cuts.subset(np.arange(6))
    cuts.objects["EXT_NUMBER"] = [1, 1, 1, 2, 2, 2]
    cuts.objects["NUMBER"] = [1, 2, 3, 1, 2, 3]
    (tmp_path / "Cuts").mkdir()
    write_cuts(tmp_path / "Cuts" / f"{IMG}_cuts.h5", cuts, layout="dre")
    hdus = [fits.PrimaryHDU()]
    for ext in (1, 2):
        sel = cuts.objects[cuts.objects["EXT_NUMBER"] == ext]
        single = tmp_path / f"cat{ext}.fits"
        ldac_catalog(single, sel, ext_number=ext)
        with fits.open(single) as hdul:
            objs = hdul["LDAC_OBJECTS"].copy()
            objs.data["FLAGS"] = 10 * ext + np.arange(3)
            hdus += [hdul["LDAC_IMHEAD"].copy(), objs]
    (tmp_path / "Sextracted").mkdir()
    fits.HDUList(hdus).writeto(tmp_path / "Sextracted" / f"{IMG}_cat.fits")
    psfex_file(tmp_path / "one.psf", psf)
    with fits.open(tmp_path / "one.psf") as hdul:
        fits.HDUList([fits.PrimaryHDU(), hdul[1].copy(), hdul[1].copy()]).writeto(tmp_path / f"{IMG}.psf")
    code = run(["-m", default_cube_file, "-i", tmp_path / "Cuts", "--psf", tmp_path / f"{IMG}.psf",
                "--catalogs", tmp_path / "Sextracted", "-o", tmp_path / "S", "--chi", tmp_path / "C"])
    assert code == 0
    t = Table.read(tmp_path / "S" / f"{IMG}_dre.fits", mask_invalid=False)
    assert len(t) == 6
    np.testing.assert_array_equal(t["EXT_NUMBER"], [1, 1, 1, 2, 2, 2])
    np.testing.assert_array_equal(t["NUMBER"], [1, 2, 3, 1, 2, 3])
    np.testing.assert_allclose(t["DX"], cuts.objects["DX"], atol=1e-9)   # both extensions positioned
    np.testing.assert_array_equal(t["SEX_FLAGS"], [10, 11, 12, 20, 21, 22])
    assert np.all((np.asarray(t["FLAGS"]) & ~15) == 0), list(t["FLAGS"])
    with h5py.File(tmp_path / "C" / f"{IMG}_chi.h5", "r") as h5:
        assert sorted(h5) == ["01_0001", "01_0002", "01_0003", "02_0001", "02_0002", "02_0003"]


def test_stacked_positions_win_over_catalogue(tmp_path, sim, default_cube_file):
    """The stacked layout knows its offsets; a catalogue (here with shifted positions) only adds
    columns and fills offsets the file lacks (NaN)."""
    cuts, _, psf = sim
    cuts = cuts.subset(np.arange(4))
    cuts.objects["DX"][3] = cuts.objects["DY"][3] = np.nan        # unknown: the catalogue gives it
    (tmp_path / "Cuts").mkdir()
    write_cuts(tmp_path / "Cuts" / f"{IMG}_cuts.h5", cuts)
    shifted = cuts.objects.copy()
    shifted["X_IMAGE"] += 0.25
    ldac_catalog(tmp_path / "Sextracted" / f"{IMG}_cat.fits", shifted)
    fits.PrimaryHDU(psf).writeto(tmp_path / "psf.fits")
    code = run(["-m", default_cube_file, "-i", tmp_path / "Cuts", "--psf", tmp_path / "psf.fits",
                "--catalogs", tmp_path / "Sextracted", "-o", tmp_path / "S", "--chi", tmp_path / "C"])
    assert code == 0
    t = Table.read(tmp_path / "S" / f"{IMG}_dre.fits", mask_invalid=False)
    np.testing.assert_allclose(t["DX"][:3], cuts.objects["DX"][:3])
    np.testing.assert_allclose(t["DY"][:3], cuts.objects["DY"][:3])
    p = shifted["X_IMAGE"][3] - 1.0
    assert t["DX"][3] == pytest.approx(p - np.ceil(p - B / 2) - B // 2)
    assert np.isfinite(t["DY"][3])
    assert np.all((np.asarray(t["FLAGS"]) & int(1024)) == 0)       # NO_CENTRE nowhere


def test_repeated_numbers_in_catalogue_keep_one_row_per_cut(tmp_path, sim, default_cube_file):
    """A catalogue without EXT_NUMBER whose NUMBERs repeat (two extensions): still one row per cut."""
    cuts, _, psf = sim
    cuts = cuts.subset(np.arange(3))
    (tmp_path / "Cuts").mkdir()
    write_cuts(tmp_path / "Cuts" / f"{IMG}_cuts.h5", cuts)
    cat = tmp_path / "Sextracted" / f"{IMG}_cat.fits"
    ldac_catalog(cat, cuts.objects)
    with fits.open(cat) as hdul:
        hdus = [fits.PrimaryHDU(), hdul[1].copy(), hdul[2].copy(), hdul[1].copy(), hdul[2].copy()]
    fits.HDUList(hdus).writeto(cat, overwrite=True)
    fits.PrimaryHDU(psf).writeto(tmp_path / "psf.fits")
    code = run(["-m", default_cube_file, "-i", tmp_path / "Cuts", "--psf", tmp_path / "psf.fits",
                "--catalogs", tmp_path / "Sextracted", "-o", tmp_path / "S", "--chi", tmp_path / "C"])
    assert code == 0
    t = Table.read(tmp_path / "S" / f"{IMG}_dre.fits", mask_invalid=False)
    assert len(t) == 3
    np.testing.assert_array_equal(t["ROW"], [0, 1, 2])
    np.testing.assert_array_equal(t["SEX_FLAGS"], [0, 1, 2])
