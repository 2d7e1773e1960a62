"""CEL expressions in flow definitions: where they are, how they compile and render.

Fields that *are* expressions hold bare CEL or one whole ``{{ expr }}``; inside any other string,
``{{ expr }}`` interpolates, and a string that is exactly one ``{{ expr }}`` yields the value itself.
Programs are compiled once (cached by source) and never ``eval``-ed as Python.
"""

from __future__ import annotations

import base64
import importlib.machinery
import importlib.util
import json
import re
import sys
from collections.abc import Iterator, Mapping
from datetime import datetime, timedelta
from functools import lru_cache
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Final

from flowmesh.contracts.expression_cost import COST_LIMIT, Analysis, CostError, analyse, free_names


def _cel_engine() -> ModuleType:
    """The CEL engine, ``cel.cel`` (the package's compiled module), loaded without the package's ``__init__``.

    ``import cel`` also imports the package's command-line interface (typer, rich, prompt_toolkit,
    pygments): 12 MB more in every process that evaluates expressions, for a REPL no service runs.
    The module is registered under its own name, so a later ``import cel`` (a test, a tool) finds it
    rather than initialising the extension a second time, which it refuses.
    """
    loaded = sys.modules.get("cel.cel")
    if loaded is not None:
        return loaded
    package = importlib.util.find_spec("cel")  # finds the package without running its __init__
    if package is None or not package.submodule_search_locations:
        raise ImportError("the CEL engine (common-expression-language) is not installed")
    folder = Path(next(iter(package.submodule_search_locations)))
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        spec = importlib.util.spec_from_file_location("cel.cel", folder / f"cel{suffix}")
        if spec is None or spec.loader is None or not Path(str(spec.origin)).is_file():
            continue
        module = importlib.util.module_from_spec(spec)
        sys.modules["cel.cel"] = module
        spec.loader.exec_module(module)
        return module
    raise ImportError(f"the CEL engine's compiled module is missing from {folder}")


if TYPE_CHECKING:
    import cel.cel as cel
else:
    cel = _cel_engine()

_TEMPLATE: Final = re.compile(r"\{\{(.*?)\}\}", re.S)
_WHOLE: Final = re.compile(r"^\s*\{\{(.*?)\}\}\s*$", re.S)

CONTEXT_NAMES: Final = frozenset({"input", "steps", "run"})
"""Names every expression of a step may use."""
FOREACH_NAMES: Final = frozenset({"item", "index"})
"""Extra names inside a ``foreach`` step's ``input``."""
EVENT_NAMES: Final = frozenset({"event"})
"""Extra names of a ``waitEvent`` ``match`` and of an event trigger's ``filter``."""
SECRETS_NAME: Final = "secrets"
"""The extra name of the templates of ``http`` and ``llm`` steps: ``{{ secrets.NAME }}``, the tenant's secret."""
SECRET_NAMES: Final = frozenset({SECRETS_NAME})
MAX_SOURCE: Final = 10_000
"""Longest expression, in characters (CEL's evaluator recurses: a long enough chain of ``+``
overflows its stack and ends the process)."""
TOO_COSTLY: Final = "too costly: "
"""How the message of an expression refused for its cost begins."""
_ALL_NAMES: Final = CONTEXT_NAMES | FOREACH_NAMES | EVENT_NAMES | SECRET_NAMES


class ExpressionError(ValueError):
    """An expression that does not compile, or failed to evaluate."""

    error_type = "expression"
    """The error type of a step that fails with it."""

    def __init__(self, source: str, message: str) -> None:
        super().__init__(f"expression {source!r}: {message}")
        self.source = source
        self.message = message


class ExpressionTooCostly(ExpressionError):
    """An expression that could cost more than the limit: refused before it runs."""

    error_type = "expression-too-costly"


def expression_source(value: str) -> str:
    """The CEL source of an expression field: bare CEL, or one whole ``{{ expr }}``."""
    whole = _WHOLE.match(value)
    return whole.group(1).strip() if whole else value.strip()


def template_expressions(value: str) -> list[str]:
    """The CEL sources of every ``{{ expr }}`` inside a template string."""
    return [m.group(1).strip() for m in _TEMPLATE.finditer(value)]


def iter_templates(value: Any, path: tuple[str | int, ...] = ()) -> Iterator[tuple[tuple[str | int, ...], str]]:
    """Every ``{{ expr }}`` in a JSON value (nested objects, lists, strings), with its location."""
    if isinstance(value, str):
        for source in template_expressions(value):
            yield path, source
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from iter_templates(item, (*path, str(key)))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from iter_templates(item, (*path, i))


def compile_expression(source: str) -> cel.Program:
    """A compiled CEL program, cached by its source.

    Raises:
        ExpressionError: empty, or does not parse.
        ExpressionTooCostly: too long, nests too deep, or too costly whatever its input.
    """
    return _compiled(source)[0]


@lru_cache(maxsize=4096)
def _compiled(source: str) -> tuple[cel.Program, Analysis]:
    """The program and what is known of its cost, once per source."""
    if not source:
        raise ExpressionError(source, "is empty")
    if len(source) > MAX_SOURCE:
        raise ExpressionTooCostly(
            source[:40] + "…", f"{TOO_COSTLY}is {len(source):,} characters long (at most {MAX_SOURCE:,})"
        )
    try:
        program = cel.compile(source)
    except ValueError as exc:
        # the parser's message spans lines (source and caret); its first line says it all
        first = str(exc).replace(f"Failed to parse expression '{source}': ", "").splitlines()[0]
        raise ExpressionError(source, first.replace("ERROR: <input>:", "at ")) from None
    try:
        return program, analyse(source, _ALL_NAMES)
    except CostError as exc:
        raise ExpressionTooCostly(source, f"{TOO_COSTLY}{exc}") from None


def unknown_names(program: cel.Program, allowed: frozenset[str]) -> list[str]:
    """Top-level names an expression reads that its context will not have (macro variables aside)."""
    tree = _compiled(program.source)[1].tree
    names = program.variables() if tree is None else free_names(tree)
    return sorted(set(names) - allowed)


def check_expression(source: str, allowed: frozenset[str] = CONTEXT_NAMES) -> str | None:
    """Why an expression would fail at compile time (syntax, unknown names, cost), or ``None``.

    A problem of cost starts with ``too costly:``.
    """
    try:
        program = compile_expression(source)
    except ExpressionError as exc:
        return exc.message
    unknown = unknown_names(program, allowed)
    if unknown:
        return f"unknown name {', '.join(map(repr, unknown))} (available: {', '.join(sorted(allowed))})"
    return None


_STEP_REF = re.compile(r"""\bsteps\s*(?:\.\s*([A-Za-z_][A-Za-z0-9_]*)|\[\s*(?:"([^"]*)"|'([^']*)')\s*\])""")
_STEPS_WORD = re.compile(r"\bsteps\b")


@lru_cache(maxsize=4096)
def referenced_steps(source: str) -> frozenset[str] | None:
    """The step ids an expression reads through ``steps.<id>`` or ``steps["<id>"]``.

    ``None`` when it uses ``steps`` any other way (a computed key, ``size(steps)``): it then needs
    them all. Lets the caller hand CEL only what it reads, whatever the size of the run.
    """
    found = {a or b or c for a, b, c in _STEP_REF.findall(source)}
    if len(_STEPS_WORD.findall(source)) != len(_STEP_REF.findall(source)):
        return None
    return frozenset(found)


_SECRET_REF = re.compile(r"(?<![.\w])secrets\s*\.\s*([A-Za-z_][A-Za-z0-9_]*)")
_SECRETS_WORD = re.compile(r"(?<![.\w])secrets\b")


def referenced_secrets(source: str) -> frozenset[str] | None:
    """The secret names an expression reads as ``secrets.NAME``.

    ``None`` when it uses ``secrets`` any other way (``secrets["X"]``, ``size(secrets)``): the runner
    resolves only the secrets a step names, so a step may read them no other way.
    """
    found = _SECRET_REF.findall(source)
    if len(_SECRETS_WORD.findall(source)) != len(found):
        return None
    return frozenset(found)


def to_json(value: Any) -> Any:
    """A CEL result as JSON: timestamps as RFC 3339, durations as seconds, bytes as base64."""
    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_json(v) for v in value]
    if isinstance(value, datetime):
        return value.isoformat().replace("+00:00", "Z")
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    return value


def evaluate(source: str, context: Mapping[str, Any]) -> Any:
    """Evaluate one expression against a context, as JSON.

    Raises:
        ExpressionError: it does not compile, reads a missing field, or fails (type mismatch, …).
        ExpressionTooCostly: it could cost more than the limit, on any input or on this one.
    """
    program, analysis = _compiled(source)
    names = program.variables()
    scope = {name: context[name] for name in names if name in context}
    steps = scope.get("steps")
    if steps is not None:
        wanted = referenced_steps(source)
        if wanted is not None:
            scope["steps"] = {k: steps[k] for k in wanted if k in steps}
    if analysis.checked:
        _within_budget(source, analysis, scope)
    try:
        return to_json(program.execute(scope))
    except KeyError as exc:
        raise ExpressionError(source, f"no such field {exc.args[0]!r} (use has() to test presence)") from None
    except Exception as exc:
        raise ExpressionError(source, str(exc)) from None


def _within_budget(source: str, analysis: Analysis, scope: Mapping[str, Any]) -> None:
    """Refuse to run an expression that could cost more than the limit on these values."""
    cost = analysis.cost(scope)
    if cost > COST_LIMIT:
        raise ExpressionTooCostly(
            source,
            f"{TOO_COSTLY}it could cost {cost:,} units on this input (at most {COST_LIMIT:,}); "
            "map and filter cost the square of their list's size, and nested macros multiply",
        )


def render(value: Any, context: Mapping[str, Any]) -> Any:
    """A JSON value with every ``{{ expr }}`` evaluated: a whole-string template yields the value."""
    if isinstance(value, str):
        whole = _WHOLE.match(value)
        if whole and "{{" not in whole.group(1):
            return evaluate(whole.group(1).strip(), context)
        if "{{" not in value:
            return value
        return _TEMPLATE.sub(lambda m: _as_text(evaluate(m.group(1).strip(), context)), value)
    if isinstance(value, Mapping):
        return {k: render(v, context) for k, v in value.items()}
    if isinstance(value, list):
        return [render(v, context) for v in value]
    return value


def _as_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"))
