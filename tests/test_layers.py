"""The layering contract: data flows one way, and no module imports one above it (not even in a function).

    x86 -> machine -> linux -> hypervisor -> experiment -> hw -> inspect/analysis -> bench -> report -> cli

``artifacts``, ``census``, ``debian``, ``rootfs`` and ``guests`` (the registries
of runnable things) sit beside ``linux``: they know files and packages, never
the machine. Every ``import`` and ``from ... import`` in the package is read
from the source (module level, inside functions, under TYPE_CHECKING alike).
"""

from __future__ import annotations

import ast
import collections
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "tlslab"

LAYERS = {
    "x86": 0, "machine": 1, "linux": 2,
    "artifacts": 2, "census": 2, "debian": 2, "rootfs": 2, "guests": 2,
    "hypervisor": 3, "experiment": 4, "record": 4, "hw": 5, "inspect": 6, "analysis": 6,
    "bench": 7, "report": 8, "cli": 9, "__main__": 10, "__init__": 0,
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _graph() -> dict[str, set[tuple[str, int]]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[tuple[str, int]]] = collections.defaultdict(set)
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                           for a in node.names]
            for target in targets:
                if target.startswith("tlslab.") and target in modules:
                    graph[name].add((target, node.lineno))
    return graph


def _layer(module: str) -> int:
    parts = module.split(".")
    key = parts[1] if len(parts) > 1 else "__init__"
    if key not in LAYERS:
        pytest.fail(f"{module}: not assigned to a layer in tests/test_layers.py")
    return LAYERS[key]


def test_no_module_imports_a_higher_layer():
    upward = [f"{m}:{line} imports {t} (layer {_layer(t)} > {_layer(m)})"
              for m, edges in _graph().items() for t, line in sorted(edges) if _layer(t) > _layer(m)]
    assert not upward, "\n".join(upward)


def test_no_import_cycles():
    graph = {m: {t for t, _ in edges} for m, edges in _graph().items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in list(graph):
        if v not in index:
            visit(v)
    assert not cycles, cycles


def test_the_contract_can_fail(tmp_path, monkeypatch):
    """The checker sees a function-level upward import (so a green run means something)."""
    fake = tmp_path / "tlslab"
    (fake / "x86").mkdir(parents=True)
    (fake / "cli").mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "x86" / "__init__.py").write_text("")
    (fake / "cli" / "__init__.py").write_text("")
    (fake / "x86" / "bad.py").write_text("def f():\n    from tlslab.cli import thing\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", fake)
    with pytest.raises(AssertionError, match="tlslab.x86.bad:2 imports tlslab.cli"):
        test_no_module_imports_a_higher_layer()
