"""The package's layers, read from the source (every import, at top level or inside a
function): model/ imports neither pipeline/ nor service/, pipeline/ neither service/ nor
model/, and no module imports one that imports it back, however far round.

A function-level import still runs the other module, so it counts: that is how a cycle
hides until the day the order of first use changes."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# setup.cfg's package_dir: the three code folders install under the root package.
FOLDERS = {"alexnetd": "alexnetd", "pipeline": "alexnetd.pipeline", "model": "alexnetd.model",
           "service": "alexnetd.service"}
FORBIDDEN = {"alexnetd.model": ("alexnetd.pipeline", "alexnetd.service"),
             "alexnetd.pipeline": ("alexnetd.service", "alexnetd.model")}


def _modules() -> dict[str, Path]:
    out = {}
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).glob("*.py")):
            out[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> list[tuple[str, int]]:
    """(module imported, line) for every import statement in the file, wherever it stands."""
    package = name if path.stem == "__init__" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            # `from pkg import mod` imports the submodule; `from mod import name` the module.
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append((sub if sub in MODULES else base, node.lineno))
    return found


def _graph() -> dict[str, dict[str, int]]:
    """module -> {package module it imports: first line}."""
    graph = {}
    for name, path in MODULES.items():
        edges = {}
        for target, line in _imports(name, path):
            if target in MODULES and target != name:
                edges.setdefault(target, line)
        graph[name] = edges
    return graph


def _layer(module: str) -> str:
    return next((p for p in FORBIDDEN if module == p or module.startswith(p + ".")), "")


def test_the_modules_are_found():
    assert {"alexnetd.pipeline.wire", "alexnetd.model.checkpoint", "alexnetd.service.cli"} <= set(MODULES)


def test_lower_layers_do_not_import_upper_ones():
    crossings = []
    for name, path in MODULES.items():
        layer = _layer(name)
        if not layer:
            continue
        for target, line in sorted(set(_imports(name, path)), key=lambda t: t[1]):
            if any(target == f or target.startswith(f + ".") for f in FORBIDDEN[layer]):
                crossings.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
    assert not crossings, "\n".join(crossings)


def _cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

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
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_import_graph_has_no_cycle():
    graph = _graph()
    described = []
    for component in _cycles(graph):
        members = set(component)
        edges = [f"  {MODULES[a].relative_to(ROOT)}:{line} imports {b}"
                 for a in component for b, line in sorted(graph[a].items()) if b in members]
        described.append(" <-> ".join(component) + "\n" + "\n".join(edges))
    assert not described, "import cycles:\n" + "\n".join(described)


def test_the_cycle_finder_sees_a_cycle():
    assert _cycles({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}, "d": {"a": 1}}) == [["a", "b", "c"]]
