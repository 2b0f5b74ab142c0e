"""make_cuts on hand-built SExtractor products with exactly known content.

The tile, its check images and its catalogue are written here with NumPy (no SExtractor), so
that every pixel of every cut is known: placement against astropy's Cutout2D (the original's
rule), padding at edges, selection, integrity flags, both layouts and the JSON report. The
workflow with the real SExtractor is tested in test_tile_workflow.py.
"""

from __future__ import annotations

import json

import numpy as np
from scipy import ndimage
import pytest
from astropy.io import fits
from astropy.nddata import Cutout2D
from astropy.table import Table

from dre_hpc.cli import make_cuts as cli
from dre_hpc.flags import CutFlag
from dre_hpc.io.cuts import read_cuts
from dre_hpc.preprocess.cut_tiles import cut_tile
from dre_hpc.preprocess.cuts import CutsOptions, cut_start
from dre_hpc.preprocess.masks import FIT_GROW_ITERATIONS, NEIGHBOUR_GROW_ITERATIONS, clean_mask

NY, NX = 300, 340
#            NUMBER  X_IMAGE  Y_IMAGE  CLASS_STAR  FLUX_AUTO   what it tests
OBJECTS = [(1, 170.3, 150.7, 0.02, 500.0),     # interior
           (2, 30.0, 140.2, 0.03, 800.0),      # near the left edge: padded when the margin allows it
           (3, 200.0, 220.0, 0.95, 900.0),     # a star
           (4, 250.6, 80.4, 0.10, 50.0),       # faint: removed by a FLUX_AUTO filter
           (5, 100.2, 80.9, 0.05, 700.0),      # NaN pixels in its cut
           (6, 260.0, 230.0, 0.05, 600.0)]     # zero rms inside its mask


def _write_tile(root, name="tile", nan=True, bad_rms=True):
    rng = np.random.default_rng(7)
    image = rng.normal(0.0, 1.0, (NY, NX)).astype(np.float32)
    seg = np.zeros((NY, NX), np.int32)
    rms = np.full((NY, NX), 2.0, np.float32)
    for number, x, y, *_ in OBJECTS:
        i, j = int(round(y - 1)), int(round(x - 1))
        seg[i - 6:i + 7, j - 4:j + 5] = number
        image[i - 6:i + 7, j - 4:j + 5] += 10.0 * number
    if nan:
        image[79, 110] = np.nan                   # inside object 5's cut, outside its mask
    if bad_rms:
        rms[229, 259] = 0.0                       # object 6's centre
    (root / "Tiles").mkdir(parents=True, exist_ok=True)
    sex = root / "Sextracted"
    sex.mkdir(exist_ok=True)
    fits.PrimaryHDU(image + 100.0).writeto(root / "Tiles" / f"{name}.fits", overwrite=True)
    fits.PrimaryHDU(image).writeto(sex / f"{name}_nb.fits", overwrite=True)
    fits.PrimaryHDU(rms).writeto(sex / f"{name}_rms.fits", overwrite=True)
    fits.PrimaryHDU(seg).writeto(sex / f"{name}_seg.fits", overwrite=True)
    table = Table(rows=OBJECTS, names=("NUMBER", "X_IMAGE", "Y_IMAGE", "CLASS_STAR", "FLUX_AUTO"))
    table["EXT_NUMBER"] = np.ones(len(table), np.int16)
    hdu = fits.table_to_hdu(table)
    hdu.name = "LDAC_OBJECTS"
    fits.HDUList([fits.PrimaryHDU(), hdu]).writeto(sex / f"{name}_cat.fits", overwrite=True)
    return image, rms, seg


@pytest.fixture()
def workdir(tmp_path):
    image, rms, seg = _write_tile(tmp_path)
    return tmp_path, image, rms, seg


def _cut(workdir, **options):
    root = workdir[0]
    return cut_tile(root / "Tiles" / "tile.fits", root / "Sextracted", root / "Cuts", CutsOptions(**options))


def _by_number(cuts):
    return {int(n): i for i, n in enumerate(cuts.objects["NUMBER"])}


def test_selection_follows_margin_stellarity_and_filters(workdir):
    report = _cut(workdir, margin=40, filters=(("FLUX_AUTO", 100.0, 1e9),))
    cuts = read_cuts(report["cuts_file"])
    assert sorted(cuts.objects["NUMBER"]) == [1, 5, 6]
    assert report["rejected"] == {"margin": 1, "stellarity": 1, "filter FLUX_AUTO": 1}
    assert report["catalogue_objects"] == len(OBJECTS) and report["cut"] == 3


def test_cut_matches_cutout2d_and_records_the_offset(workdir):
    root, image, rms, seg = workdir
    cuts = read_cuts(_cut(workdir, margin=40)["cuts_file"])
    row = _by_number(cuts)[1]
    number, x, y = OBJECTS[0][:3]
    expected = Cutout2D(image, (x - 1, y - 1), 128, mode="partial", fill_value=0).data
    np.testing.assert_array_equal(cuts.data[row], expected)
    obj = cuts.objects[row]
    assert (obj["X0"], obj["Y0"]) == (cut_start(x, 128), cut_start(y, 128))
    # the catalogue position, in cut pixels, is the model centre 64 plus the stored offset
    assert x - 1 - obj["X0"] == pytest.approx(64 + obj["DX"])
    assert y - 1 - obj["Y0"] == pytest.approx(64 + obj["DY"])
    assert -1 < obj["DX"] <= 0 and -1 < obj["DY"] <= 0
    window = seg[obj["Y0"]:obj["Y0"] + 128, obj["X0"]:obj["X0"] + 128]
    own = window == number
    # the default mask: grown by 12 pixels, never within 4 pixels of another object's segment
    # (cross element: city-block distance), the object's own segment kept whole
    grown = ndimage.binary_dilation(clean_mask(own, 1), iterations=FIT_GROW_ITERATIONS - 1)
    others = (window > 0) & ~own
    near = ndimage.distance_transform_cdt(~others, metric="taxicab") <= NEIGHBOUR_GROW_ITERATIONS
    np.testing.assert_array_equal(cuts.mask[row], grown & ~(near & ~own))
    assert not (cuts.mask[row] & (window > 0) & ~own).any()
    assert np.all(cuts.rms[row] == 2.0) and obj["CUT_FLAGS"] == 0
    original = read_cuts(_cut(workdir, margin=40, mask="original")["cuts_file"])
    np.testing.assert_array_equal(original.mask[_by_number(original)[1]], clean_mask(own))


def test_edge_cuts_are_padded_not_shrunk(workdir):
    cuts = read_cuts(_cut(workdir, margin=10)["cuts_file"])
    row = _by_number(cuts)[2]
    obj = cuts.objects[row]
    assert obj["X0"] < 0 and cuts.data.shape[1:] == (128, 128)
    outside = np.zeros((128, 128), bool)
    outside[:, :-obj["X0"]] = True
    assert obj["CUT_FLAGS"] & CutFlag.PADDED
    assert not cuts.mask[row][outside].any() and np.all(cuts.data[row][outside] == 0)
    assert np.all(cuts.rms[row][outside] == 0) and np.all(cuts.rms[row][~outside] == 2.0)
    assert cuts.mask[row][64, 64]


def test_integrity_flags_keep_the_objects_and_are_reported(workdir):
    report = _cut(workdir, margin=40)
    cuts = read_cuts(report["cuts_file"])
    rows = _by_number(cuts)
    assert cuts.objects["CUT_FLAGS"][rows[5]] == CutFlag.NONFINITE
    assert cuts.objects["CUT_FLAGS"][rows[6]] == CutFlag.BAD_RMS
    on_disk = json.loads((workdir[0] / "Cuts" / "tile_cuts.json").read_text())
    assert on_disk["flag_counts"]["NONFINITE"] == 1 and on_disk["flag_counts"]["BAD_RMS"] == 1
    assert {(o["NUMBER"], tuple(o["flags"])) for o in on_disk["flagged_objects"]} == \
        {(5, ("NONFINITE",)), (6, ("BAD_RMS",))}


def test_object_missing_from_segmentation_is_flagged(workdir):
    root = workdir[0]
    seg_path = root / "Sextracted" / "tile_seg.fits"
    seg = fits.getdata(seg_path)
    seg[seg == 1] = 0
    fits.PrimaryHDU(seg).writeto(seg_path, overwrite=True)
    cuts = read_cuts(_cut(workdir, margin=40)["cuts_file"])
    row = _by_number(cuts)[1]
    assert cuts.objects["CUT_FLAGS"][row] == CutFlag.NO_SEGMENT
    assert cuts.mask[row].sum() == clean_mask(np.zeros((128, 128), bool), FIT_GROW_ITERATIONS).sum()


def test_dre_layout_holds_the_same_cuts(workdir):
    stacked = read_cuts(_cut(workdir, margin=40)["cuts_file"])
    dre = read_cuts(_cut(workdir, margin=40, layout="dre", compression="low")["cuts_file"])
    assert dre.names == sorted(stacked.names) == stacked.names
    np.testing.assert_array_equal(dre.data, stacked.data)
    np.testing.assert_array_equal(dre.mask, stacked.mask)
    assert np.isnan(dre.objects["DX"]).all()          # the original layout stores no positions


def test_centroids_use_windowed_positions(workdir):
    root = workdir[0]
    cat_path = root / "Sextracted" / "tile_cat.fits"
    table = Table.read(cat_path, hdu="LDAC_OBJECTS")
    with pytest.raises(Exception, match="XWIN_IMAGE"):
        _cut(workdir, margin=40, centroids=True)
    table["XWIN_IMAGE"], table["YWIN_IMAGE"] = table["X_IMAGE"] + 0.25, table["Y_IMAGE"] - 0.25
    hdu = fits.table_to_hdu(table)
    hdu.name = "LDAC_OBJECTS"
    fits.HDUList([fits.PrimaryHDU(), hdu]).writeto(cat_path, overwrite=True)
    plain = read_cuts(_cut(workdir, margin=40)["cuts_file"])
    centred = read_cuts(_cut(workdir, margin=40, centroids=True)["cuts_file"])
    x_plain = plain.objects["X0"] + 64 + plain.objects["DX"]
    x_win = centred.objects["X0"] + 64 + centred.objects["DX"]
    np.testing.assert_allclose(x_win - x_plain, 0.25)


def test_cli_defaults_and_unknown_filter_column(workdir, caplog, monkeypatch):
    root = workdir[0]
    monkeypatch.chdir(root)
    assert cli.main([]) == 0                          # Tiles -> Sextracted -> Cuts, margin 80
    cuts = read_cuts(root / "Cuts" / "tile_cuts.h5")
    assert sorted(cuts.objects["NUMBER"]) == [1, 4, 5]     # 2: margin, 3: star, 6: margin
    assert cli.main(["-f", "NOPE", "0", "1"]) == 1
    assert "-f NOPE: the catalogue has no column NOPE" in caplog.text


def test_cli_missing_check_image_fails_that_tile_only(workdir, caplog):
    root = workdir[0]
    _write_tile(root, name="other")
    (root / "Sextracted" / "other_seg.fits").unlink()
    code = cli.main(["-i", str(root / "Tiles"), "-s", str(root / "Sextracted"), "-o", str(root / "Cuts")])
    assert code == 1
    assert "other_seg.fits does not exist" in caplog.text and "run sex_dre" in caplog.text
    assert (root / "Cuts" / "tile_cuts.h5").is_file() and not (root / "Cuts" / "other_cuts.h5").exists()


def test_cli_bad_arguments_are_one_line_errors(tmp_path, capsys, caplog):
    assert cli.main(["-i", str(tmp_path / "nowhere")]) == 2
    assert "nowhere does not exist" in capsys.readouterr().err
    assert cli.main(["--layout", "dre", "--centroids", "-i", str(tmp_path)]) == 2
    assert "--centroids needs the stacked layout" in capsys.readouterr().err
    _write_tile(tmp_path, name="broken", nan=False)
    (tmp_path / "Tiles" / "broken.fits").write_bytes(b"SIMPLE  =  not really a FITS file")
    assert cli.main(["-i", str(tmp_path / "Tiles"), "-s", str(tmp_path / "Sextracted"),
                     "-o", str(tmp_path / "Cuts")]) == 1
    assert "broken.fits: cannot be read as a FITS image" in caplog.text


def test_readme_documents_every_cut_flag():
    from pathlib import Path
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for value, name, description in CutFlag.describe():
        assert f"| {value} | `{name}` | {description} |" in readme, name


def test_the_fit_mask_keeps_away_from_the_neighbours():
    """`object_mask` on a synthetic segmentation: the object's segment grown by 12 pixels, less
    the pixels within 4 (city-block) of a neighbour's segment 10 pixels away, except the object's
    own segment pixels, which stay even where they touch the neighbour."""
    from dre_hpc.preprocess.masks import object_mask
    seg = np.zeros((128, 128), np.int32)
    y, x = np.mgrid[:128, :128]
    seg[(y - 64) ** 2 + (x - 64) ** 2 <= 36] = 1                  # the object, radius 6
    seg[(y - 64) ** 2 + (x - 80) ** 2 <= 9] = 2                   # a neighbour, 10 px from its edge
    seg[64, 70:77] = 1                                            # an arm of the object reaching it
    mask = object_mask(seg, 1)
    own, other = seg == 1, seg == 2
    assert mask[own].all()                                        # every own pixel, the arm's too
    assert not mask[other].any()
    near = ndimage.distance_transform_cdt(~other, metric="taxicab") <= 4
    assert not (mask & near & ~own).any() and (near & ~own & ~other).sum() > 20
    assert mask[64, 52] and mask[52, 64]                          # 12 px out on the free side
    assert clean_mask(own, FIT_GROW_ITERATIONS)[60, 80] and not mask[60, 80]   # 1 px from the neighbour
