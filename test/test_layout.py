"""The code's shape: imports go one way, from commands down to drivers, with no circles."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "runtime_manager"
# One layer per folder (or top-level module), from the ground up. Lower layers
# never import higher ones; a module may import its own layer.
LAYERS = [
    {"logs", "sd_notify", "hangup"},
    {"core"},  # request, result, errors, flows, topics, events, the lifecycle
    {"config"},
    {"http", "mqtt"},  # the node's one HTTP client, its MQTT links
    {"wasm"},
    {"cli"},  # what every command shares (arguments, loading the configuration)
    {"drivers", "tracing"},  # step drivers; spans and their export
    {"cluster"},
    {"program"},  # running one flow's steps
    {"engine"},
    {"entrypoints", "orchestrator"},
    {"observe", "reload"},
    {"node"},
    {"process", "supervisor", "tools", "reload_command", "fleet"},
    {"__main__", "rm_mqtt", "rm_api"},
]
FOLDERS = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}


def _name(path: Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """The package's modules that `path` imports (relative or absolute)."""
    me = _name(path).split(".") if _name(path) else []
    package = me if path.name == "__init__.py" else me[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = [*base, *(node.module.split(".") if node.module else [])]
            elif node.module and node.module.startswith("runtime_manager"):
                target = node.module.split(".")[1:]
            else:
                continue
            for alias in node.names:  # `from . import x` may name a module
                candidate = ".".join([*target, alias.name])
                found.add(candidate if candidate in MODULES else ".".join(target))
    return {m for m in found if m in MODULES}


MODULES = {_name(p) for p in PACKAGE.rglob("*.py") if _name(p) and not _name(p).endswith("__init__")}
MODULES |= {_name(p) for p in PACKAGE.rglob("__init__.py") if _name(p)}


def _layer(module: str) -> int | None:
    """A module's layer: its folder's, or its own when it is a top-level module."""
    top = module.split(".")[0]
    return next((i for i, layer in enumerate(LAYERS) if top in layer), None)


def test_every_module_has_a_layer():
    assert sorted(m for m in MODULES if _layer(m) is None) == []


def test_layers_are_folders():
    """Each layer names folders and top-level modules only, and each folder is in one layer."""
    tops = {m.split(".")[0] for m in MODULES}
    named = [name for layer in LAYERS for name in layer]
    assert sorted(set(named) - tops) == [] and len(named) == len(set(named))
    assert FOLDERS <= set(named)


def test_imports_go_one_way():
    wrong = []
    for path in PACKAGE.rglob("*.py"):
        me = _name(path)
        if _layer(me) is None:
            continue
        for other in _imports(path):
            if _layer(other) is not None and _layer(other) > _layer(me):  # type: ignore[operator]
                wrong.append(f"{me} imports {other}")
    assert wrong == []


def test_no_import_circles():
    graph = {_name(p): _imports(p) for p in PACKAGE.rglob("*.py") if _name(p)}
    state: dict[str, int] = {}
    circles: list[str] = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for n in graph.get(m, ()):
            if state.get(n) == 1:
                circles.append(" -> ".join([*stack[stack.index(n):], n]) if n in stack else f"{m} -> {n}")
            elif n not in state:
                visit(n, [*stack, n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert circles == []
