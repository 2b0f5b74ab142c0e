"""The dre-batch run config: defaults, examples, overrides, strict validation, freezing, hashing."""

from pathlib import Path

import pytest
import yaml

from dre_hpc.batch.config import TABLE, ConfigError, RunConfig, load_config, resolve
from dre_hpc.errors import DreError

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "run_configs").glob("*.yaml"))


def write(tmp_path, text, name="run.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_examples_exist():
    assert {p.stem for p in EXAMPLES} >= {"local", "slurm", "pbs"}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_loads_and_round_trips(path, tmp_path):
    cfg = load_config(path)
    assert cfg.scheduler["name"] in ("local", "slurm", "pbs")
    assert isinstance(cfg.resources["fit"]["walltime"], str)
    again = load_config(write(tmp_path, cfg.to_yaml()))
    assert again == cfg and again.hash() == cfg.hash()


def test_example_schedulers_match_file_names():
    for path in EXAMPLES:
        if path.stem in ("local", "slurm", "pbs"):
            assert load_config(path).scheduler["name"] == path.stem


def test_defaults_from_the_table():
    cfg = resolve()
    assert cfg.as_dict().keys() == TABLE.keys()
    assert cfg.fit["statistic"] == "wls" and cfg.fit["model"] == "sersic"
    assert cfg.scheduler["name"] == "local"
    assert cfg.prep["margin"] == 80 and cfg.prep["layout"] == "stacked"
    assert cfg.chunking["objects_per_chunk"] == 1000 and cfg.chunking["chunks_per_tile"] is None
    assert set(cfg.resources) == {"prep", "fit", "collate"}
    assert cfg.container["image"] is None and cfg.container["binds"] == ()


def test_empty_file_gives_defaults(tmp_path):
    assert load_config(write(tmp_path, "")) == resolve()


def test_choices_match_the_library():
    from dre_hpc.fit.backend import BACKENDS
    from dre_hpc.fit.engine import STATISTICS
    from dre_hpc.io.cuts import COMPRESSION
    assert TABLE["fit"]["statistic"].choices == tuple(STATISTICS)
    assert TABLE["fit"]["backend"].choices == tuple(BACKENDS)
    assert TABLE["prep"]["compression"].choices == tuple(COMPRESSION)


def test_frozen():
    cfg = resolve()
    with pytest.raises(TypeError):
        cfg.fit["statistic"] = "dre"
    with pytest.raises(AttributeError):
        cfg.fit = {}
    with pytest.raises(AttributeError):
        cfg.container["binds"].append("/x")
    copy = cfg.as_dict()
    copy["fit"]["statistic"] = "dre"
    assert cfg.fit["statistic"] == "wls"


def test_hash_is_sha256_of_content():
    a, b = resolve(), resolve({"run": {"seed": 1}})
    assert len(a.hash()) == 64 and a.hash() == resolve().hash()
    assert a.hash() != b.hash()
    assert resolve({"resources": {"fit": {"mem_gb": 8}}}).hash() == resolve(
        {"resources": {"fit": {"mem_gb": 8.0}}}).hash()          # numbers canonical


def test_overrides(tmp_path):
    path = write(tmp_path, "fit:\n  statistic: wls\n")
    cfg = load_config(path, ["fit.statistic=dre", 'resources.fit.walltime="02:00:00"',
                             "resources.prep.walltime=12:00:00", "fit.model=null", "run.name=007",
                             "container.binds=[/a, /b:/c]", "fit.centre=false", "fit.zero_point=25"])
    assert cfg.fit["statistic"] == "dre"
    assert cfg.resources["fit"]["walltime"] == "02:00:00"
    assert cfg.resources["prep"]["walltime"] == "12:00:00"   # command-line text kept as written
    assert cfg.run["name"] == "007" and cfg.fit["model"] is None
    assert cfg.container["binds"] == ("/a", "/b:/c")
    assert cfg.fit["centre"] is False and cfg.fit["zero_point"] == 25.0


@pytest.mark.parametrize("override,match", [
    ("fit.statistc=dre", r"unknown key 'fit.statistc'; valid keys in 'fit': model, statistic, backend"),
    ("fitt.statistic=dre", r"unknown key 'fitt'; valid keys: run, fit, prep"),
    ("resources.gpu.walltime='01:00:00'", r"valid keys in 'resources': prep, fit, collate"),
    ("fit=1", r"fit is a section; set one of its keys: model"),
    ("run.name.x=1", r"run.name is a key, not a section"),
    ("fit.statistic", r"expected section.key=value"),
    ("fit.batch_size=many", r"fit.batch_size: expected an integer, got 'many'"),
    ("fit.backend=tpu", r"'tpu' is not one of cpu, gpu"),
    ("run.seed=-1", r"run.seed: must be >= 0"),
])
def test_bad_overrides(override, match, tmp_path):
    with pytest.raises(ConfigError, match=match) as info:
        load_config(write(tmp_path, ""), [override])
    assert "override" in str(info.value)


@pytest.mark.parametrize("text,match", [
    ("fit:\n  statistc: dre\n", r"unknown key 'fit.statistc'; valid keys in 'fit': model, statistic"),
    ("colate: {}\n", r"unknown key 'colate'; valid keys: run, fit, prep, chunking, scheduler"),
    ("resources:\n  fit:\n    memory: 4\n", r"unknown key 'resources.fit.memory'.*mem_gb"),
    ("fit:\n  batch_size: '256'\n", r"fit.batch_size: expected an integer, got '256' \(str\)"),
    ("fit:\n  centre: 1\n", r"fit.centre: expected true or false, got 1"),
    ("fit:\n  statistic: chi2\n", r"fit.statistic: 'chi2' is not one of wls, dre"),
    ("scheduler:\n  name: lsf\n", r"not one of local, slurm, pbs"),
    ("fit: 3\n", r"fit: expected a mapping of model, statistic"),
    ("- a\n- b\n", r"top level: expected a mapping"),
    ("container:\n  binds: /data\n", r"container.binds: expected a list of strings"),
    ("prep:\n  filters: [[MAG_AUTO, 16]]\n", r"prep.filters: expected a list of \[PARAM, MIN, MAX\]"),
    ("prep:\n  gain: adu\n", r'prep.gain: expected "counts", "cps" or a positive number'),
    ("run:\n  name: my run\n", r"run.name: expected a name"),
    ("resources:\n  fit:\n    nodes: 0\n", r"resources.fit.nodes: must be >= 1, got 0"),
    ("chunking:\n  objects_per_chunk: 10\n  chunks_per_tile: 2\n", r"exactly one of .* not both"),
    ("chunking:\n  objects_per_chunk: null\n", r"set exactly one of objects_per_chunk and chunks_per_tile"),
])
def test_invalid_files_name_file_and_key(text, match, tmp_path):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=match) as info:
        load_config(path)
    assert str(info.value).startswith(str(path) + ":")


@pytest.mark.parametrize("value", ["1:00:00", "3600", "2.5"])
def test_unquoted_walltime_refused_with_a_hint(value, tmp_path):
    path = write(tmp_path, f"resources:\n  fit:\n    walltime: {value}\n")
    with pytest.raises(ConfigError, match=r'resources.fit.walltime: expected a quoted string.*quote it'):
        load_config(path)


@pytest.mark.parametrize("value,ok", [
    ('"01:00:00"', True), ('"1-12:00:00"', True), ('"100:00:00"', True),
    ('"01:60:00"', False), ('"1:00"', False), ('"one hour"', False), ('"1-1:00"', False),
])
def test_walltime_format(value, ok, tmp_path):
    path = write(tmp_path, f"resources:\n  prep:\n    walltime: {value}\n")
    if ok:
        assert load_config(path).resources["prep"]["walltime"] == yaml.safe_load(value)
    else:
        with pytest.raises(ConfigError, match=r'resources.prep.walltime: expected a string "HH:MM:SS"'):
            load_config(path)


def test_chunks_per_tile_replaces_the_default(tmp_path):
    cfg = load_config(write(tmp_path, "chunking:\n  chunks_per_tile: 8\n"))
    assert cfg.chunking["chunks_per_tile"] == 8 and cfg.chunking["objects_per_chunk"] is None
    cfg = load_config(write(tmp_path, ""), ["chunking.chunks_per_tile=3"])
    assert cfg.chunking["chunks_per_tile"] == 3 and cfg.chunking["objects_per_chunk"] is None


def test_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=rf"{path}: run config not found"):
        load_config(path)


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = write(tmp_path, "run:\n  name: x\nfit:\n  statistic: [wls\n")
    with pytest.raises(ConfigError, match=rf"{path}: line [45], column \d+: not valid YAML"):
        load_config(path)


def test_config_error_is_a_dre_error():
    assert issubclass(ConfigError, DreError)
    assert isinstance(resolve(), RunConfig)


def test_readme_lists_every_key():
    text = (Path(__file__).resolve().parents[1] / "run_configs" / "README.md").read_text()
    for section, keys in TABLE.items():
        assert f"`{section}" in text
        leaves = keys["fit"] if section == "resources" else keys
        for name in leaves:
            assert f"| `{name}` |" in text, f"run_configs/README.md lacks {section}.{name}"
