"""The import graph of the two packages runs one way and has no cycles.

``pkictl`` (``ca/``) is the CA library and the shared core; ``pki_agent`` (``agent/``) builds on
it. Read from the source tree, every import counts: at the top, inside a function (a lazy import
hides a cycle, it does not remove it) and under ``TYPE_CHECKING`` (a type-only cycle is still two
modules that cannot be read apart).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"pkictl": ROOT / "ca", "pki_agent": ROOT / "agent"}


def _modules() -> dict[str, Path]:
    """Every module of both packages by dotted name (a package by its ``__init__``)."""
    found = {}
    for package, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


def _resolve(module: str, path: Path, node: ast.ImportFrom) -> str:
    """The absolute name an ``from ... import`` names, relative levels resolved."""
    if not node.level:
        return node.module or ""
    base = module.split(".")
    if path.name != "__init__.py":
        base.pop()  # a module's level 1 is its package
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Edges module -> modules of the two packages it imports, by any kind of import."""
    graph: dict[str, set[str]] = {name: set() for name in modules}

    def known(name: str) -> str | None:
        while name and name not in modules:  # "pkictl.est.serve.ESTService" -> the module that defines it
            name = name.rpartition(".")[0]
        return name or None

    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(name, path, node)
                # "from . import x" imports the submodule x when there is one, else a name of the package.
                targets = [f"{base}.{alias.name}" for alias in node.names]
            for target in targets:
                hit = known(target)
                if hit and hit != name:
                    graph[name].add(hit)
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """The groups of more than one module that reach each other (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in sorted(graph.get(node, ())):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return groups


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph(_modules())


def test_the_ca_library_never_imports_the_agent(graph):
    """Nothing in ``pkictl`` imports ``pki_agent``: the agent builds on the CA's shared parts."""
    upward = sorted(f"{a} -> {b}" for a, edges in graph.items() if a.startswith("pkictl")
                    for b in edges if b.startswith("pki_agent"))
    assert upward == []


def test_the_agent_builds_on_the_ca_library(graph):
    """Negative control for the check above: the graph does see cross-package edges."""
    assert any(b.startswith("pkictl") for a, edges in graph.items() if a.startswith("pki_agent") for b in edges)


def test_no_import_cycles(graph):
    """No group of modules imports each other, directly or round a loop, by any kind of import."""
    assert strongly_connected(graph) == []


def test_the_cycle_finder_finds_cycles():
    """Negative control: a loop of three, a pair, and a chain that is not a loop."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"e"}, "e": {"d"}, "f": {"g"}, "g": set()}
    assert sorted(strongly_connected(graph)) == [["a", "b", "c"], ["d", "e"]]


def test_the_graph_sees_every_kind_of_import(tmp_path):
    """A relative, a lazy and a TYPE_CHECKING import each make an edge."""
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from . import b\n")
    (package / "b.py").write_text("def f():\n    from .c import thing\n")
    (package / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.a import x\nthing = 1\n")
    modules = {"pkg": package / "__init__.py", **{f"pkg.{n}": package / f"{n}.py" for n in "abc"}}
    graph = import_graph(modules)
    assert graph["pkg.a"] == {"pkg.b"} and graph["pkg.b"] == {"pkg.c"} and graph["pkg.c"] == {"pkg.a"}
    assert strongly_connected(graph) == [["pkg.a", "pkg.b", "pkg.c"]]
