"""The gateway's modules import one another without a cycle, and each can be the first one imported.

A cycle (it was app → routes/docs → openapi → app) works only while modules are imported in a
lucky order; a newcomer's new import, or a tool importing one module alone, then meets a partly
initialised module. Both the static graph and real first imports are checked.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "flowmesh.gateway"


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted((SRC / "flowmesh" / "gateway").rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The gateway modules ``name`` imports anywhere in its body (function-level imports count too)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            targets.add(base)
            targets.update(f"{base}.{alias.name}" for alias in node.names)
    return {t for t in targets if t in modules and t != name and t != PACKAGE}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle in ``graph``, as the list of modules around it, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)) is not None:
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)) is not None:
            return found
    return None


def test_the_gateway_modules_import_one_another_without_a_cycle() -> None:
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    assert "flowmesh.gateway.routes.docs" in graph["flowmesh.gateway.app"]  # the walk sees imports
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " → ".join(cycle or ())


def test_a_cycle_is_found_when_there_is_one() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_every_gateway_module_can_be_imported_first() -> None:
    """Each module imported alone in a fresh interpreter (a few at a time: the machine is shared)."""
    names = [n for n in _modules() if not n.endswith(".__main__")]
    failed: list[str] = []
    for batch in (names[i : i + 4] for i in range(0, len(names), 4)):
        started = [
            (name, subprocess.Popen([sys.executable, "-c", f"import {name}"], stderr=subprocess.PIPE, text=True))
            for name in batch
        ]
        for name, process in started:
            _, err = process.communicate(timeout=120)
            if process.returncode != 0:
                failed.append(f"{name}: {err.strip().splitlines()[-1] if err.strip() else process.returncode}")
    assert not failed, "modules that cannot be imported first:\n" + "\n".join(failed)
