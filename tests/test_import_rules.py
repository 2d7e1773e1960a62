"""The import rule: a service imports no other service, nor do its tests; the libraries import none.

Services talk over NATS with the contract models of ``flowmesh.contracts``; importing another
service's code would couple their releases and hide a dependency the wire does not show. Tests that
need two services live in the top-level ``tests/``. The rule follows imports transitively through
the libraries, the tools and the shared test helpers (``tests/stack.py``, ``tests/upstream.py``), so
a helper that imports a service cannot smuggle it in.

Imports are read from the source (every ``import`` statement, including those inside functions and
``TYPE_CHECKING`` blocks), nothing is executed.
"""

from __future__ import annotations

import ast
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SERVICES = sorted(p.name for p in (ROOT / "services").iterdir() if (p / "src" / "flowmesh" / p.name).is_dir())
TOOLS = sorted(p.name for p in (ROOT / "tools").iterdir() if (p / "src" / "flowmesh" / p.name).is_dir())


def _module_index() -> dict[str, Path]:
    """Module name -> source file, for every first-party module a test or a service can import."""
    index: dict[str, Path] = {}
    for src in sorted(ROOT.glob("*/*/src")):
        for path in src.rglob("*.py"):
            parts = path.relative_to(src).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            index[name] = path
    for helper in sorted((ROOT / "tests").glob("*.py")):  # on the tests' pythonpath: ``from stack import ...``
        index.setdefault(helper.stem, helper)
    return index


INDEX = _module_index()


def owner(module: str) -> str | None:
    """The service or tool a module belongs to (``flowmesh.flows.repo`` -> ``flows``), else None."""
    parts = module.split(".")
    if len(parts) >= 2 and parts[0] == "flowmesh" and parts[1] in (*SERVICES, *TOOLS):
        return parts[1]
    return None


def _package_of(path: Path) -> str | None:
    for name, found in INDEX.items():
        if found == path:
            return name if path.name == "__init__.py" else name.rpartition(".")[0]
    return None


def imported_modules(source: str, path: Path | None = None) -> set[str]:
    """The first-party modules a source imports (``from a import b`` is ``a.b`` when that is a module)."""
    found: set[str] = set()
    for stmt in ast.walk(ast.parse(source)):
        if isinstance(stmt, ast.Import):
            found.update(alias.name for alias in stmt.names)
        elif isinstance(stmt, ast.ImportFrom):
            base = stmt.module or ""
            if stmt.level and path is not None:
                package = (_package_of(path) or "").split(".")
                base = ".".join([*package[: len(package) - stmt.level + 1], *([base] if base else [])])
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in stmt.names if f"{base}.{alias.name}" in INDEX)
    return {m for m in found if m in INDEX or owner(m) is not None}


@dataclass(frozen=True)
class Violation:
    """``importer`` reaches ``module`` of another service through ``chain``."""

    importer: Path
    module: str
    chain: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.importer.relative_to(ROOT)} imports {self.module} (via {' -> '.join(self.chain)})"


def reached(path: Path) -> Iterator[tuple[str, tuple[str, ...]]]:
    """Every first-party module ``path`` imports, directly or not, with the chain that leads there."""
    seen: set[str] = set()
    queue = deque((m, (m,)) for m in sorted(imported_modules(path.read_text(), path)))
    while queue:
        module, chain = queue.popleft()
        if module in seen:
            continue
        seen.add(module)
        yield module, chain
        target = INDEX.get(module)
        if target is not None:
            queue.extend((m, (*chain, m)) for m in sorted(imported_modules(target.read_text(), target)))


def violations(path: Path, forbidden: set[str]) -> list[Violation]:
    """Imports of ``path`` that reach a ``forbidden`` service or tool: the shortest chain to each."""
    first: dict[str, Violation] = {}
    for module, chain in reached(path):  # breadth first: the shortest chain comes first
        who = owner(module)
        if who in forbidden and who not in first:
            first[who] = Violation(path, module, chain)
    return list(first.values())


def _files(*patterns: str) -> list[Path]:
    return sorted(p for pattern in patterns for p in ROOT.glob(pattern))


@pytest.mark.parametrize("service", SERVICES)
def test_a_service_and_its_tests_import_no_other_service(service: str) -> None:
    files = _files(f"services/{service}/src/**/*.py", f"services/{service}/tests/**/*.py")
    assert files
    others = set(SERVICES) - {service}
    found = [str(v) for f in files for v in violations(f, others)]
    assert found == [], "\n".join(found)


def test_the_libraries_import_no_service_and_no_tool() -> None:
    files = _files("libs/*/src/**/*.py", "libs/*/tests/**/*.py")
    found = [str(v) for f in files for v in violations(f, {*SERVICES, *TOOLS})]
    assert found == [], "\n".join(found)


def test_the_rule_sees_direct_relative_and_indirect_imports(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert {"flowmesh.flows.app", "flowmesh.runtime.rpc"} <= imported_modules(
        "import flowmesh.runtime.rpc\ndef f():\n    from flowmesh.flows.app import create_app\n"
    )
    assert "flowmesh.flows" in imported_modules("from flowmesh import flows\n")
    relative = ROOT / "services/runner/src/flowmesh/runner/app.py"
    assert "flowmesh.runner.executor" in imported_modules("from .executor import Executor\n", relative)
    # a shared helper importing a service smuggles it into every test that imports the helper
    helper = tmp_path / "helper_x.py"
    helper.write_text("from flowmesh.runner.app import create_app\n")
    monkeypatch.setitem(INDEX, "helper_x", helper)
    test = tmp_path / "test_x.py"
    test.write_text("import helper_x\n")
    [found] = violations(test, {"runner"})
    assert found.module == "flowmesh.runner.app" and found.chain == ("helper_x", "flowmesh.runner.app")
    assert violations(test, {"flows"}) == []
