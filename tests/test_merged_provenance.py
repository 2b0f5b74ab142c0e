"""The headers of merged catalogues describe the merged file (its tiles, rows, chunks, prep digests,
versions), never one of its chunks; a chunk's own cards stay in the chunk files."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

from batch_fixtures import complete_run, failed
from batch_helpers import collated_copy, dre_batch, flat_path, local_reference, sim_tiles  # noqa: F401
from dre_hpc import __version__
from dre_hpc.batch.collate import collate
from dre_hpc.batch.prep_job import prep_digest
from dre_hpc.batch.rundir import RunDir
from scratch import scratch_dir

CHUNK_CARDS = ("CHUNK", "NCHUNKS", "OBJSTART", "OBJSTOP")


def flat_parts(path) -> tuple:
    """``(header of the catalogue, its TILE column, the TILES extension)`` of a flat catalogue."""
    with fits.open(path) as hdul:
        header = hdul[1].header
        tiles = np.char.rstrip(np.asarray(hdul[1].data["TILE"]).astype(str))
        extension = Table(hdul["TILES"].data)
    extension["TILE"] = np.char.rstrip(np.asarray(extension["TILE"]).astype(str))
    return header, tiles, extension


@pytest.fixture(scope="module")
def collated(request, local_reference, tmp_path_factory):  # noqa: F811
    """A collated copy of the real local run (two tiles, two chunks each)."""
    return RunDir(collated_copy(local_reference[0], scratch_dir(request, tmp_path_factory, "provenance") / "run"))


@pytest.mark.slow
def test_flat_catalogue_header_matches_its_contents(collated):
    header, tiles, extension = flat_parts(flat_path(collated.root))
    markers = {t: collated.read_marker("prep", t)[1] for t in ("tile_a", "tile_b")}
    assert header["NOBJECTS"] == header["NAXIS2"] == len(tiles)
    assert header["NTILES"] == len(set(tiles)) == len(extension) == 2
    assert header["NMERGED"] == sum(extension["NMERGED"]) == 4
    assert header["DRE_VER"] == __version__ and header["COLLVER"] == __version__
    for card in CHUNK_CARDS + ("TILE", "PSF", "PREPDIG"):
        assert card not in header, card               # cards of one chunk or one tile
    counts = Counter(tiles)
    for row in extension:
        tile = row["TILE"]
        assert row["ROWS"] == counts[tile] == markers[tile]["n_objects"]
        assert row["NMERGED"] == 2 and row["NMISSING"] == 0
        assert row["PREPDIG"].strip() == prep_digest(markers[tile])
        assert row["DRE_VER"].strip() == __version__
        chunk = fits.getheader(collated.chunk_outputs(tile, 0)["dre"], 1)
        assert row["PSF"].strip() == chunk["PSF"]


@pytest.mark.slow
def test_tile_catalogue_describes_the_tile_and_chunk_files_their_chunk(collated):
    record = json.loads(collated.collated("collate.json").read_text())
    for tile in ("tile_a", "tile_b"):
        header = fits.getheader(collated.collated(f"{tile}_dre.fits"), 1)
        prep = collated.read_marker("prep", tile)[1]
        assert header["TILE"] == tile and header["NTILES"] == 1
        assert header["NOBJECTS"] == header["NAXIS2"] == record["tiles"][tile]["rows"] == prep["n_objects"]
        assert header["NMERGED"] == len(record["tiles"][tile]["chunks"]) == 2
        assert header["PREPDIG"] == prep_digest(prep)
        assert not [card for card in CHUNK_CARDS if card in header]
        for k in range(2):
            chunk = fits.getheader(collated.chunk_outputs(tile, k)["dre"], 1)
            done = collated.read_marker("fit", tile, k)[1]
            assert (chunk["CHUNK"], chunk["OBJSTART"], chunk["OBJSTOP"]) == (k, done["start"], done["stop"])


def test_missing_chunks_are_counted_per_tile(tmp_path):
    """collate --allow-missing: the TILES extension and the headers count the chunks left out."""
    rundir = complete_run(tmp_path / "run", {"a": 6, "b": 4}, chunks_per_tile=3)
    rundir.marker("fit", "a", 1, "done").unlink()
    failed(rundir, "fit", "a", 1, "planted")
    collate(rundir, allow_missing=True)
    header, tiles, extension = flat_parts(rundir.collated("testrun_dre.fits"))
    rows = {row["TILE"]: row for row in extension}
    assert (rows["a"]["NMERGED"], rows["a"]["NMISSING"], rows["a"]["ROWS"]) == (2, 1, 4)
    assert (rows["b"]["NMERGED"], rows["b"]["NMISSING"], rows["b"]["ROWS"]) == (3, 0, 4)
    assert header["NMERGED"] == 5 and header["NMISSING"] == 1 and header["NOBJECTS"] == len(tiles) == 8
    tile = fits.getheader(rundir.collated("a_dre.fits"), 1)
    assert (tile["NMERGED"], tile["NMISSING"], tile["NOBJECTS"]) == (2, 1, 4)
