"""The import graph of dre_hpc/batch/: one-way (no cycle, function-level imports included), and no
module imports another's private names."""

from __future__ import annotations

import ast
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

import pytest

import dre_hpc

PACKAGE = Path(dre_hpc.__file__).parent
BATCH = PACKAGE / "batch"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, known: set) -> list:
    """``[(target module, imported name or None, line)]`` of every import in `path` (at any depth),
    relative ones resolved; a ``from X import name`` naming a module of `known` targets it."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(alias.name, None, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            target = (f"{base}.{node.module}" if node.module else base) if node.level else node.module
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.append((sub, None, node.lineno) if sub in known else (target, alias.name, node.lineno))
    return found


def batch_graph() -> dict:
    files = sorted(BATCH.rglob("*.py"))
    known = {module_name(f) for f in files}
    graph = {}
    for path in files:
        graph[module_name(path)] = {target for target, _, _ in imports(path, known)
                                    if target in known and target != module_name(path)}
    return graph


def find_cycle(graph: dict):
    try:
        tuple(TopologicalSorter(graph).static_order())
    except CycleError as exc:
        return exc.args[1]
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) is not None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_relative_imports_resolve_to_batch_modules():
    graph = batch_graph()
    assert "dre_hpc.batch.submit" in graph["dre_hpc.batch.run"]
    assert "dre_hpc.batch.environment" in graph["dre_hpc.batch.schedulers.local"]    # from .. import
    assert "dre_hpc.batch.submit" in graph["dre_hpc.batch.worker"]


def test_batch_imports_have_no_cycle():
    cycle = find_cycle(batch_graph())
    assert cycle is None, "import cycle in dre_hpc/batch: " + " -> ".join(cycle or ())


def test_submission_is_one_way():
    """`submit` (lock, submission, record) depends on none of the modules that use it."""
    graph = batch_graph()
    users = {f"dre_hpc.batch.{m}" for m in ("run", "local_run", "retry", "status", "worker")}
    assert not graph["dre_hpc.batch.submit"] & users
    for user in ("run", "local_run", "retry"):
        assert "dre_hpc.batch.submit" in graph[f"dre_hpc.batch.{user}"], user


@pytest.mark.parametrize("path", sorted(BATCH.rglob("*.py")), ids=lambda p: str(p.relative_to(BATCH)))
def test_no_private_name_is_imported_across_modules(path):
    known = {module_name(f) for f in PACKAGE.rglob("*.py")}
    private = [f"{target}.{name} (line {line})" for target, name, line in imports(path, known)
               if name and name.startswith("_") and not name.startswith("__") and target.startswith("dre_hpc")]
    assert not private, f"{path} imports private names: {', '.join(private)}"
