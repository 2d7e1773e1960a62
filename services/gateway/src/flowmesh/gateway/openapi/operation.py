"""What one route says about itself in the OpenAPI document, written as a decorator on its handler.

A handler documents what is particular to it: its id, summary and tag, its request body, query and
headers, its successes and the errors only it can give. What every route of a kind has (401 and
429 under ``/api/v1``, 502/503/504 when a service is called, 404 for a path parameter, the body and
query errors, the ``Idempotency-Key`` and ``If-Match`` statuses) the builder adds by rule, so a
new route declares no boilerplate and cannot forget it either.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import KW_ONLY, dataclass, field
from typing import Any, Final, TypeVar

from aiohttp import web
from pydantic import BaseModel

JsonSchema = dict[str, Any]

Handler = TypeVar("Handler", bound=Callable[..., Awaitable[web.StreamResponse]])

ATTRIBUTE: Final = "__openapi__"
"""Where a handler keeps its documentation: the route table holds the handler, so the builder finds it."""


@dataclass(frozen=True)
class Raw:
    """A body that is not one contract model: its media types and their JSON Schemas (or contract models)."""

    content: Mapping[str, JsonSchema | type[BaseModel]]


Body = type[BaseModel] | Raw | None
"""A response or request body: a contract model, raw media types, or none (e.g. 204, 101)."""


@dataclass(frozen=True)
class Operation:
    """The decorator that documents a handler: ``@Operation("getRun", "One run", tag="runs", responses=...)``.

    Put it under the route decorator (``@routes.get(...)`` registers what it returns); the handler
    itself is returned unchanged.
    """

    operation_id: str
    summary: str
    _: KW_ONLY
    tag: str
    responses: Mapping[int, Body]
    errors: tuple[int, ...] = ()
    """Statuses particular to this route; those every route of its kind has are added by rule."""
    notes: Mapping[int, str] = field(default_factory=dict)
    """What a status means here, when more than its generic description."""
    description: str | None = None
    body: type[BaseModel] | Raw | None = None
    query: type[BaseModel] | None = None
    """The contract model the handler reads its query with (``read_query``)."""
    query_params: tuple[JsonSchema, ...] = ()
    """Query parameters the handler reads by hand rather than through a contract model."""
    headers: tuple[str, ...] = ()
    """Request header parameters, by their name in ``components.parameters``."""
    public: bool = False
    """No bearer token (``security: []``)."""
    websocket: bool = False
    """A WebSocket handshake: credentials by subprotocol or ticket, not the Authorization header."""
    messages: tuple[type[BaseModel], ...] = ()
    """A WebSocket's frames: published as components (OpenAPI cannot tie them to the operation)."""
    if_match: bool = False
    etag: bool = False
    """Success responses carry the resource's ``ETag``."""
    location: bool = False
    """Success responses carry ``Location``."""
    calls_service: bool = True
    """Forwarded to a service over NATS, so 502/503/504 are possible."""

    def __call__(self, handler: Handler) -> Handler:
        setattr(handler, ATTRIBUTE, self)
        return handler


@dataclass(frozen=True)
class Undocumented:
    """The decorator of a route deliberately left out of the document: ``@Undocumented("why")``."""

    reason: str

    def __call__(self, handler: Handler) -> Handler:
        setattr(handler, ATTRIBUTE, self)
        return handler


def documentation_of(handler: object) -> Operation | Undocumented | None:
    """What a handler says about itself, or None when it says nothing (an error for the builder)."""
    doc = getattr(handler, ATTRIBUTE, None)
    return doc if isinstance(doc, Operation | Undocumented) else None
