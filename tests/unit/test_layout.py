"""The package's shape, checked: no import cycle among zeroloss's modules, no module importing
another's private name, and no client library loaded by ``import zeroloss`` (test_public_api)."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "zeroloss"


def _modules() -> dict[str, Path]:
    out = {}
    for path in SRC.rglob("*.py"):
        parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _imports(mods: dict[str, Path]) -> tuple[dict[str, set[str]], list[str]]:
    """Module → the zeroloss modules it imports (anywhere in it, TYPE_CHECKING included), and
    the imports of a private name of another module."""
    edges: dict[str, set[str]] = {m: set() for m in mods}
    private: list[str] = []
    for mod, path in mods.items():
        targets: list[tuple[str, str | None]]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [(a.name, None) for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [(node.module, a.name) for a in node.names]
            else:
                continue
            for name, attr in targets:
                target = f"{name}.{attr}" if attr and f"{name}.{attr}" in mods else name
                while target and target not in mods:
                    target = target.rpartition(".")[0]
                if not target or target == mod or not target.startswith("zeroloss"):
                    continue
                edges[mod].add(target)
                if attr and attr.startswith("_") and not attr.startswith("__") and f"{name}.{attr}" not in mods:
                    private.append(f"{mod} imports {name}.{attr}")
    return edges, private


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in edges:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles_and_no_private_imports_across_modules() -> None:
    mods = _modules()
    assert "zeroloss.consumer.runtime" in mods and "zeroloss.relay" in mods  # the walk found the package
    edges, private = _imports(mods)
    assert _cycles(edges) == []
    assert private == []


def test_the_check_finds_a_cycle_when_there_is_one() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
