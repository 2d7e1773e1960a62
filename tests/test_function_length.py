"""No function or method over 60 lines outside tests and migrations.

A function that long does several things; naming its parts is what lets a newcomer read it. The
count is of source lines from ``def`` to the last line of the body, decorators excluded.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIMIT = 60
CHECKED = ("libs", "services", "tools", "bench")


def _long_functions(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    return [
        f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno is not None
        and node.end_lineno - node.lineno + 1 > LIMIT
    ]


def test_no_function_is_over_sixty_lines() -> None:
    sources = [
        path
        for top in CHECKED
        for path in sorted((ROOT / top).rglob("*.py"))
        if not {"tests", "migrations", ".venv"} & set(path.relative_to(ROOT).parts)
    ]
    assert len(sources) > 50, "the sources were not found"
    found = [line for path in sources for line in _long_functions(path)]
    assert not found, "name the parts of these functions:\n" + "\n".join(found)
