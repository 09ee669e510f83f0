"""The import graph of src/mmfusion has no cycle, and no module reaches into another package's `_private` names.

Imports inside functions count: a lazy import that only hides a cycle is still a cycle (it runs, later).
Imports under `if TYPE_CHECKING:` do not: they never run.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

SRC = REPO / "src"
ROOT = SRC / "mmfusion"


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES: dict[str, Path] = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def package_of(name: str) -> str:
    """The package a module belongs to: itself for a package's __init__, else its parent."""
    return name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_nodes(tree: ast.AST):
    """Every node of `tree` except those under `if TYPE_CHECKING:`."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        if isinstance(node, ast.If) and _is_type_checking(node):
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))


def imports_of(name: str) -> list[tuple[str, list[str], int]]:
    """(imported mmfusion module, names taken from it, line) for every import the module runs."""
    return imports_in(MODULES[name], package_of(name))


def imports_in(path: Path, package: str) -> list[tuple[str, list[str], int]]:
    """(imported mmfusion module, names taken from it, line) for every import the file at `path` runs."""
    found = []
    for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, [], node.lineno) for alias in node.names if alias.name.split(".")[0] == "mmfusion"]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from .x import y
                parent = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(parent + ([base] if base else []))
            if base.split(".")[0] != "mmfusion":
                continue
            names = []
            for alias in node.names:
                if f"{base}.{alias.name}" in MODULES:  # from pkg import submodule
                    found.append((f"{base}.{alias.name}", [], node.lineno))
                else:
                    names.append(alias.name)
            if names:
                found.append((base, names, node.lineno))
    return found


def import_graph() -> dict[str, dict[str, int]]:
    """{module: {imported module: first line}} over src/mmfusion (imports of unknown modules are dropped)."""
    graph: dict[str, dict[str, int]] = {}
    for name in MODULES:
        edges: dict[str, int] = {}
        for target, _, line in imports_of(name):
            if target in MODULES and target != name:
                edges.setdefault(target, line)
        graph[name] = edges
    return graph


def find_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one module (Tarjan), as a closed path."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                components.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_cycle_in(graph, set(comp)) for comp in components]


def _cycle_in(graph: dict[str, dict[str, int]], comp: set[str]) -> list[str]:
    """A shortest closed path through the component's first module (breadth-first back to itself)."""
    start = min(comp)
    paths = {start: [start]}
    todo = [start]
    while todo:
        v = todo.pop(0)
        for w in sorted(graph[v]):
            if w == start:
                return paths[v] + [start]
            if w in comp and w not in paths:
                paths[w] = paths[v] + [w]
                todo.append(w)
    raise AssertionError(f"no cycle through {start}")  # unreachable for a strongly connected component


def describe(graph: dict[str, dict[str, int]], cycle: list[str]) -> str:
    return " -> ".join(f"{a} (line {graph[a][b]})" for a, b in zip(cycle, cycle[1:])) + f" -> {cycle[-1]}"


def test_graph_sees_function_level_and_from_package_imports():
    graph = import_graph()
    assert "mmfusion.fusion.heads" in graph["mmfusion.fusion"]  # `from mmfusion.fusion import heads as _heads`
    assert "mmfusion.inference.predictor" in graph["mmfusion.monitoring.reference"]  # inside build_reference()
    assert "mmfusion.encoders.base" not in graph["mmfusion.encoders.runtime"]  # only under `if TYPE_CHECKING:`
    cyclic = {"a": {"b": 1}, "b": {"c": 2}, "c": {"a": 3}, "d": {"a": 4}}
    assert find_cycles(cyclic) == [["a", "b", "c", "a"]]


def test_no_import_cycles():
    graph = import_graph()
    cycles = find_cycles(graph)
    assert not cycles, "import cycles in src/mmfusion:\n" + "\n".join(describe(graph, c) for c in cycles)


def layer_of(name: str) -> str:
    """The part of mmfusion a module belongs to: `mmfusion.<package>` or a top-level module like `mmfusion.paths`."""
    return ".".join(name.split(".")[:2])


def layer_graph(graph: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    """The import graph between mmfusion's packages and top-level modules, with the first importing module's line."""
    layers: dict[str, dict[str, int]] = {layer_of(m): {} for m in graph}
    for a, edges in graph.items():
        for b, line in edges.items():
            if layer_of(a) != layer_of(b):
                layers[layer_of(a)].setdefault(layer_of(b), line)
    return layers


def test_no_import_cycles_between_packages():
    """Packages are layers: `monitoring` may import `inference`, never the other way round as well."""
    graph = import_graph()
    layers = layer_graph(graph)
    cycles = find_cycles(layers)
    lines = []
    for cycle in cycles:
        steps = []
        for a, b in zip(cycle, cycle[1:]):
            who = sorted(
                f"{m} (line {e[t]})" for m, e in graph.items() if layer_of(m) == a for t in e if layer_of(t) == b
            )
            steps.append(f"{a} -> {b} via {', '.join(who)}")
        lines.append(" ; ".join(steps))
    assert not cycles, "import cycles between mmfusion packages:\n" + "\n".join(lines)


def test_only_the_service_imports_serving():
    """mmfusion.serving is the top layer (the Bento service and its promotion CLI): stages, monitoring and
    the inference package never import it, so a stage never loads the service's code."""
    graph = import_graph()
    bad = sorted(
        f"{a} (line {line}) imports {b}"
        for a, edges in graph.items()
        if layer_of(a) != "mmfusion.serving"
        for b, line in edges.items()
        if layer_of(b) == "mmfusion.serving"
    )
    assert not bad, "modules outside mmfusion.serving import it:\n" + "\n".join(bad)


def test_no_private_names_imported_across_packages():
    """`from mmfusion.a.b import _x` is fine inside package mmfusion.a, never from another package (nor from flows/)."""
    files = [(path, package_of(name)) for name, path in MODULES.items()]
    files += [(path, "flows") for path in sorted((REPO / "flows").glob("*.py"))]
    bad = []
    for path, package in files:
        for target, names, line in imports_in(path, package):
            if target not in MODULES:
                continue
            where = f"{path.relative_to(REPO)}:{line}"
            for imported in names:
                if _private(imported) and package_of(target) != package:
                    bad.append(f"{where}: from {target} import {imported}")
            if _private(target.rpartition(".")[2]) and package_of(target) != package:
                bad.append(f"{where}: import {target}")
    assert not bad, "private names imported from another package:\n" + "\n".join(bad)


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")
