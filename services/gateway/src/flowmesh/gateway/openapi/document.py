"""Assemble the OpenAPI 3.1 document from an application's routes and what each handler says about itself.

:func:`build_openapi` walks the router and reads each handler's :class:`Operation`; a route whose
handler has none raises :class:`UndocumentedRoute`, so a new route cannot ship undocumented.
Schemas come from the pydantic contract models (camelCase aliases); the errors every route of a
kind shares are added here by rule, so a handler lists only what is particular to it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from aiohttp import web
from pydantic import BaseModel
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaMode, models_json_schema

from flowmesh.contracts.models import Problem
from flowmesh.gateway.openapi.components import (
    API_PREFIX,
    ERRORS,
    HEADER_PARAMS,
    INFO,
    OPENAPI_VERSION,
    PATH_PARAMS,
    PROBLEM_JSON,
    RESPONSE_HEADERS,
    SECURITY_SCHEMES,
    SUCCESS,
    TAGS,
)
from flowmesh.gateway.openapi.operation import Body, JsonSchema, Operation, Raw, Undocumented, documentation_of

IMPLICIT_METHODS: Final = frozenset({"HEAD", "OPTIONS"})
"""aiohttp adds HEAD to every GET; OPTIONS is CORS preflight: neither is an operation of its own."""

BODY_ERRORS: Final = (400, 413, 415, 422)
"""What reading a JSON body can answer: unreadable, too large, not JSON, not valid."""

_PARAM = re.compile(r"\{([^}:]+)(?::[^}]*)?\}")
_REF = re.compile(r"#/components/schemas/([^\"]+)")

Refs = Mapping[tuple[type[BaseModel], JsonSchemaMode], JsonSchema]
"""A model (in a mode) to its ``$ref`` in ``components.schemas``."""


class UndocumentedRoute(LookupError):
    """The application serves a route whose handler carries no :class:`Operation`."""


@dataclass(frozen=True)
class Route:
    """A documented route: where aiohttp serves it and what its handler says about it."""

    method: str
    path: str
    """As registered with aiohttp (``/api/v1/flows/{flow_id}``); parameters are renamed to camelCase."""
    op: Operation


class _Schemas(GenerateJsonSchema):
    """Pydantic's JSON Schema without a title on every field (``"title": "Flowid"`` helps nobody)."""

    def field_title_should_be_set(self, schema: Any) -> bool:
        return False


def app_routes(app: web.Application) -> list[Route]:
    """Every documented route the application serves, less implicit methods and deliberately undocumented ones.

    Raises:
        UndocumentedRoute: a handler carries no documentation.
    """
    found: list[Route] = []
    missing: list[str] = []
    for route in app.router.routes():
        path = route.resource.canonical if route.resource is not None else None
        if path is None or route.method in IMPLICIT_METHODS:
            continue
        doc = documentation_of(route.handler)
        if isinstance(doc, Operation):
            found.append(Route(route.method, path, doc))
        elif not isinstance(doc, Undocumented):
            missing.append(f"{route.method} {path}")
    if missing:
        raise UndocumentedRoute(
            "routes whose handler has no @Operation(...) (flowmesh.gateway.openapi.operation): "
            + ", ".join(sorted(missing))
        )
    ids = [r.op.operation_id for r in found]
    if len(set(ids)) != len(ids):
        raise ValueError(f"two routes share an operationId: {sorted(i for i in ids if ids.count(i) > 1)}")
    return found


def build_openapi(app: web.Application) -> dict[str, Any]:
    """The OpenAPI 3.1 document of ``app``'s routes.

    Raises:
        UndocumentedRoute: the application serves a route whose handler carries no documentation.
    """
    routes = app_routes(app)
    refs, defs = _model_schemas(routes)
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        paths.setdefault(_openapi_path(route.path), {})[route.method.lower()] = _operation(route, refs)
    used_errors = sorted({s for route in routes for s in _error_statuses(route)})
    return {
        "openapi": OPENAPI_VERSION,
        "info": dict(INFO),
        "tags": list(TAGS),
        "security": [{"bearerAuth": []}],
        "paths": dict(sorted(paths.items())),
        "components": {
            "schemas": defs,
            "responses": {ERRORS[s][0]: _problem(ERRORS[s][1], s, refs) for s in used_errors},
            "parameters": HEADER_PARAMS,
            "headers": RESPONSE_HEADERS,
            "securitySchemes": SECURITY_SCHEMES,
        },
    }


def _problem(description: str, status: int, refs: Refs) -> JsonSchema:
    """An error response: a problem+json body, and ``Retry-After`` on a 429."""
    return {
        "description": description,
        "content": {PROBLEM_JSON: {"schema": refs[(Problem, "serialization")]}},
        **({"headers": {"Retry-After": {"$ref": "#/components/headers/RetryAfter"}}} if status == 429 else {}),
    }


def _models(op: Operation) -> set[tuple[type[BaseModel], JsonSchemaMode]]:
    """The models one operation shows: its request body to validate, its responses and messages as sent."""
    wanted: set[tuple[type[BaseModel], JsonSchemaMode]] = set()
    if isinstance(op.body, type):
        wanted.add((op.body, "validation"))
    for response in op.responses.values():
        if isinstance(response, type):
            wanted.add((response, "serialization"))
        elif isinstance(response, Raw):
            wanted.update((m, "serialization") for m in response.content.values() if isinstance(m, type))
    wanted.update((m, "serialization") for m in op.messages)
    return wanted


def _model_schemas(routes: list[Route]) -> tuple[Refs, JsonSchema]:
    """JSON Schemas of every model the operations use, in one ``components.schemas`` namespace."""
    wanted: set[tuple[type[BaseModel], JsonSchemaMode]] = {(Problem, "serialization")}
    for route in routes:
        wanted |= _models(route.op)
    ordered = sorted(wanted, key=lambda m: (m[0].__name__, m[1]))
    refs, top = models_json_schema(
        ordered, by_alias=True, ref_template="#/components/schemas/{model}", schema_generator=_Schemas
    )
    defs: JsonSchema = top.get("$defs", {})
    for model in {r.op.body for r in routes if isinstance(r.op.body, type)}:
        # HTTP bodies are read strictly (``read_body``): unknown top-level fields are a 422
        name = refs[(model, "validation")]["$ref"].rsplit("/", 1)[1]
        defs[name] = {**defs[name], "additionalProperties": False}
    typed = {(m, mode): ref for (m, mode), ref in refs.items() if issubclass(m, BaseModel)}
    return typed, _used(defs, {ref["$ref"] for ref in typed.values()})


def _used(defs: JsonSchema, roots: set[str]) -> JsonSchema:
    """The schemas reachable from ``roots``: pydantic also emits a model whose schema a field replaced."""
    seen: set[str] = set()
    todo = [r.rsplit("/", 1)[1] for r in roots]
    while todo:
        name = todo.pop()
        if name in seen or name not in defs:
            continue
        seen.add(name)
        todo += _REF.findall(json.dumps(defs[name]))
    return {name: defs[name] for name in sorted(seen)}


def _openapi_path(path: str) -> str:
    return _PARAM.sub(lambda m: "{" + _path_param(m.group(1))[0] + "}", path)


def _path_param(name: str) -> tuple[str, JsonSchema, str]:
    try:
        return PATH_PARAMS[name]
    except KeyError:
        raise UndocumentedRoute(f"path parameter {{{name}}} has no entry in PATH_PARAMS") from None


def _path_names(path: str) -> list[str]:
    return _PARAM.findall(path)


def _idempotent(route: Route) -> bool:
    """Every authenticated POST honours ``Idempotency-Key`` (the gateway's ``idempotent`` middleware)."""
    return route.method == "POST" and route.path.startswith(API_PREFIX) and not route.op.public


def _error_statuses(route: Route) -> list[int]:
    """The route's own error statuses and those its kind has: auth, limits, services, parameters, bodies."""
    op = route.op
    statuses = set(op.errors)
    statuses.add(400)  # a header whose bytes are not UTF-8 (``middleware.readable_headers``), on any route
    if route.path.startswith(API_PREFIX):
        statuses.add(429)
        if not op.public:
            statuses.add(401)
    if op.calls_service:
        statuses.update((502, 503, 504))
    if _path_names(route.path):
        statuses.update((404, 422))  # 422: a path parameter holding NUL (``body.storable_path``)
    if isinstance(op.body, type):
        statuses.update(BODY_ERRORS)
    if op.query is not None:
        statuses.add(422)
    if _idempotent(route):
        statuses.update((400, 409, 422, 503))
    if op.if_match:
        statuses.add(412)
    return sorted(statuses)


def _operation(route: Route, refs: Refs) -> dict[str, Any]:
    op = route.op
    doc: dict[str, Any] = {"operationId": op.operation_id, "summary": op.summary, "tags": [op.tag]}
    if op.description:
        doc["description"] = op.description
    params = _parameters(route)
    if params:
        doc["parameters"] = params
    if op.body is not None:
        doc["requestBody"] = _request_body(op.body, refs)
    doc["responses"] = _responses(route, refs)
    if op.public:
        doc["security"] = []
    elif op.websocket:
        doc["security"] = [{"wsTicket": []}]
    return doc


def _responses(route: Route, refs: Refs) -> dict[str, Any]:
    """Successes as declared, then each error: the route's own meaning of it, else the shared component."""
    op = route.op
    responses: dict[str, Any] = {str(s): _success(op, s, body, refs) for s, body in op.responses.items()}
    for status in _error_statuses(route):
        if str(status) in responses:
            continue
        if status in op.notes:
            responses[str(status)] = _problem(op.notes[status], status, refs)
        else:
            responses[str(status)] = {"$ref": f"#/components/responses/{ERRORS[status][0]}"}
    return dict(sorted(responses.items()))


def _parameters(route: Route) -> list[JsonSchema]:
    op = route.op
    params: list[JsonSchema] = []
    names = _path_names(route.path)
    for name in names:
        public_name, schema, description = _path_param(name)
        params.append(
            {"name": public_name, "in": "path", "required": True, "description": description, "schema": schema}
        )
    if op.query is not None:
        params.extend(_query_params(op.query, exclude=set(names)))
    params.extend(op.query_params)
    headers = (
        *op.headers,
        *(("IdempotencyKey",) if _idempotent(route) else ()),
        *(("IfMatch",) if op.if_match else ()),
    )
    params.extend({"$ref": f"#/components/parameters/{h}"} for h in headers)
    return params


def _query_params(model: type[BaseModel], *, exclude: set[str]) -> list[JsonSchema]:
    """A query model's fields as parameters; ``null`` is dropped (an absent parameter is the null)."""
    schema = model.model_json_schema(by_alias=True, mode="validation", schema_generator=_Schemas)
    if "$defs" in schema:
        raise ValueError(f"{model.__name__}: query parameters must be scalars")
    required = set(schema.get("required", ()))
    params = []
    for name, info in model.model_fields.items():
        if name in exclude:
            continue
        alias = info.alias or name
        prop = _without_null(schema["properties"][alias])
        description = prop.pop("description", None)
        param: JsonSchema = {"name": alias, "in": "query", "required": alias in required, "schema": prop}
        if description:
            param["description"] = description
        params.append(param)
    return params


def _without_null(schema: JsonSchema) -> JsonSchema:
    out = dict(schema)
    branches = out.pop("anyOf", None)
    if branches is not None:
        rest = [b for b in branches if b != {"type": "null"}]
        if len(rest) == 1:
            out = {**rest[0], **out}
        else:
            out["anyOf"] = rest
    if out.get("default", 0) is None:
        del out["default"]
    return out


def _request_body(body: type[BaseModel] | Raw, refs: Refs) -> JsonSchema:
    if isinstance(body, Raw):
        return {"required": False, "content": _raw_content(body, refs)}
    required = any(f.is_required() for f in body.model_fields.values())
    return {"required": required, "content": {"application/json": {"schema": refs[(body, "validation")]}}}


def _success(op: Operation, status: int, body: Body, refs: Refs) -> JsonSchema:
    out: JsonSchema = {"description": op.notes.get(status, SUCCESS.get(status, "OK."))}
    headers: dict[str, Any] = {}
    if op.etag:
        headers["ETag"] = {"$ref": "#/components/headers/ETag"}
    if op.location:
        headers["Location"] = {"$ref": "#/components/headers/Location"}
    if headers and 200 <= status < 300:
        out["headers"] = headers
    if isinstance(body, Raw):
        out["content"] = _raw_content(body, refs)
    elif body is not None:
        out["content"] = {"application/json": {"schema": refs[(body, "serialization")]}}
    return out


def _raw_content(body: Raw, refs: Refs) -> JsonSchema:
    return {
        media: {"schema": refs[(schema, "serialization")] if isinstance(schema, type) else schema}
        for media, schema in body.content.items()
    }


def dumps(document: Mapping[str, Any]) -> str:
    """The committed form: pretty-printed, keys sorted, a trailing newline."""
    return json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
