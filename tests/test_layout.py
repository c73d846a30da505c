"""The package layout is the architecture: these checks keep it so.

Every import statement counts, wherever it is (module level, inside a
function, under ``TYPE_CHECKING``): a circle drawn only for the type checker
is still a circle a reader has to untangle.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _modules() -> dict[str, tuple[Path, bool]]:
    mods = {}
    for path in (ROOT / "hpcflow").rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        mods[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    return mods


def _graph() -> dict[str, set[str]]:
    mods = _modules()

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rsplit(".", 1)[0] if "." in name else ""
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, (path, is_pkg) in mods.items():
        pkg = mod if is_pkg else mod.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)]
                    src = ".".join(base + ([node.module] if node.module else []))
                else:
                    src = node.module or ""
                targets = [src] + [f"{src}.{a.name}" for a in node.names]
            else:
                continue
            for target in targets:
                found = resolve(target) if target.startswith("hpcflow") else None
                if found is not None and found != mod:
                    graph[mod].add(found)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles() -> None:
    assert _cycles(_graph()) == []


def test_rooms_import_only_downwards() -> None:
    """client/ and rpc/ never reach into the daemon; the daemon never into the client;
    nothing but the CLI imports the Node; the planner stays pure."""
    graph = _graph()

    def uses(prefix: str, target: str) -> list[str]:
        return sorted(m for m, deps in graph.items() if m.startswith(prefix)
                      and any(d == target or d.startswith(target + ".") for d in deps))

    assert uses("hpcflow.client", "hpcflow.daemon") == []
    assert uses("hpcflow.rpc", "hpcflow.daemon") == []
    assert uses("hpcflow.rpc", "hpcflow.client") == []
    assert uses("hpcflow.daemon", "hpcflow.client") == []
    assert uses("hpcflow", "hpcflow.daemon.node") == ["hpcflow.cli"]
    decide = {d for m, deps in graph.items() if m.startswith("hpcflow.decide") for d in deps}
    assert all(d.startswith(("hpcflow.decide", "hpcflow.ops", "hpcflow.errors"))
               for d in decide), sorted(decide)
