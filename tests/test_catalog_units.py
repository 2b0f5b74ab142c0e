"""Units (TUNITn) and descriptions (TCOMMn) of every catalogue dre_hpc writes: the column table
covers every column the fit writes, and the catalogues of a real run read back as astropy
QTables with the right units."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from astropy import units as u
from astropy.io import fits
from astropy.table import QTable, Table

from batch_helpers import collated_copy, dre_batch, flat_path, local_reference, sim_tiles  # noqa: F401
from dre_hpc.batch.rundir import RunDir
from dre_hpc.fit.engine import FitOptions, fit_cutouts
from dre_hpc.io.columns import COLUMNS, MAX_DESCRIPTION, TRUTH_INFO, fits_unit, flux_unit
from dre_hpc.io.cuts import empty_objects
from dre_hpc.io.outputs import EXTRA_COLUMNS, ORIGINAL_COLUMNS, summary_table, write_summary
from scratch import scratch_dir

#: The main columns and their units in a run on simulated tiles (BUNIT = 'ADU'); None: no unit.
MAIN_UNITS = {"FLUX": u.adu, "FLUX_ERR": u.adu, "MAG": u.mag, "MAG_ERR": u.mag, "ANGLE": u.deg,
              "ANGLE_MEAN": u.deg, "ANGLE_ERR": u.deg, "X_IMAGE": u.pix, "Y_IMAGE": u.pix, "DX": u.pix,
              "LOGR": None, "LOGR_ERR": None, "AX_RATIO": None, "INDEX": None, "CHI2": None, "DOF": None,
              "FLAGS": None, "ROW": None,
              "FLUX_AUTO": u.ct, "SEX_X_IMAGE": u.pix, "CLASS_STAR": None}   # SExtractor's own


def descriptions(header) -> dict:
    """``{column: TCOMMn}`` of a table header."""
    return {header[f"TTYPE{i}"]: header.get(f"TCOMM{i}") for i in range(1, header["TFIELDS"] + 1)}


def read_quietly(path, hdu=1) -> QTable:
    """The table as a QTable; a UnitsWarning (a unit astropy cannot parse) fails the test."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", u.UnitsWarning)
        return QTable.read(path, hdu=hdu)


def unit_of(table, name):
    return getattr(table[name], "unit", None)


# -- the table itself ----------------------------------------------------------------------------

@pytest.mark.parametrize("statistic", ["wls", "dre"])
def test_every_column_the_fit_writes_has_an_entry(default_models, sim_galaxies, statistic):
    cuts, _, psf = sim_galaxies
    results = fit_cutouts(default_models.for_psf(psf), cuts.subset(np.arange(3)), FitOptions(statistic=statistic))
    written = (set(results) - {"SURFACE"}) | set(ORIGINAL_COLUMNS + EXTRA_COLUMNS) | {"TILE"}
    assert written - set(COLUMNS) == set(), "columns without units and description"


def test_entries_are_fits_units_and_one_card_descriptions():
    for name, info in {**COLUMNS, **TRUTH_INFO}.items():
        assert info.unit in (None, "flux") or fits_unit(info.unit) == info.unit, name
        assert 0 < len(info.description) <= MAX_DESCRIPTION and info.description.isascii(), name


def test_unit_strings_are_normalised_and_unknown_ones_dropped():
    assert fits_unit("pixel") == "pix" and fits_unit("ADU") == "adu" and fits_unit("count") == "count"
    for bad in ("", None, "log(pix)", "e-/s", "furlong per fortnight"):
        assert fits_unit(bad) is None, bad
    assert flux_unit(None) == ("adu", "") and flux_unit("ADU") == ("adu", "")
    assert flux_unit("MJy/sr")[0] == "MJy sr-1"
    unit, note = flux_unit("e-/s")
    assert unit is None and "e-/s" in note          # the image's unit is named, not guessed


def test_flux_unit_from_the_catalogue_and_catalogue_columns_keep_theirs(tmp_path):
    """A catalogue whose image has BUNIT 'e-/s' (not a FITS unit): FLUX gets no unit and says
    why; a catalogue column keeps its own unit; one with a unit FITS cannot write gets none."""
    n = 3
    objects = empty_objects(n)
    objects["NUMBER"] = np.arange(1, n + 1)
    results = {name: np.ones(n) for name in ORIGINAL_COLUMNS + EXTRA_COLUMNS}
    results.update(MODEL_IDX=np.zeros((n, 4), np.int16), FLAGS=np.zeros(n, np.int64))
    catalog = Table({"NUMBER": np.arange(1, n + 1), "FLUX_AUTO": np.ones(n), "ODD": np.ones(n)})
    catalog["FLUX_AUTO"].unit, catalog["FLUX_AUTO"].description = "ct", "Kron flux"
    catalog["ODD"].unit = u.def_unit("furlong_test")
    catalog.meta["BUNIT"] = "e-/s"
    path = tmp_path / "s_dre.fits"
    write_summary(path, summary_table(results, objects, None, catalog))
    table, header = read_quietly(path), fits.getheader(path, 1)
    assert unit_of(table, "FLUX") is None and "BUNIT e-/s" in descriptions(header)["FLUX"]
    assert unit_of(table, "FLUX_AUTO") == u.ct and descriptions(header)["FLUX_AUTO"] == "Kron flux"
    assert unit_of(table, "ODD") is None and unit_of(table, "ANGLE") == u.deg
    assert "BUNIT" not in header                     # the catalogue's meta is not the summary's


# -- a real run ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def collated(request, local_reference, tmp_path_factory):  # noqa: F811
    """A collated copy of the real local run of two simulated tiles."""
    return collated_copy(local_reference[0], scratch_dir(request, tmp_path_factory, "units") / "run")


@pytest.mark.slow
def test_catalogues_of_a_run_read_back_as_qtables_with_units(collated):
    rundir = RunDir(collated)
    paths = [flat_path(collated), rundir.collated("tile_a_dre.fits"), rundir.chunk_outputs("tile_b", 1)["dre"]]
    for path in paths:
        table, header = read_quietly(path), fits.getheader(path, 1)
        for name, unit in MAIN_UNITS.items():
            assert unit_of(table, name) == unit, (path.name, name, unit_of(table, name))
        assert isinstance(table["FLUX"], u.Quantity) and np.all(table["FLUX"].to_value(u.adu) > 0)
        comments = descriptions(header)
        for name in ORIGINAL_COLUMNS + EXTRA_COLUMNS:
            assert comments[name] == COLUMNS[name].description, (path.name, name)
        assert comments["CLASS_STAR"] == "S/G classifier output"      # SExtractor's description
    assert descriptions(fits.getheader(paths[0], 1))["TILE"] == COLUMNS["TILE"].description


@pytest.mark.slow
def test_truth_tables_have_units(sim_tiles):  # noqa: F811
    truth = read_quietly(sim_tiles.parent / "Truth" / "tile_a_truth.fits")
    assert unit_of(truth, "X") == u.pix and unit_of(truth, "FLUX") == u.adu and unit_of(truth, "ANGLE") == u.deg
    assert unit_of(truth, "LOGR") is None and unit_of(truth, "SNR") is None
    header = fits.getheader(sim_tiles.parent / "Truth" / "tile_a_truth.fits", 1)
    assert descriptions(header)["LOGR"] == TRUTH_INFO["LOGR"].description
