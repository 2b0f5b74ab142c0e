"""fit.model's built-in default and the site-defaults layer of `dre-batch setup`
(``$DRE_BATCH_DEFAULTS``): built-in < site file < run config < ``--set``, only at setup, recorded in
the provenance; a bad site file is a clear error that leaves nothing behind."""

from __future__ import annotations

import hashlib
import json

import pytest
import yaml

from batch_helpers import dre_batch, sim_tiles, write_config  # noqa: F401  (sim_tiles: fixture)
from dre_hpc.batch.config import SITE_DEFAULTS_ENV, ConfigError, load_config, resolve


def test_the_built_in_model_is_the_free_index_cube(monkeypatch):
    """Without site defaults, dre-batch fits with the ``sersic`` cube (issue 16); null still means
    the original's ``bulge``."""
    monkeypatch.delenv(SITE_DEFAULTS_ENV, raising=False)
    assert resolve(None).fit["model"] == "sersic"
    assert resolve(None, site=True).fit["model"] == "sersic"
    assert resolve({"fit": {"model": None}}).fit["model"] is None


def test_layers_in_order(tmp_path, monkeypatch):
    site = tmp_path / "site.yaml"
    site.write_text(yaml.safe_dump({"fit": {"model": "bulge", "statistic": "dre"},
                                    "resources": {"fit": {"partition": "short", "account": "astro"}}}))
    monkeypatch.setenv(SITE_DEFAULTS_ENV, str(site))
    run = write_config(tmp_path / "run.yaml", fit={"statistic": "wls"})
    config = load_config(run, ["resources.fit.account=other"], site=True)
    assert config.fit["model"] == "bulge"                       # site over built-in
    assert config.fit["statistic"] == "wls"                     # run config over site
    assert config.resources["fit"]["partition"] == "short"
    assert config.resources["fit"]["account"] == "other"        # --set over all
    assert load_config(run).fit["model"] == "sersic"            # only where asked (setup)


@pytest.mark.parametrize("content, expected", [
    (None, "site-defaults file named by $DRE_BATCH_DEFAULTS not found"),
    ("fit: {model: [1, 2]}\n", "fit.model"),
    ("fit: {colour: red}\n", "colour"),
    ("chunking: {chunks_per_tile: 4}\n", "chunking has no site default"),
    ("fit: [unclosed\n", "not valid YAML"),
])
def test_a_bad_site_file_names_itself(tmp_path, monkeypatch, content, expected):
    site = tmp_path / "site.yaml"
    if content is not None:
        site.write_text(content)
    monkeypatch.setenv(SITE_DEFAULTS_ENV, str(site))
    with pytest.raises(ConfigError) as err:
        resolve(None, site=True)
    assert expected in str(err.value) and str(site) in str(err.value)


def test_setup_applies_and_records_the_site_file(tmp_path, sim_tiles, monkeypatch):  # noqa: F811
    site = tmp_path / "site.yaml"
    site.write_text("fit:\n  model: bulge\n  statistic: dre\n")
    monkeypatch.setenv(SITE_DEFAULTS_ENV, str(site))
    run_dir = tmp_path / "run"
    result = dre_batch("setup", write_config(tmp_path / "run.yaml"), sim_tiles, "--run-dir", run_dir)
    assert result.returncode == 0, result.stderr
    stored = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert stored["fit"]["model"] == "bulge" and stored["fit"]["statistic"] == "dre"
    record = json.loads((run_dir / "provenance.json").read_text())["site_defaults"]
    assert record == {"path": str(site), "sha256": hashlib.sha256(site.read_bytes()).hexdigest()}
    # the jobs read the run's own config: a site file changed or gone later changes nothing
    site.unlink()
    status = dre_batch("status", run_dir)                      # exit 1: not finished
    assert status.stderr == "" and "4 unsubmitted" in status.stdout


def test_setup_with_a_missing_site_file_fails_cleanly(tmp_path, sim_tiles, monkeypatch):  # noqa: F811
    monkeypatch.setenv(SITE_DEFAULTS_ENV, str(tmp_path / "nowhere.yaml"))
    run_dir = tmp_path / "run"
    result = dre_batch("setup", write_config(tmp_path / "run.yaml"), sim_tiles, "--run-dir", run_dir)
    assert result.returncode != 0
    assert "nowhere.yaml" in result.stderr and SITE_DEFAULTS_ENV in result.stderr
    assert "Traceback" not in result.stderr
    assert not run_dir.exists()
