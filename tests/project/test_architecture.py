"""The layout's rules, checked on the source: no import circles, nobody reads or writes
another object's private names, and engines and hosts meet only through the Session."""

from __future__ import annotations

import ast
from pathlib import Path

from support.paths import REPO

SRC = REPO / "src"
PACKAGE = SRC / "wsguard"


def modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def imported(name: str, path: Path, known: set[str]) -> set[str]:
    """Every wsguard module *name* imports, at module level or inside a function
    (TYPE_CHECKING-only imports excluded: they never run)."""
    tree = ast.parse(path.read_text())
    typing_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            typing_only.update(id(child) for child in ast.walk(node))
    out: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            base = node.module
            if node.level:
                package = (
                    name.split(".")[: -node.level]
                    if not path.name.startswith("__init__")
                    else name.split(".")
                )
                base = ".".join([*package, node.module])
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        for target in targets:
            if target in known and target != name:
                out.add(target)
    return out


def test_the_import_graph_has_no_circle() -> None:
    found = modules()
    known = set(found)
    graph = {name: imported(name, path, known) for name, path in found.items()}
    # a package's __init__ importing its own submodules is not a circle of the design
    for name in graph:
        graph[name] = {t for t in graph[name] if not t.startswith(name + ".")}
    circles: list[list[str]] = []
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                circles.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    assert circles == [], "import circles: " + "; ".join(" -> ".join(c) for c in circles)


def test_no_module_touches_another_objects_private_names() -> None:
    offenders: list[str] = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Attribute):
                continue
            attr = node.attr
            if not attr.startswith("_") or attr.startswith("__"):
                continue
            owner = node.value
            if isinstance(owner, ast.Name) and owner.id in ("self", "cls"):
                continue
            if attr == "_replace":  # namedtuple's public API
                continue
            offenders.append(f"{name}:{node.lineno} .{attr}")
    assert offenders == []


def test_engines_and_hosts_meet_only_through_the_session() -> None:
    found = modules()
    known = set(found)
    engines = {n for n in known if n.startswith("wsguard.engines") or "_server" in n}
    hosts = {"wsguard.hosts.app", "wsguard.asgi", "wsguard.hosts.gateway.proxy"} & known
    for engine in engines:
        assert not (imported(engine, found[engine], known) & hosts), engine
