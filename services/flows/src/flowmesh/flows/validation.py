"""Judging a flow definition: every problem at once, each with a JSON pointer.

What is particular to a step type (its data model, expression fields, subject fields, handles,
whether it runs other flows) is asked of the step-kind registry, :mod:`flowmesh.contracts.steps`.

Pure: the only outside fact it needs, which flows of the tenant are published, is passed in.
"""

from __future__ import annotations

from collections.abc import Container, Iterable
from typing import Any, Final
from urllib.parse import parse_qsl, urlsplit

from pydantic import ValidationError
from pydantic.alias_generators import to_snake

from flowmesh.contracts.credentials import CREDENTIAL_HEADER, CREDENTIAL_PARAM
from flowmesh.contracts.expressions import (
    CONTEXT_NAMES,
    SECRETS_NAME,
    TOO_COSTLY,
    ExpressionError,
    check_expression,
    compile_expression,
    expression_source,
    iter_templates,
    referenced_secrets,
)
from flowmesh.contracts.models import FieldError, FlowDefinition, Node
from flowmesh.contracts.models.definition import ERROR_HANDLE, ChildFlowData, StepData
from flowmesh.contracts.steps import ENTRY_TYPE, STEP_TYPES, StepKind, step_kind
from flowmesh.contracts.strict import json_pointer
from flowmesh.contracts.subjects import is_safe_subject_part

MAX_NODE_ID: Final = 64
MAX_SECRET_NAME: Final = 64
Path = tuple[str | int, ...]


class _Report:
    def __init__(self) -> None:
        self.errors: list[FieldError] = []

    def add(self, path: Path, message: str) -> None:
        self.errors.append(FieldError(path=json_pointer(path), message=message))


def referenced_flows(definition: Any) -> set[str]:
    """Flow ids that ``subflow``/``foreach`` steps of a definition run (to look up before validating)."""
    nodes = definition.get("nodes") if isinstance(definition, dict) else None
    found: set[str] = set()
    for node in nodes if isinstance(nodes, list) else []:
        kind = step_kind(str(node.get("type"))) if isinstance(node, dict) else None
        if isinstance(node, dict) and kind is not None and kind.runs_flows:
            data = node.get("data")
            if isinstance(data, dict) and isinstance(data.get("flowId"), str):
                found.add(data["flowId"])
    return found


def validate_flow(
    definition: Any, input_schema: Any, *, flow_id: str | None = None, published_flows: Container[str] = ()
) -> list[FieldError]:
    """Every problem of a flow's definition and input schema; empty when it may be published."""
    report = _Report()
    if input_schema is not None:
        _check_input_schema(report, input_schema)
    try:
        parsed = FlowDefinition.model_validate(definition)
    except ValidationError as exc:
        for e in exc.errors():
            report.add(tuple(e["loc"]), e["msg"])
        return report.errors
    _check_graph(report, parsed, flow_id=flow_id, published_flows=published_flows)
    return report.errors


def _check_input_schema(report: _Report, schema: Any) -> None:
    if not isinstance(schema, dict):
        report.add(("inputSchema",), "inputSchema must be a JSON Schema object")
        return
    # imported on the first flow that declares one: an idle service does not carry jsonschema
    from jsonschema.exceptions import SchemaError
    from jsonschema.validators import validator_for

    try:
        validator_for(schema).check_schema(schema)
    except SchemaError as exc:
        where = json_pointer(tuple(exc.absolute_path)) or "/"
        report.add(
            ("inputSchema", *exc.absolute_path), f"inputSchema is not a valid JSON Schema at {where}: {exc.message}"
        )


def _check_graph(report: _Report, d: FlowDefinition, *, flow_id: str | None, published_flows: Container[str]) -> None:
    index: dict[str, int] = {}
    data: dict[str, StepData] = {}
    for i, node in enumerate(d.nodes):
        if len(node.id) > MAX_NODE_ID:
            report.add(("nodes", i, "id"), f"node id {node.id[:16]!r}... is longer than {MAX_NODE_ID} characters")
        if node.id in index:
            report.add(("nodes", i, "id"), f"duplicate node id {node.id!r} (first at /nodes/{index[node.id]})")
            continue
        index[node.id] = i
        parsed = _check_node(report, i, node, flow_id=flow_id, published_flows=published_flows)
        if parsed is not None:
            data[node.id] = parsed

    triggers = [n for n in d.nodes if n.type == ENTRY_TYPE]
    if not triggers:
        report.add(("nodes",), "a flow needs exactly one trigger node; there is none")
    for extra in triggers[1:]:
        report.add(
            ("nodes", index[extra.id], "type"),
            f"a flow has exactly one trigger node; {extra.id!r} is a second one besides {triggers[0].id!r}",
        )

    successors: dict[str, list[tuple[str, int]]] = {node_id: [] for node_id in index}
    types = {n.id: n.type for n in d.nodes}
    edge_ids: set[str] = set()
    for j, edge in enumerate(d.edges):
        if edge.id in edge_ids:
            report.add(("edges", j, "id"), f"duplicate edge id {edge.id!r}")
        edge_ids.add(edge.id)
        ok = True
        for end, node_id in (("source", edge.source), ("target", edge.target)):
            if node_id not in index:
                verb = "starts at" if end == "source" else "ends at"
                report.add(("edges", j, end), f"edge {edge.id!r} {verb} missing node {node_id!r}")
                ok = False
        if not ok:
            continue
        if types[edge.target] == ENTRY_TYPE:
            report.add(
                ("edges", j, "target"),
                f"edge {edge.id!r} leads into the trigger {edge.target!r}; a trigger has no incoming edges",
            )
        _check_handle(
            report, j, edge.id, edge.source, step_kind(types[edge.source]), edge.source_handle, data.get(edge.source)
        )
        successors[edge.source].append((edge.target, j))

    _check_cycles(report, successors, order=list(index))
    if len(triggers) == 1:
        reached = _reachable(triggers[0].id, successors)
        for node_id, i in index.items():
            if node_id not in reached:
                report.add(("nodes", i), f"node {node_id!r} is unreachable from the trigger {triggers[0].id!r}")


def _check_node(
    report: _Report, i: int, node: Node, *, flow_id: str | None, published_flows: Container[str]
) -> StepData | None:
    kind = step_kind(node.type)
    if kind is None:
        report.add(
            ("nodes", i, "type"),
            f"node {node.id!r} has unknown type {node.type!r}; known types: {', '.join(STEP_TYPES)}",
        )
        return None
    try:
        data = kind.model.model_validate(node.data, strict=True)  # JSON types as written: no "5" for 5, no "yes"
    except ValidationError as exc:
        for e in exc.errors():
            field = json_pointer(tuple(e["loc"])) or "/"
            report.add(("nodes", i, "data", *e["loc"]), f"node {node.id!r} ({node.type}) data {field}: {e['msg']}")
        return None
    _check_expressions(report, i, node, kind)
    for field in kind.subject_fields:
        value = getattr(data, to_snake(field))
        if not is_safe_subject_part(value):
            report.add(
                ("nodes", i, "data", field),
                f"node {node.id!r}: {field} {value!r} must be tokens of "
                "letters, digits, '_' or '-' (at most 64 each), joined by dots",
            )
    if kind.runs_flows and isinstance(data, ChildFlowData):
        if flow_id is not None and data.flow_id == flow_id:
            report.add(("nodes", i, "data", "flowId"), f"node {node.id!r}: a flow cannot run itself")
        elif data.flow_id not in published_flows:
            report.add(
                ("nodes", i, "data", "flowId"),
                f"node {node.id!r}: flow {data.flow_id!r} is not a published flow of this tenant",
            )
    return data


def _check_expressions(report: _Report, i: int, node: Node, kind: StepKind) -> None:
    """Whole-expression fields compile with the names the kind allows; so do templates in the others."""
    for field, names in kind.expressions.items():
        value = node.data.get(field)
        if isinstance(value, str):
            _check_source(report, ("nodes", i, "data", field), node.id, expression_source(value), names)
    for key, value in node.data.items():
        if key in kind.expressions:
            continue
        names = kind.templates.get(key, CONTEXT_NAMES)
        for path, source in iter_templates(value, ("nodes", i, "data", key)):
            _check_source(report, path, node.id, source, names)


def _check_source(report: _Report, path: Path, node_id: str, source: str, names: frozenset[str]) -> None:
    if _reads_secrets(source) and SECRETS_NAME not in names:
        report.add(
            path,
            f"node {node_id!r}: expression {source!r} reads secrets, which only the fields of http and llm steps "
            "may (their values are resolved when the request is sent, and never recorded)",
        )
        return
    problem = check_expression(source, names)
    if problem is not None:
        if problem.startswith(TOO_COSTLY):
            report.add(path, f"node {node_id!r}: expression {source!r} is {problem}")
        else:
            report.add(path, f"node {node_id!r}: expression {source!r} does not compile: {problem}")
        return
    if SECRETS_NAME in names and _reads_secrets(source):
        _check_secret_names(report, path, node_id, source)


def _reads_secrets(source: str) -> bool:
    try:
        return SECRETS_NAME in compile_expression(source).variables()
    except ExpressionError:
        return False


def _check_secret_names(report: _Report, path: Path, node_id: str, source: str) -> None:
    """A step reads its secrets by name (``secrets.NAME``): the runner resolves only the names it sees."""
    found = referenced_secrets(source)
    if found is None:
        report.add(
            path, f"node {node_id!r}: expression {source!r} must read a secret as secrets.NAME, by its literal name"
        )
        return
    for name in sorted(found):
        if len(name) > MAX_SECRET_NAME:
            report.add(path, f"node {node_id!r}: secret name {name[:16]!r}... is longer than {MAX_SECRET_NAME}")


def _check_handle(
    report: _Report, j: int, edge_id: str, source: str, kind: StepKind | None, handle: str | None, data: StepData | None
) -> None:
    if handle is None or data is None or kind is None:
        return
    if handle == ERROR_HANDLE:
        if data.on_error != "continue":
            report.add(
                ("edges", j, "sourceHandle"),
                f"edge {edge_id!r}: handle 'error' of {source!r} is only taken when the step has onError: continue",
            )
        return
    handles = kind.handles_of(data)
    if handle not in handles:
        offered = f"its handles are {', '.join(map(repr, handles))}" if handles else "it has no handles"
        report.add(
            ("edges", j, "sourceHandle"),
            f"edge {edge_id!r}: {kind.type} step {source!r} has no handle {handle!r}; {offered}",
        )
    elif handle == "timeout" and kind.timeout == "handle" and data.timeout_ms is None:
        report.add(
            ("edges", j, "sourceHandle"),
            f"edge {edge_id!r}: handle 'timeout' of {source!r} is never taken because the step sets no timeoutMs",
        )


def _check_cycles(report: _Report, successors: dict[str, list[tuple[str, int]]], order: Iterable[str]) -> None:
    """Report each cycle found by a depth-first search, naming its nodes in order."""
    WHITE, GREY, BLACK = 0, 1, 2
    color = dict.fromkeys(successors, WHITE)
    for root in order:
        if color[root] != WHITE:
            continue
        stack: list[tuple[str, int]] = [(root, 0)]
        path: list[str] = [root]
        color[root] = GREY
        while stack:
            node, k = stack[-1]
            if k < len(successors[node]):
                stack[-1] = (node, k + 1)
                nxt, j = successors[node][k]
                if color[nxt] == GREY:
                    cycle = [*path[path.index(nxt) :], nxt]
                    report.add(("edges", j), f"cycle: {' -> '.join(cycle)}")
                elif color[nxt] == WHITE:
                    color[nxt] = GREY
                    stack.append((nxt, 0))
                    path.append(nxt)
            else:
                color[node] = BLACK
                stack.pop()
                path.pop()


def _reachable(start: str, successors: dict[str, list[tuple[str, int]]]) -> set[str]:
    seen = {start}
    todo = [start]
    while todo:
        for nxt, _ in successors[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def credential_warnings(definition: Any) -> list[FieldError]:
    """Literal credentials in ``http`` steps: allowed, but stored in every version and every export.

    A header or query parameter with a credential-like name (:mod:`flowmesh.contracts.credentials`)
    whose value holds no ``{{ expr }}``, and a URL with a password or a credential-like query
    parameter written out; each is better read from a secret (``{{ secrets.NAME }}``).
    """
    report = _Report()
    nodes = definition.get("nodes") if isinstance(definition, dict) else None
    for i, node in enumerate(nodes if isinstance(nodes, list) else []):
        data = node.get("data") if isinstance(node, dict) and node.get("type") == "http" else None
        if not isinstance(data, dict):
            continue
        node_id = node.get("id")
        for field, what, pattern in (
            ("headers", "header", CREDENTIAL_HEADER),
            ("query", "query parameter", CREDENTIAL_PARAM),
        ):
            values = data.get(field)
            for name, value in values.items() if isinstance(values, dict) else ():
                if pattern.search(str(name)) and _literal(value):
                    report.add(("nodes", i, "data", field, str(name)), _advice(node_id, f"{what} {name!r}"))
        url = data.get("url")
        if isinstance(url, str) and (where := _url_credential(url)):
            report.add(("nodes", i, "data", "url"), _advice(node_id, where))
    return report.errors


def _literal(value: Any) -> bool:
    return isinstance(value, str) and value.strip() != "" and "{{" not in value


def _advice(node_id: Any, where: str) -> str:
    return (
        f"node {node_id!r}: {where} holds a literal credential, stored with every version and export; "
        "store it as a secret (POST /api/v1/secrets) and write {{ secrets.NAME }}"
    )


def _url_credential(url: str) -> str | None:
    """What part of a URL holds a literal credential (a password, a key-like query value), or None."""
    try:
        parsed = urlsplit(url)
        password = parsed.password
    except ValueError:
        return None
    if password and "{{" not in password:
        return "the URL's password"
    for name, value in parse_qsl(parsed.query):
        if CREDENTIAL_PARAM.search(name) and _literal(value):
            return f"the URL's query parameter {name!r}"
    return None
