"""Shared fixtures: an isolated cache, the default model cube, simulated cutouts with truth."""

from __future__ import annotations

import pytest

from slurm_cluster import session_cluster

#: Test modules run after all others: the container build (`make test` starts it in the background
#: at the beginning, and its tests wait for it on the build's lock).
RUN_LAST = ("test_container_build.py",)


def pytest_collection_modifyitems(items):
    """Move the `RUN_LAST` modules' tests to the end, in their order."""
    items.sort(key=lambda item: item.path.name in RUN_LAST)


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    """Tests never read or write the user's cache: DRE_HPC_CACHE points to a session directory."""
    mp = pytest.MonkeyPatch()
    path = tmp_path_factory.mktemp("dre_cache")
    mp.setenv("DRE_HPC_CACHE", str(path))
    yield path
    mp.undo()


@pytest.fixture(scope="session", autouse=True)
def site_defaults(tmp_path_factory):
    """dre-batch runs fit with the ``bulge`` cube (fit.model's built-in default is ``sersic``, whose
    convolution takes about 10 s per tile): through the site-defaults file, as a centre would set
    it. `tests/test_site_defaults.py` checks the built-in default and the layering."""
    mp = pytest.MonkeyPatch()
    path = tmp_path_factory.mktemp("site") / "defaults.yaml"
    path.write_text("fit:\n  model: bulge\n")
    mp.setenv("DRE_BATCH_DEFAULTS", str(path))
    yield path
    mp.undo()


@pytest.fixture(scope="session")
def default_cube_file(isolated_cache):
    """The default cube, generated once per test session into the isolated cache."""
    from dre_hpc.models.generate import ensure_default_cube
    return ensure_default_cube()


@pytest.fixture(scope="session")
def default_cube(default_cube_file):
    from dre_hpc.models.cube_io import read_cube
    return read_cube(default_cube_file)


@pytest.fixture(scope="session")
def default_models(default_cube, default_cube_file):
    """NodeModels of the default cube on the CPU backend, one process."""
    from dre_hpc.fit.model_matrix import NodeModels
    cube, grid = default_cube
    return NodeModels(None, lambda: (cube, grid, str(default_cube_file)))


@pytest.fixture(scope="session")
def sim_galaxies():
    """100 de Vaucouleurs galaxies with known truth, S/N 50-200, random sub-pixel centres."""
    from dre_hpc.sim.cutouts import SimSpec, simulate_cutouts
    spec = SimSpec(n_objects=100, seed=2026)
    cuts, truth, psf = simulate_cutouts(spec)
    return cuts, truth, psf


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """The real single-host SLURM (tests/slurm_cluster.py), started once per session and stopped at
    its end. Attributes: ``env`` (os.environ + SLURM_CONF, for subprocesses), ``sbatch(*args, cwd=)``,
    ``wait_for(job_ids, timeout)``, ``states``, ``show_job``, ``scancel``, ``log_tails()``.
    Skips only for a non-root user; as root a failed start fails the tests using it."""
    yield from session_cluster(tmp_path_factory)
