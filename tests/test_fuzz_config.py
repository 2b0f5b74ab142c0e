"""Fuzzing the dre-batch config validator (hypothesis).

`resolve`, `load_config` and ``section.key=value`` overrides get generated documents: valid keys
with values of every type (huge integers, NaN and infinities, strings with newlines, nested
lists and mappings), unknown keys, junk at any level, and YAML text. Each must either be accepted,
and then the resolved config re-validates from its own YAML to an equal config, or be refused with
a `ConfigError` that names the offending key (or says what the document is); never another
exception.
"""

from __future__ import annotations

import math

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from dre_hpc.batch.config import TABLE, ConfigError, Key, load_config, resolve
from scratch import scratch_dir

# derandomized: CI sees the same examples every run (reproducible); widen max_examples to explore
FUZZ = settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _leaves(table, dotted=""):
    for name, value in table.items():
        path = f"{dotted}.{name}" if dotted else name
        if isinstance(value, Key):
            yield path, value
        else:
            yield from _leaves(value, path)


LEAVES = dict(_leaves(TABLE))
SECTIONS = [name for name, value in TABLE.items() if isinstance(value, dict)]

scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(), st.integers(-2**80, 2**80), st.sampled_from([10**400, -10**400, 2**63, -1, 0]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20), st.sampled_from(["01:00:00", "1-00:00:00", "01:00:00\n", "dre", "wls", "gpu",
                                           "counts", "cps", "x\ny", "", " ", "null", "1e999", ".nan"]),
)
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                      max_leaves=12)


@st.composite
def documents(draw):
    """A config mapping: real keys with any value, sometimes unknown keys or junk sections."""
    doc = {}
    for path in draw(st.lists(st.sampled_from(sorted(LEAVES)), max_size=6, unique=True)):
        node = doc
        *sections, leaf = path.split(".")
        for name in sections:
            node = node.setdefault(name, {})
            if not isinstance(node, dict):
                break
        else:
            node[leaf] = draw(values) if draw(st.booleans()) else LEAVES[path].default
    if draw(st.integers(0, 4)) == 0:
        doc[draw(st.text(max_size=8))] = draw(values)
    if draw(st.integers(0, 4)) == 0:
        doc[draw(st.sampled_from(SECTIONS))] = draw(values)
    if draw(st.integers(0, 9)) == 0:
        return draw(values)
    return doc


def _paths(doc, dotted=""):
    """Every dotted key of a (possibly junk) document."""
    if isinstance(doc, dict):
        for name, value in doc.items():
            path = f"{dotted}.{name}" if dotted else str(name)
            yield path
            yield from _paths(value, path)


def _check_refusal(exc: ConfigError, doc, overrides=()):
    message = str(exc)
    assert "\n" not in message.strip() or "Traceback" not in message
    named = list(_paths(doc)) + [o.partition("=")[0].strip() for o in overrides]
    assert ("top level" in message or "chunking" in message or "not valid YAML" in message
            or "expected section.key=value" in message
            or any(p and (p in message or repr(p)[1:-1] in message) for p in named)), message


def _round_trip(config):
    """The resolved config re-validates from its own YAML to an equal config."""
    again = resolve(yaml.safe_load(config.to_yaml()), source="round trip")
    assert again == config and again.to_yaml() == config.to_yaml()
    for path, key in LEAVES.items():
        section, *rest = path.split(".")
        value = config[section]
        for name in rest:
            value = value[name]
        if isinstance(value, float):
            assert math.isfinite(value), (path, value)


@FUZZ
@given(doc=documents())
def test_fuzz_resolve(doc):
    try:
        config = resolve(doc, source="fuzz.yaml")
    except ConfigError as exc:
        _check_refusal(exc, doc)
        assert "fuzz.yaml" in str(exc)
        return
    _round_trip(config)


@FUZZ
@given(key=st.one_of(st.sampled_from(sorted(LEAVES) + SECTIONS), st.text(max_size=20)),
       value=st.one_of(st.text(max_size=30), values.map(lambda v: yaml.safe_dump(v, default_flow_style=True).strip())),
       sep=st.sampled_from(["=", "= ", "==", ""]))
@example(key="chunking.objects_per_chunk", value="null", sep="=")     # a cross-key check refuses it
def test_fuzz_overrides(key, value, sep):
    override = f"{key}{sep}{value}"
    try:
        config = resolve(None, [override])
    except ConfigError as exc:      # names the override, or (a check across keys) the key itself
        assert "override" in str(exc) or key.rpartition(".")[2] in str(exc), str(exc)
        _check_refusal(exc, {}, [override])
        return
    _round_trip(config)


@pytest.fixture(scope="module")
def yaml_dir(request, tmp_path_factory):
    return scratch_dir(request, tmp_path_factory, "fuzz_yaml")


@FUZZ
@given(doc=documents(), text=st.one_of(st.none(), st.text(max_size=200),
                                       st.sampled_from(["run: {seed: 2001-02-30}", "a: &x [*x]", "[" * 500,
                                                        "fit:\n  gain: !!python/object:os.system x",
                                                        "run:\n\tname: x", "--- a\n--- b", "\x00", "\ufeffrun: {}"])))
def test_fuzz_load_config(yaml_dir, doc, text):
    """YAML files (dumped documents, or any text) through `load_config`."""
    path = yaml_dir / "run.yaml"
    if text is None:
        try:
            text = yaml.safe_dump(doc, allow_unicode=True)
        except (yaml.YAMLError, ValueError, RecursionError):
            return
    path.write_text(text, encoding="utf-8")
    try:
        config = load_config(path)
    except ConfigError as exc:
        assert str(path) in str(exc), str(exc)
        return
    _round_trip(config)


@pytest.mark.parametrize("text", ["run: {seed: 2001-02-30}", "fit: {zero_point: .nan}", "fit: {gain: .inf}",
                                  "resources: {fit: {mem_gb: 1e400}}", "prep: {filters: [[A, 1, 1e999]]}",
                                  "run: {seed: 1" + "0" * 400 + "}", "fit: {zero_point: 1" + "0" * 400 + "}"])
def test_found_by_fuzzing(tmp_path, text):
    """Inputs that crashed or slipped through before: refused with the key named."""
    path = tmp_path / "run.yaml"
    path.write_text(text)
    key = {"run: {seed: 2001": "run.seed", "fit: {zero_point": "fit.zero_point", "fit: {gain": "fit.gain",
           "resources": "resources.fit.mem_gb", "prep": "prep.filters"}
    try:
        config = load_config(path)
    except ConfigError as exc:
        assert str(path) in str(exc)
        assert any(v in str(exc) for k, v in key.items() if text.startswith(k)) or "line 1" in str(exc), str(exc)
    else:
        assert text.startswith("run: {seed: 1"), config      # a huge but valid integer seed
        _round_trip(config)


@pytest.mark.parametrize("doc, key", [({"run": {"name": "abc\n"}}, "run.name"),
                                      ({"resources": {"fit": {"walltime": "01:00:00\n"}}}, "resources.fit.walltime")])
def test_trailing_newline_is_not_a_name(doc, key):
    """The name and walltime patterns match the whole value (``$`` let a final newline through)."""
    with pytest.raises(ConfigError, match=key):
        resolve(doc)
