"""The models' cores without aliasing (`dre_hpc.models.core`), against GalSim's Fourier-space
rendering of the same profiles (continuous Sersic convolved with the interpolated effective PSF,
sampled), and in a fit of noiseless GalSim galaxies placed exactly on the grid's nodes."""

from __future__ import annotations

import numpy as np
import pytest

from dre_hpc.fit.engine import FitOptions, fit_cutouts
from dre_hpc.fit.model_matrix import NodeModels
from dre_hpc.io.cuts import CutoutSet, empty_objects
from dre_hpc.models.convolve import convolve_cube, remove_pixel_response
from dre_hpc.models.core import core_pixels, correction_matrix, render_cores
from dre_hpc.models.grid import Axis, ModelGrid
from dre_hpc.models.sersic import render_sersic
from dre_hpc.preprocess.masks import clean_mask
from dre_hpc.sim.cutouts import SimSpec, draw_psf

galsim = pytest.importorskip("galsim")
SPEC = SimSpec()                                   # Moffat FWHM 2.5 px, beta 3.5: 25 px, pixel included
#: GalSim's accuracy here, and this module's agreement with it (fraction of the model's peak).
GSPARAMS = dict(folding_threshold=1e-3, maxk_threshold=1e-4, maximum_fft_size=16384)
AGREEMENT = 4e-3


def galsim_model(n, q, angle, r_e, psf, size=128, flux=1.0):
    """The continuous profile convolved with the effective PSF `psf` (an image that holds the
    pixel response, interpolated by GalSim) and sampled at the pixel centres."""
    gsp = galsim.GSParams(**GSPARAMS)
    gal = galsim.Sersic(n=n, half_light_radius=r_e * np.sqrt(q), flux=flux, gsparams=gsp)
    if q < 1:
        gal = gal.shear(q=q, beta=angle * galsim.degrees)
    epsf = galsim.InterpolatedImage(galsim.Image(psf, scale=1.0), x_interpolant="lanczos5",
                                    normalization="flux")
    return galsim.Convolve(gal, epsf, gsparams=gsp).drawImage(
        nx=size, ny=size, scale=1.0, use_true_center=False, method="no_pixel").array


@pytest.mark.parametrize("n,q,angle,r_e", [(4.0, 0.5, 30.0, 4.17), (4.0, 1.0, 0.0, 0.5), (6.0, 0.7, 60.0, 9.55),
                                           (2.5, 0.3, 45.0, 2.4), (0.5, 0.1, 0.0, 0.2), (3.0, 0.6, 100.0, 0.3)])
def test_cores_without_aliasing_agree_with_galsim(n, q, angle, r_e):
    """Cusps and sub-pixel profiles: the stamp pipeline alone is off by 2-9 % of the peak at the
    centre, the corrected model agrees with GalSim to `AGREEMENT` of it."""
    psf = draw_psf(SPEC)
    used = remove_pixel_response(psf)
    plain = convolve_cube(render_sersic(n, q, angle, r_e)[None], used)[0].astype(np.float64)
    matrix, h = correction_matrix(psf, used)
    fixed = plain.ravel().copy()
    fixed[core_pixels(h, 128)[0]] += (render_cores([n], [q], [angle], [r_e]) @ matrix.T)[0]
    reference = galsim_model(n, q, angle, r_e, psf)
    peak = reference.max()
    assert np.abs(plain - reference).max() > 1.5e-2 * peak          # what the correction is for
    assert np.abs(fixed.reshape(128, 128) - reference).max() < AGREEMENT * peak


def test_smooth_extended_models_are_hardly_changed():
    """An exponential disc of 4 px, which has little power beyond the sampling band: its
    correction stays within the two PSF interpolations' difference (below 5e-3 of the peak,
    against 2-9e-2 for the cusps above), and the total flux moves by less than 1e-4."""
    psf = draw_psf(SPEC)
    matrix, h = correction_matrix(psf, remove_pixel_response(psf))
    correction = render_cores([1.0], [0.5], [30.0], [4.17]) @ matrix.T
    plain = convolve_cube(render_sersic(1.0, 0.5, 30.0, 4.17)[None], remove_pixel_response(psf))[0]
    assert np.abs(correction).max() < 5e-3 * plain.max()
    assert abs(correction.sum()) < 1e-4


def node_grid():
    """A small grid with an index axis: n 2.5..5.5, b/a 0.4..0.8, 12 angles, r_e 1-4 px."""
    return ModelGrid(Axis("INDEX", 2.5, 1.0, 4), Axis("AX_RATIO", 0.4, 0.2, 3), Axis("ANGLE", 0.0, 15.0, 12),
                     Axis("LOGR", 0.0, 0.12, 6), boxsize=128, has_index_axis=True)


def node_galaxies(grid, psf, count=24, seed=3):
    """Noiseless (S/N 3e4) GalSim galaxies exactly on interior nodes of `grid`, and their truth."""
    rng = np.random.default_rng(seed)
    moffat = galsim.Moffat(beta=SPEC.psf_beta, fwhm=SPEC.psf_fwhm)
    truth = {k: np.empty(count) for k in ("INDEX", "AX_RATIO", "ANGLE", "LOGR")}
    data = np.empty((count, 128, 128), np.float32)
    rms, mask = np.empty_like(data), np.empty(data.shape, bool)
    noise = np.random.default_rng(seed + 1)
    for i in range(count):
        for axis in grid.axes:
            truth[axis.name][i] = axis.values[rng.integers(1, axis.count - 1)]
        gal = galsim.Sersic(n=truth["INDEX"][i], half_light_radius=10 ** truth["LOGR"][i] * np.sqrt(truth["AX_RATIO"][i]),
                            flux=1e4).shear(q=truth["AX_RATIO"][i], beta=truth["ANGLE"][i] * galsim.degrees)
        clean = galsim.Convolve(gal, moffat).drawImage(nx=128, ny=128, scale=1.0, use_true_center=False).array
        sigma = np.sqrt((clean ** 2).sum()) / 3e4
        data[i] = clean + noise.normal(0.0, sigma, clean.shape)
        rms[i], mask[i] = sigma, clean_mask(clean > 30 * sigma)
    objects = empty_objects(count)
    objects["NUMBER"] = np.arange(1, count + 1)
    objects["DX"] = objects["DY"] = 0.0
    objects["X_IMAGE"] = objects["Y_IMAGE"] = 65.0
    cuts = CutoutSet(data, mask, rms, objects, "simulated")
    cuts.names = [f"00_{k:04d}" for k in objects["NUMBER"]]
    return cuts, truth


def test_galaxies_on_the_nodes_are_recovered(isolated_cache):
    """Noiseless GalSim galaxies with n = 3.5 or 4.5 exactly on the grid's nodes: fitted with a
    cube that dre_hpc rendered (corrected cores), n and r_e come back within 0.006 dex and the
    flux within 0.3 %; the same stamps without the correction (a cube whose header does not say
    who rendered it) biased n by about -0.02 dex."""
    from dataclasses import replace
    from dre_hpc.cli.dre import load_cube
    from dre_hpc.models.generate import ensure_cube
    grid = node_grid()
    path = ensure_cube(grid, "core_test")
    psf = draw_psf(SPEC)
    cuts, truth = node_galaxies(grid, psf)
    errors = {}
    for corrected in (True, False):
        def load(corrected=corrected):
            cube, g, key = load_cube(str(path))
            return cube, g if corrected else replace(g, renderer=""), key
        models = NodeModels(None, load)
        assert models.corrects_cores is corrected
        mm = models.for_psf(psf)
        out = fit_cutouts(mm, cuts, FitOptions().for_grid(mm.grid))
        errors[corrected] = {"n": np.log10(out["INDEX_FIT"] / truth["INDEX"]), "r": out["LOGR_FIT"] - truth["LOGR"],
                             "flux": out["FLUX_FIT"] / 1e4 - 1}
    good, plain = errors[True], errors[False]
    assert np.abs(good["n"]).max() < 0.006 and np.abs(good["r"]).max() < 0.006, good
    assert np.abs(good["flux"]).max() < 3e-3, good["flux"]
    assert np.median(plain["n"]) < -0.01                        # the bias the correction removes


def test_excluded_pixel_and_foreign_cubes_keep_the_plain_models(default_cube, default_cube_file):
    """No correction where the stamps' meaning or the PSF's convention is not ours: a PSF sampled
    without the pixel (--psf-pixel excluded, the original's way), or a cube without ``RENDERV``."""
    from dataclasses import replace
    cube, grid = default_cube
    assert grid.renderer                                      # the generated default cube says so
    assert not NodeModels(None, lambda: (cube, grid, "k"), psf_has_pixel=False).corrects_cores
    assert not NodeModels(None, lambda: (cube, replace(grid, renderer=""), "k")).corrects_cores
    assert NodeModels(None, lambda: (cube, grid, "k")).corrects_cores


def test_fine_cores_are_rendered_once_per_generated_cube(isolated_cache, monkeypatch):
    """The cores depend on the cube alone: the first convolution renders them and keeps them
    beside the generated cube, the next process (another PSF too) reads them, with the same models."""
    from dre_hpc.cli.dre import load_cube
    from dre_hpc.models import core
    from dre_hpc.models.generate import ensure_cube
    path = ensure_cube(node_grid(), "core_store_test")
    psf = draw_psf(SPEC)
    first = NodeModels(None, lambda: load_cube(str(path))).for_psf(psf)
    kept = core.cores_file(first.grid)
    assert kept is not None and kept.is_file() and kept.parent == path.parent

    def refuse(*args, **kwargs):
        raise AssertionError("cores rendered again")

    monkeypatch.setattr(core, "render_cores", refuse)
    second = NodeModels(None, lambda: load_cube(str(path)))
    assert np.array_equal(second.for_psf(psf).host, first.host)
    second.for_psf(draw_psf(SimSpec(psf_fwhm=3.0)))                  # another PSF: the same cores


def test_a_correction_wider_than_the_stamp_is_cut_to_it():
    """A 25-pixel PSF around a 9 x 9 core reaches 16 pixels from the centre: on a 24-pixel stamp
    only the pixels inside are corrected (the rest lies outside the model anyway)."""
    pixels, inside = core_pixels(16, 24)
    assert inside.sum() == 24 * 24 and np.array_equal(np.sort(pixels), np.arange(24 * 24))
    pixels, inside = core_pixels(16, 128)
    assert inside.all() and len(pixels) == 33 * 33
