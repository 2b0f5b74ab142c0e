"""The second pass of ``make_cuts --neighbours`` (`preprocess.neighbours`) on inputs whose every
pixel is known: SExtractor's background estimator, the models rendered as the fit renders them,
and each cut rebuilt without its neighbours. Written here with NumPy (no SExtractor, as in
test_make_cuts.py); the real tools' second pass and what it does to the fits are in
test_tile_workflow.py and ``benchmarks/bench_accuracy.py``."""

from __future__ import annotations

import json

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

from dre_hpc.cli import make_cuts as cli
from dre_hpc.fit.model_matrix import convolved_stamps
from dre_hpc.flags import FitFlag
from dre_hpc.io.cuts import read_cuts
from dre_hpc.preprocess.cut_tiles import NeighbourOptions, cut_tile
from dre_hpc.preprocess.cuts import CutsOptions, cut_start
from dre_hpc.fit.subgrid import BACKGROUND_ERROR as SEXTRACTOR_BACKGROUND_ERROR
from dre_hpc.fit.subgrid import background_variance
from dre_hpc.preprocess.neighbours import (BACKGROUND_ERROR, PARAMETERS, fourier_shift, mesh_background, object_models,
                                           paste, read_fits)

N = 400
#          NUMBER  X_IMAGE Y_IMAGE  INDEX  b/a   angle  log r  flux    FLAGS
OBJECTS = [(1, 170.3, 200.7, 1.3, 0.6, 30.0, 0.7, 2000.0, 0),
           (2, 205.6, 190.2, 3.7, 0.8, 110.0, 0.5, 900.0, 0),
           (3, 230.1, 240.5, 2.0, 0.9, 0.0, 0.4, 500.0, int(FitFlag.FIT_FAILED))]   # its light stays
SKY_ERROR = 0.5            # what SExtractor's background left in the image


def _psf():
    y, x = np.mgrid[-12:13, -12:13]
    psf = (1 + (x ** 2 + y ** 2) / 2.5 ** 2) ** -3.0
    return psf / psf.sum()


def test_mesh_background_recovers_a_tilted_sky_under_masked_sources():
    rng = np.random.default_rng(3)
    y, x = np.mgrid[0:600, 0:700]
    sky = 2.0 + 1e-3 * x - 5e-4 * y
    image = sky + rng.normal(0, 1, sky.shape)
    masked = np.zeros(sky.shape, bool)
    for cx, cy in rng.uniform(50, 550, (30, 2)):                  # bright blobs, masked
        blob = (x - cx) ** 2 + (y - cy) ** 2 < 64
        image[blob] += 100.0
        masked |= blob
    error = mesh_background(image, masked) - sky
    # sigma 1: a mesh's mode has an error of about 0.02 (16,000 pixels), which the median filter
    # does not average away; beyond the outermost meshes' centres the tilt adds up to 0.1
    assert abs(error.mean()) < 0.01 and np.abs(error).mean() < 0.04 and np.abs(error).max() < 0.2
    # unmasked, the clipping keeps most of the blobs' light out of the estimate
    assert np.median(np.abs(mesh_background(image) - sky)) < 0.1


def test_fourier_shift_moves_a_smooth_stamp_by_sub_pixels():
    y, x = np.mgrid[0:64, 0:64]
    gauss = lambda cx, cy: np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * 2.5 ** 2))
    moved = fourier_shift(gauss(32, 32)[None], np.array([0.3]), np.array([-0.45]))[0]
    assert np.abs(moved - gauss(32.3, 31.55)).max() < 1e-6


def test_paste_adds_only_where_the_frames_overlap():
    target = np.zeros((5, 6))
    paste(target, np.ones((4, 4)), x0=10, y0=20, tx0=12, ty0=19)
    assert target.sum() == 8 and target[1:5, 0:2].sum() == 8      # rows 20..23, columns 12..13
    paste(target, np.ones((4, 4)), x0=0, y0=0, tx0=12, ty0=19, sign=-1.0)
    assert target.sum() == 8                                       # no overlap: nothing


def test_models_are_the_fits_models_at_grid_nodes(default_cube):
    """Rendered at a node's parameters, a model is the fit's convolved model of that node."""
    cube, grid = default_cube
    cells = np.array([5, grid.size // 2, grid.size - 7])
    par = grid.parameters(cells)
    fitted = {"INDEX_FIT": par["INDEX"], "AX_RATIO_FIT": par["AX_RATIO"], "ANGLE_FIT": par["ANGLE"],
              "LOGR_FIT": par["LOGR"], "FLUX_FIT": np.array([1.0, 10.0, 100.0]), "dx": np.zeros(3),
              "dy": np.zeros(3)}
    ours = object_models(fitted, np.arange(3), _psf(), True, grid.boxsize)
    stamps = np.asarray(cube).reshape((grid.size, grid.boxsize, grid.boxsize))[cells]
    theirs = convolved_stamps(grid, stamps, cells, _psf()) * fitted["FLUX_FIT"][:, None, None]
    assert np.abs(ours - theirs).max() < 1e-5 * theirs.max()


@pytest.fixture()
def crowded(tmp_path):
    """A tile of three overlapping galaxies (the third not fitted) on a background left 0.5 high,
    its first pass's summary holding the true parameters, and the models the second pass renders."""
    table = Table(rows=OBJECTS, names=("NUMBER", "X_IMAGE", "Y_IMAGE") + PARAMETERS + ("FLAGS",))
    table["EXT_NUMBER"] = np.ones(len(table), np.int16)
    (tmp_path / "Summary").mkdir()
    table.write(tmp_path / "Summary" / "tile_dre.fits")
    truth = read_fits(tmp_path / "Summary" / "tile_dre.fits", 128)
    fitted = {**{c: np.asarray(table[c], float) for c in PARAMETERS}, **{k: truth[k] for k in ("dx", "dy")}}
    # read_fits drops the failed fit; render all three in their own frames
    x, y = np.asarray(table["X_IMAGE"], float), np.asarray(table["Y_IMAGE"], float)
    x0, y0 = cut_start(x, 128), cut_start(y, 128)
    fitted["dx"], fitted["dy"] = x - 1 - x0 - 64, y - 1 - y0 - 64
    models = object_models(fitted, np.arange(3), _psf(), True, 128)
    nb = np.full((N, N), SKY_ERROR)
    seg = np.zeros((N, N), np.int32)
    for k in range(3):
        paste(nb, models[k], int(x0[k]), int(y0[k]))
        seg[int(y[k]) - 6:int(y[k]) + 6, int(x[k]) - 6:int(x[k]) + 6] = k + 1
    sex = tmp_path / "Sextracted"
    sex.mkdir()
    (tmp_path / "Tiles").mkdir()
    fits.PrimaryHDU((nb + 100.0).astype(np.float32)).writeto(tmp_path / "Tiles" / "tile.fits")
    fits.PrimaryHDU(nb.astype(np.float32)).writeto(sex / "tile_nb.fits")
    fits.PrimaryHDU(np.ones((N, N), np.float32)).writeto(sex / "tile_rms.fits")
    fits.PrimaryHDU(seg).writeto(sex / "tile_seg.fits")
    cat = Table({"NUMBER": table["NUMBER"], "X_IMAGE": x, "Y_IMAGE": y, "CLASS_STAR": np.full(3, 0.02),
                 "EXT_NUMBER": np.ones(3, np.int16)})
    hdu = fits.table_to_hdu(cat)
    hdu.name = "LDAC_OBJECTS"
    fits.HDUList([fits.PrimaryHDU(), hdu]).writeto(sex / "tile_cat.fits")
    fits.PrimaryHDU(_psf()).writeto(tmp_path / "psf.fits")
    return tmp_path, models, x0, y0


def test_each_cut_keeps_its_own_model_and_loses_the_fitted_neighbours(crowded):
    root, models, x0, y0 = crowded
    options = CutsOptions(margin=80)
    first = read_cuts(cut_tile(root / "Tiles" / "tile.fits", root / "Sextracted", root / "Cuts", options)["cuts_file"])
    report = cut_tile(root / "Tiles" / "tile.fits", root / "Sextracted", root / "Cuts2", options,
                      neighbours=NeighbourOptions(str(root / "Summary"), str(root / "psf.fits")))
    second = read_cuts(report["cuts_file"])
    done = report["neighbours"]
    assert done["models_subtracted"] == 2 and done["first_pass_rows"] == 3
    assert abs(done["background_change"][1]["median"] - SKY_ERROR) < 1e-3
    assert json.loads((root / "Cuts2" / "tile_cuts.json").read_text())["neighbours"] == json.loads(json.dumps(done))
    peak = models.max()
    for k in range(3):
        # object 3 was not fitted: its light stays in every cut, its own included
        expected = np.zeros((128, 128))
        for j in (k, 2) if k != 2 else (2,):
            paste(expected, models[j], int(x0[j]), int(y0[j]), int(x0[k]), int(y0[k]))
        assert np.abs(second.data[k] - expected).max() < 1e-4 * peak, k
        # the first pass's cut held the neighbours and the background error
        assert np.abs(first.data[k] - expected).max() > 0.4
    assert np.array_equal(first.mask, second.mask)
    # their background is known better than SExtractor's, and the fit's prior on it follows
    assert np.all(np.isnan(first.objects["BACK_ERR"])) and np.all(second.objects["BACK_ERR"] == BACKGROUND_ERROR)
    npix, w_sum = np.array([400, 400]), np.array([100.0, 100.0])
    assert np.allclose(background_variance(w_sum, npix, second.objects["BACK_ERR"][:2]),
                       (BACKGROUND_ERROR / SEXTRACTOR_BACKGROUND_ERROR) ** 2 * background_variance(w_sum, npix))
    assert np.array_equal(background_variance(w_sum, npix, first.objects["BACK_ERR"][:2]),
                          background_variance(w_sum, npix))


def test_cli_second_pass_errors_name_the_missing_input(crowded, caplog):
    root = crowded[0]
    base = ["-i", str(root / "Tiles"), "-s", str(root / "Sextracted"), "-o", str(root / "Cuts2"),
            "--psf", str(root / "psf.fits")]
    assert cli.main(base + ["--neighbours", str(root / "Nowhere")]) == 1
    assert "Nowhere/tile_dre.fits does not exist" in caplog.text and "run dre" in caplog.text
    Table({"NUMBER": [1], "X_IMAGE": [1.0]}).write(root / "Summary" / "tile_dre.fits", overwrite=True)
    assert cli.main(base + ["--neighbours", str(root / "Summary")]) == 1
    assert "tile_dre.fits has no column(s) INDEX_FIT, AX_RATIO_FIT" in caplog.text
    assert not (root / "Cuts2" / "tile_cuts.h5").exists()


def test_cli_second_pass_in_the_dre_layout_warns_of_its_prior(crowded, caplog):
    """The original's layout has no BACK_ERR: the cuts are written, and the user told what dre
    will assume."""
    root = crowded[0]
    assert cli.main(["-i", str(root / "Tiles"), "-s", str(root / "Sextracted"), "-o", str(root / "CutsDre"),
                     "--psf", str(root / "psf.fits"), "--neighbours", str(root / "Summary"), "--layout", "dre"]) == 0
    assert "that layout stores no BACK_ERR" in caplog.text
    assert len(read_cuts(root / "CutsDre" / "tile_cuts.h5")) == 3


def test_models_sit_where_the_first_fit_centred_them(tmp_path):
    """The cut frame and centre of each fit come from its DX, DY (the centre it used: XWIN_IMAGE
    with make_cuts --centroids, 0.3 px from X_IMAGE here), else from X_IMAGE, Y_IMAGE."""
    row = dict(zip(("NUMBER", "X_IMAGE", "Y_IMAGE") + PARAMETERS + ("FLAGS",), OBJECTS[0]))
    Table([{**row, "DX": -0.4, "DY": -0.2}]).write(tmp_path / "centroids.fits")
    Table([row]).write(tmp_path / "plain.fits")
    centroids, plain = (read_fits(tmp_path / f"{name}.fits", 128) for name in ("centroids", "plain"))
    assert (centroids["x0"][0], centroids["y0"][0]) == (106, 136)          # centre (170.6, 200.8)
    assert np.allclose([centroids["dx"][0], centroids["dy"][0]], [-0.4, -0.2])
    assert (plain["x0"][0], plain["y0"][0]) == (cut_start(170.3, 128), cut_start(200.7, 128)) == (106, 136)
    assert np.allclose([plain["dx"][0], plain["dy"][0]], [170.3 - 1 - 106 - 64, 200.7 - 1 - 136 - 64])
