"""The vocabulary every route shares: error responses, path and header parameters, tags, the info block.

A route names what it uses from here (a header parameter by its component name, a path parameter
by its aiohttp name); the builder turns the names into parameters and ``$ref`` s.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Final

from flowmesh.contracts.models.base import MAX_INT4
from flowmesh.contracts.models.ws import BEARER_PREFIX, SUBPROTOCOL
from flowmesh.contracts.subjects import MAX_SUBJECT_PART, SAFE_SUBJECT_PART_PATTERN
from flowmesh.gateway.openapi.operation import JsonSchema

ASCII: Final = r"^[\x20-\x7E]*$"
"""Header values are printable ASCII (a header whose bytes are not UTF-8 is a 400)."""
OPENAPI_VERSION: Final = "3.1.1"
API_VERSION: Final = "1"
API_PREFIX: Final = "/api/v1"
PROBLEM_JSON: Final = "application/problem+json"
REGENERATE: Final = "make openapi"
"""The command that rewrites the committed document (run from the repository root)."""

PATH_PARAMS: Final[Mapping[str, tuple[str, JsonSchema, str]]] = {
    "flow_id": ("flowId", {"type": "string", "format": "uuid"}, "The flow's id (UUIDv7)."),
    "run_id": ("runId", {"type": "string", "format": "uuid"}, "The run's id (UUIDv7)."),
    "trigger_id": ("triggerId", {"type": "string", "format": "uuid"}, "The trigger's id (UUIDv7)."),
    "version": ("version", {"type": "integer", "minimum": 1, "maximum": MAX_INT4}, "The version number, from 1."),
    "token": ("token", {"type": "string", "pattern": "^[A-Za-z0-9_-]{16,128}$"}, "The webhook's secret URL token."),
    "provider": (
        "provider",
        {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"},
        "The LLM provider a key is for (case-insensitive).",
    ),
    "name": (
        "name",
        {"type": "string", "pattern": "^[A-Za-z_][A-Za-z0-9_]{0,63}$"},
        "The secret's name, as steps read it: `{{ secrets.NAME }}`.",
    ),
    "event_type": (
        "eventType",
        {"type": "string", "maxLength": MAX_SUBJECT_PART, "pattern": f"^{SAFE_SUBJECT_PART_PATTERN}$"},
        "The event's type, as `event` triggers and `waitEvent` steps name it: tokens of `A-Z a-z 0-9 _ -` "
        "(1 to 64 characters each) joined by dots.",
    ),
    "tenant_id": (
        "tenantId",
        {"type": "string", "minLength": 1, "maxLength": 255},
        "The tenant's id (its `tenant` claim).",
    ),
}
"""Every path parameter name a route may use: its OpenAPI name, schema and meaning."""


ERRORS: Final[Mapping[int, tuple[str, str]]] = {
    400: (
        "BadRequest",
        "The request cannot be read: a body sent as JSON that is not valid JSON, or a header that is not UTF-8.",
    ),
    401: ("Unauthorized", "No valid credentials: a missing, expired or invalid bearer token."),
    403: ("Forbidden", "Valid credentials, but not allowed."),
    404: ("NotFound", "No such resource for this tenant (another tenant's resource answers the same)."),
    409: ("Conflict", "The resource's state does not allow the operation."),
    412: ("PreconditionFailed", "`If-Match` does not match the current `ETag`."),
    413: ("PayloadTooLarge", "The body is over 1 MiB."),
    415: ("UnsupportedMediaType", "The body is not JSON and was not sent as JSON."),
    422: ("ValidationError", "The input is not valid (unknown fields too); `errors` says where, as JSON pointers."),
    429: ("RateLimited", "Too many requests for the tenant's plan; retry after `Retry-After` seconds."),
    502: (
        "ReplyTooLarge",
        "A service's answer is over the message size limit and could not be delivered (`reply-too-large`); "
        "read smaller pages, or the one resource the `$omitted` marker names.",
    ),
    503: ("ServiceUnavailable", "A service the request needs is not reachable; retry later."),
    504: ("Timeout", "A service did not answer in time; retry later."),
}
"""Every error status the gateway documents: component name and generic meaning."""

SUCCESS: Final[Mapping[int, str]] = {
    101: "Switching protocols.",
    200: "OK.",
    201: "Created.",
    202: "Accepted.",
    204: "Done; no content.",
}

TAGS: Final = (
    {"name": "flows", "description": "Flow drafts, versions, publishing, import and export."},
    {"name": "triggers", "description": "Webhook, schedule and event triggers, and webhook deliveries."},
    {"name": "runs", "description": "Starting, reading and controlling runs."},
    {"name": "catalog", "description": "The step types a canvas can offer."},
    {"name": "live", "description": "Runs as they happen, over WebSocket."},
    {"name": "usage", "description": "Metered usage against the plan, billing export, plans and stored provider keys."},
    {"name": "audit", "description": "Who created, changed, published or deleted what, and when (append-only)."},
    {"name": "events", "description": "External events, as integrators publish them on `fm.events` (NATS)."},
    {"name": "secrets", "description": "Named secrets `http` and `llm` steps read as `{{ secrets.NAME }}`."},
    {"name": "operations", "description": "Health, readiness, metrics and this documentation."},
)

HEADER_PARAMS: Final[Mapping[str, JsonSchema]] = {
    "IdempotencyKey": {
        "name": "Idempotency-Key",
        "in": "header",
        "required": False,
        "description": "Makes a retry safe: the first response is kept 24 h per (tenant, route); the same key with "
        "the same body gets it again, with another body a 422, while the first is in flight a 409. An empty key "
        "counts as none. Up to 255 printable ASCII characters.",
        "schema": {"type": "string", "maxLength": 255, "pattern": ASCII},
    },
    "IfMatch": {
        "name": "If-Match",
        "in": "header",
        "required": False,
        "description": "The `ETag` the change is based on; a stale one is a 412 (no lost updates).",
        "schema": {"type": "string", "pattern": ASCII},
    },
    "WebhookId": {
        "name": "webhook-id",
        "in": "header",
        "required": False,
        "description": "Standard Webhooks: the delivery's id (a redelivery reuses it, and gets the same run). "
        "Required by signed triggers.",
        "schema": {"type": "string", "maxLength": 200, "pattern": "^[!-~]+$"},
    },
    "WebhookTimestamp": {
        "name": "webhook-timestamp",
        "in": "header",
        "required": False,
        "description": "Standard Webhooks: Unix seconds; within 5 minutes. Required by signed triggers.",
        "schema": {"type": "string", "pattern": ASCII},
    },
    "WebhookSignature": {
        "name": "webhook-signature",
        "in": "header",
        "required": False,
        "description": 'Standard Webhooks: `v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`, several '
        "space-separated during a secret rotation. Required by signed triggers.",
        "schema": {"type": "string", "pattern": ASCII},
    },
    "SecWebSocketProtocol": {
        "name": "Sec-WebSocket-Protocol",
        "in": "header",
        "required": False,
        "description": f"`{SUBPROTOCOL}, {BEARER_PREFIX}<token>` (or use `?ticket=`); it must offer `{SUBPROTOCOL}`.",
        "schema": {
            "type": "string",
            "pattern": rf"^([\x20-\x7E]*,)?[ \t]*{re.escape(SUBPROTOCOL)}[ \t]*(,[\x20-\x7E]*)?$",
        },
    },
}

RESPONSE_HEADERS: Final[Mapping[str, JsonSchema]] = {
    "ETag": {
        "description": 'The resource\'s strong ETag, `"<revision>"`; send it back in `If-Match`.',
        "schema": {"type": "string", "pattern": '^"[0-9]+"$'},
    },
    "Location": {"description": "Where the resource lives.", "schema": {"type": "string"}},
    "RetryAfter": {"description": "Seconds to wait before retrying.", "schema": {"type": "integer", "minimum": 1}},
}


INFO: Final[Mapping[str, Any]] = {
    "title": "Flowmesh API",
    "version": API_VERSION,
    "summary": "Workflow automation: flows, versions, triggers and durable runs.",
    "description": (
        "JSON in camelCase; every error is RFC 9457 `application/problem+json`. Lists are pages "
        "`{items, total, page, pageSize, hasMore}` (`page` from 1, `pageSize` at most 100, default 20). "
        "Send a JWT as `Authorization: Bearer <token>`; the tenant comes only from it. Every response "
        "carries `X-Request-Id` (yours, when you send a well-formed one). Live runs are WebSocket "
        "routes, described here by their handshake."
    ),
}

SECURITY_SCHEMES: Final[Mapping[str, JsonSchema]] = {
    "bearerAuth": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"},
    "wsTicket": {
        "type": "apiKey",
        "in": "query",
        "name": "ticket",
        "description": "A ticket from `POST /api/v1/ws-tickets` (WebSocket handshakes only); or offer "
        f"the subprotocol `{BEARER_PREFIX}<token>`, which OpenAPI cannot describe.",
    },
}
