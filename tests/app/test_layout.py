"""The map of docs/ARCHITECTURE.md, checked on the code's own imports: rooms import only what the
table allows, no circle, no module over 400 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ROOMS = ("app", "common", "monitor", "ops")
MAX_LINES = 400


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {
    module_name(p): p
    for room in ROOMS
    for p in sorted((REPO / room).rglob("*.py"))
    if "__pycache__" not in p.parts
}


def _type_checking_only(node: ast.AST, parents: dict) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def imports_of(name: str) -> set[str]:
    """First-party modules `name` imports, anywhere in the file (a lazy import is still a
    dependency), except under `if TYPE_CHECKING:`."""
    tree = ast.parse(MODULES[name].read_text())
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    package = name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if _type_checking_only(node, parents):
            continue
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + [base]
                ).strip(".")
            targets = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names
            ]
        else:
            continue
        found.update(t for t in targets if t.split(".")[0] in ROOMS and t in MODULES)
    return found


GRAPH = {name: imports_of(name) for name in MODULES}


def in_room(name: str, room: str) -> bool:
    return name == room or name.startswith(room + ".")


def test_the_map_sees_every_room():
    assert {"app.runtime.engine", "app.web.api", "monitor.core", "common.polling", "ops.lab.bench"} <= set(
        MODULES
    )
    assert "app.runtime.engine" in GRAPH["app.runtime"]  # (the graph follows imports at all)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_module_is_over_400_lines(name):
    lines = len(MODULES[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{MODULES[name].relative_to(REPO)}: {lines} lines; split it by responsibility"


def test_no_import_circle():
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(name: str) -> None:
        state[name] = "open"
        stack.append(name)
        for dep in sorted(GRAPH[name]):
            if state.get(dep) == "open":
                cycle = stack[stack.index(dep) :] + [dep]
                raise AssertionError("import circle: " + " → ".join(cycle))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[name] = "done"

    for name in sorted(GRAPH):
        if name not in state:
            visit(name)


def offenders(rule) -> list[str]:
    return [f"{a} imports {b}" for a, deps in sorted(GRAPH.items()) for b in sorted(deps) if rule(a, b)]


def test_common_imports_no_other_room():
    assert offenders(lambda a, b: in_room(a, "common") and not in_room(b, "common")) == []


def test_the_monitor_never_imports_the_app():
    assert offenders(lambda a, b: in_room(a, "monitor") and in_room(b, "app")) == []


def test_the_runtime_never_imports_the_web_side():
    assert offenders(lambda a, b: in_room(a, "app.runtime") and in_room(b, "app.web")) == []


def test_the_web_side_uses_only_the_runtime_surface():
    assert (
        offenders(lambda a, b: in_room(a, "app.web") and in_room(b, "app.runtime") and b != "app.runtime")
        == []
    )


def test_the_processes_import_no_operator_tools():
    assert offenders(lambda a, b: not in_room(a, "ops") and in_room(b, "ops")) == []
