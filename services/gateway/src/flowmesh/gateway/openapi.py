"""The gateway's OpenAPI 3.1 document (DESIGN §6), built from the contract models and the route table.

Every operation's metadata lives here, in :data:`OPERATIONS`, keyed by (method, path as registered
with aiohttp). :func:`build_openapi` walks the application's router and raises
:class:`UndocumentedRoute` for a route without an entry, so a new route cannot ship undocumented.
Schemas come from the pydantic contract models (camelCase aliases); the errors every route shares
(authentication, rate limits, unreadable bodies, unreachable services) are added by rule, so an
entry lists only what is particular to it.

``python -m flowmesh.gateway.openapi`` prints the document; ``make openapi`` writes it to
``docs/api/openapi.json``, which is committed, and a test fails when that file is not current.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from aiohttp import web
from pydantic import BaseModel, Field
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaMode, models_json_schema

from flowmesh.contracts.models import (
    Flow,
    FlowCreate,
    FlowListQuery,
    FlowSummary,
    FlowUpdate,
    FlowVersion,
    Page,
    PageQuery,
    Problem,
    Run,
    RunEvent,
    RunStart,
    StepRun,
    Trigger,
    TriggerCreate,
    TriggerUpdate,
    WireModel,
)
from flowmesh.contracts.models.base import MAX_INT4
from flowmesh.contracts.models.flows import (
    FlowExport,
    ImportedFlow,
    Rollback,
    StepCatalog,
    TriggerList,
    ValidationReport,
)
from flowmesh.contracts.models.rpc import RunEventsQuery, RunListQuery, RunStepsQuery
from flowmesh.contracts.models.runs import RunAccepted, RunResume, RunRetry
from flowmesh.contracts.models.usage import (
    ApiKeyCreate,
    ApiKeyInfo,
    ApiKeyList,
    FlowStats,
    PlanAssignment,
    TenantPlan,
    UsageExport,
    UsageExportQuery,
    UsageQuery,
    UsageSummary,
)
from flowmesh.contracts.models.ws import BEARER_PREFIX, SUBPROTOCOL, WsEvent, WsSnapshot, WsTicket
from flowmesh.gateway.routes.ops import ReadinessQuery

OPENAPI_VERSION: Final = "3.1.1"
API_VERSION: Final = "1"
API_PREFIX: Final = "/api/v1"
PROBLEM_JSON: Final = "application/problem+json"
REGENERATE: Final = "make openapi"
"""The command that rewrites the committed document (run from the repository root)."""

JsonSchema = dict[str, Any]


# --- shapes that exist only on the HTTP side ------------------------------------------------------


class FlowPage(Page[FlowSummary]):
    """A page of flows, newest update first."""


class VersionPage(Page[FlowVersion]):
    """A page of a flow's versions, newest first."""


class RunPage(Page[Run]):
    """A page of runs, newest first."""


class StepRunPage(Page[StepRun]):
    """A page of a run's steps, in the order they started."""


class RunEventPage(Page[RunEvent]):
    """The run's events after the ``after`` cursor, in ``seq`` order (``page`` is always 1)."""

    page_size: int = Field(ge=1, le=1000)  # a cursor page may be larger than a numbered one


class Health(WireModel):
    """``GET /healthz``: the process serves requests."""

    status: Literal["ok"]


class Readiness(WireModel):
    """``GET /readyz``: NATS and every service, each ``true`` when it answered."""

    status: Literal["ok", "unavailable", "draining"]
    checks: dict[str, bool]


# --- the operation table --------------------------------------------------------------------------


@dataclass(frozen=True)
class Raw:
    """A body that is not one contract model: its media types and their JSON Schemas (or contract models)."""

    content: Mapping[str, JsonSchema | type[BaseModel]]


Body = type[BaseModel] | Raw | None
"""A response or request body: a contract model, raw media types, or none (e.g. 204, 101)."""


@dataclass(frozen=True)
class Op:
    """What OpenAPI says about one route; errors shared by every route of a kind are added by rule."""

    method: str
    path: str
    """As registered with aiohttp (``/api/v1/flows/{flow_id}``); parameters are renamed to camelCase."""
    operation_id: str
    summary: str
    tag: str
    responses: Mapping[int, Body]
    errors: tuple[int, ...] = ()
    """Statuses particular to this route; 401/429/503/504, 404 for path parameters and the body and
    query errors are added by rule (see :func:`_error_statuses`)."""
    notes: Mapping[int, str] = field(default_factory=dict)
    """What a status means here, when more than its generic description."""
    description: str | None = None
    body: type[BaseModel] | Raw | None = None
    query: type[BaseModel] | None = None
    headers: tuple[str, ...] = ()
    """Request header parameters from ``components.parameters``."""
    public: bool = False
    """No bearer token (``security: []``)."""
    websocket: bool = False
    """A WebSocket handshake: credentials by subprotocol or ticket, not the Authorization header."""
    if_match: bool = False
    etag: bool = False
    """Success responses carry the resource's ``ETag``."""
    location: bool = False
    """Success responses carry ``Location``."""
    calls_service: bool = True
    """Forwarded to a service over NATS, so 503/504 are possible."""


NO_BODY = None
FLOW_BODY_ERRORS = (400, 413, 415, 422)

_WS_DESCRIPTION = (
    "A WebSocket handshake (DESIGN §7). Offer the subprotocols `{sub}` and `{bearer}<token>` (browsers cannot "
    "set an Authorization header on a WebSocket), or pass `?ticket=` from `POST /api/v1/ws-tickets`; the server "
    "selects `{sub}`. `Origin`, when sent, must be one of the CORS origins. A refused handshake is an ordinary "
    "problem+json response, never a stream. Messages (server to client, JSON text frames): {messages}. "
    "Keep-alive is WebSocket ping frames every 20 s; a client that falls 1,000 events behind is closed with code "
    "1013 and reconnects with `?after=<last seq>`; a stopping gateway closes with 1001."
)

OPERATIONS: Final[tuple[Op, ...]] = (
    # operations at the root
    Op(
        "GET",
        "/healthz",
        "healthz",
        "Liveness",
        "operations",
        {200: Health},
        public=True,
        calls_service=False,
    ),
    Op(
        "GET",
        "/readyz",
        "readyz",
        "Readiness: NATS and every service reachable",
        "operations",
        {200: Readiness, 503: Readiness},
        query=ReadinessQuery,
        notes={503: "Something is not reachable (`checks` says what), or the replica is draining before it stops."},
        public=True,
        calls_service=False,
    ),
    Op(
        "GET",
        "/metrics",
        "metrics",
        "Prometheus metrics",
        "operations",
        {200: Raw({"text/plain": {"type": "string"}})},
        public=True,
        calls_service=False,
    ),
    Op(
        "GET",
        "/openapi.json",
        "openapi",
        "This document",
        "operations",
        {200: Raw({"application/json": {"type": "object"}})},
        public=True,
        calls_service=False,
    ),
    Op(
        "GET",
        "/docs",
        "docs",
        "Interactive documentation of this API (Swagger UI, served locally)",
        "operations",
        {200: Raw({"text/html": {"type": "string"}})},
        public=True,
        calls_service=False,
    ),
    # flows
    Op(
        "GET",
        "/api/v1/flows",
        "listFlows",
        "List flows, newest update first",
        "flows",
        {200: FlowPage},
        query=FlowListQuery,
    ),
    Op(
        "POST",
        "/api/v1/flows",
        "createFlow",
        "Create a draft flow",
        "flows",
        {201: Flow},
        errors=(403,),
        notes={403: "The plan's flow limit is reached (`quota-exceeded`)."},
        body=FlowCreate,
        etag=True,
        location=True,
    ),
    Op(
        "GET",
        "/api/v1/flows/{flow_id}",
        "getFlow",
        "A flow with its draft definition",
        "flows",
        {200: Flow},
        etag=True,
    ),
    Op(
        "PATCH",
        "/api/v1/flows/{flow_id}",
        "updateFlow",
        "Change some fields of the draft",
        "flows",
        {200: Flow},
        errors=(412,),
        body=FlowUpdate,
        if_match=True,
        etag=True,
    ),
    Op(
        "PUT",
        "/api/v1/flows/{flow_id}",
        "replaceFlow",
        "Replace the whole draft (a canvas save)",
        "flows",
        {200: Flow},
        errors=(412,),
        body=FlowCreate,
        if_match=True,
        etag=True,
    ),
    Op(
        "DELETE",
        "/api/v1/flows/{flow_id}",
        "deleteFlow",
        "Delete a flow",
        "flows",
        {204: NO_BODY},
        errors=(409, 412),
        notes={409: "The flow has published versions; delete with `?force=true` (keeps its run history)."},
        query=None,
        if_match=True,
    ),
    Op(
        "POST",
        "/api/v1/flows/{flow_id}/validate",
        "validateFlow",
        "Every problem of the draft at once",
        "flows",
        {200: ValidationReport},
    ),
    Op(
        "POST",
        "/api/v1/flows/{flow_id}/publish",
        "publishFlow",
        "Freeze the draft as a new active version",
        "flows",
        {201: FlowVersion, 200: FlowVersion},
        errors=(422,),
        notes={
            200: "The draft is identical to the active version: that version.",
            201: "A new version (n+1), now active.",
            422: "The draft is not valid; `errors` lists every problem.",
        },
    ),
    Op(
        "GET",
        "/api/v1/flows/{flow_id}/versions",
        "listVersions",
        "A flow's versions, newest first",
        "flows",
        {200: VersionPage},
        query=PageQuery,
    ),
    Op(
        "GET",
        "/api/v1/flows/{flow_id}/versions/{version}",
        "getVersion",
        "One immutable version",
        "flows",
        {200: FlowVersion},
    ),
    Op(
        "POST",
        "/api/v1/flows/{flow_id}/rollback",
        "rollbackFlow",
        "Make an earlier version the active one",
        "flows",
        {200: Flow},
        notes={404: "No such flow, or it has no such version."},
        body=Rollback,
        etag=True,
    ),
    Op(
        "POST",
        "/api/v1/flows/{flow_id}/activate",
        "activateFlow",
        "Let the flow's triggers fire and its runs start",
        "flows",
        {200: Flow},
        etag=True,
    ),
    Op(
        "POST",
        "/api/v1/flows/{flow_id}/deactivate",
        "deactivateFlow",
        "Stop the flow's triggers; starts answer 409 until it is activated again",
        "flows",
        {200: Flow},
        etag=True,
    ),
    Op(
        "POST",
        "/api/v1/flows/{flow_id}/duplicate",
        "duplicateFlow",
        'A new draft with the same content, named "<name> (copy)"',
        "flows",
        {201: Flow},
        errors=(403,),
        notes={403: "The plan's flow limit is reached (`quota-exceeded`)."},
        etag=True,
    ),
    Op(
        "GET",
        "/api/v1/flows/{flow_id}/export",
        "exportFlow",
        "A portable document of the flow and its triggers (no tokens, no secrets)",
        "flows",
        {200: FlowExport},
    ),
    Op(
        "POST",
        "/api/v1/flows/import",
        "importFlow",
        "A new draft from an export document",
        "flows",
        {201: ImportedFlow},
        errors=(403,),
        notes={
            201: "The new draft; webhook triggers got new URLs (and signed ones new secrets), shown here only.",
            403: "The plan's flow limit is reached (`quota-exceeded`).",
        },
        body=FlowExport,
        etag=True,
    ),
    # triggers
    Op(
        "GET",
        "/api/v1/flows/{flow_id}/triggers",
        "listTriggers",
        "A flow's triggers",
        "triggers",
        {200: TriggerList},
    ),
    Op(
        "POST",
        "/api/v1/flows/{flow_id}/triggers",
        "createTrigger",
        "Add a webhook, schedule or event trigger",
        "triggers",
        {201: Trigger},
        notes={201: "The trigger; a webhook's `url` (and a signed one's `secret`) is shown in this response only."},
        description=(
            "`config` by type: `webhook` `{signed?}`; `schedule` `{cron, timezone (IANA, default UTC), misfire "
            "(skip | fireOnce | fireAll)}`, 5 cron fields or 6 with seconds first; `event` `{eventType, filter? "
            "(CEL)}`. A config that does not fit its type is a 422."
        ),
        body=TriggerCreate,
    ),
    Op(
        "PATCH",
        "/api/v1/triggers/{trigger_id}",
        "updateTrigger",
        "Rename, reconfigure, enable or disable a trigger",
        "triggers",
        {200: Trigger},
        body=TriggerUpdate,
    ),
    Op(
        "DELETE",
        "/api/v1/triggers/{trigger_id}",
        "deleteTrigger",
        "Remove a trigger; a webhook URL stops working at once",
        "triggers",
        {204: NO_BODY},
    ),
    Op(
        "POST",
        "/api/v1/hooks/{token}",
        "deliverWebhook",
        "Start a run from a webhook (no JWT: the URL's token is the credential)",
        "triggers",
        {202: RunAccepted},
        errors=(400, 401, 403, 404, 409, 413, 415, 422),
        notes={
            400: "A body sent as JSON that is not JSON, a form that is not UTF-8, or a malformed `webhook-id`.",
            415: "A text body in an unknown charset, or binary.",
            413: "The body is over 1 MiB, or too large once wrapped as a run input.",
            422: "The body cannot be kept as a run input (nested over 64 levels, or holding a NUL character).",
            202: "Accepted: the run is durable and will reach a final state; a redelivery (same `webhook-id`) "
            "gets the same run.",
            401: "A signed trigger and a missing, stale (over 5 minutes) or wrong Standard Webhooks signature.",
            403: "The plan's monthly runs are used up (`quota-exceeded`).",
            404: "No webhook has this URL.",
            409: "The trigger is disabled, or the flow is deactivated or has no published version.",
        },
        description=(
            "The run's input is `{body, headers, query}`: `body` is the parsed JSON or form, else the text; "
            "`headers` a safe subset. A signed trigger needs the Standard Webhooks headers."
        ),
        body=Raw(
            {
                "application/json": {},
                "application/x-www-form-urlencoded": {"type": "object", "additionalProperties": {"type": "string"}},
                "text/plain": {"type": "string"},
            }
        ),
        headers=("WebhookId", "WebhookTimestamp", "WebhookSignature"),
        public=True,
    ),
    # catalog
    Op(
        "GET",
        "/api/v1/catalog/steps",
        "listStepTypes",
        "Every step type with its handles and the JSON Schema of its `data`",
        "catalog",
        {200: StepCatalog},
    ),
    # runs
    Op(
        "POST",
        "/api/v1/flows/{flow_id}/runs",
        "startRun",
        "Start a run of the flow's active (or a given) version",
        "runs",
        {201: Run, 200: Run},
        errors=(403, 409, 422),
        notes={
            200: "An idempotent repeat (same `Idempotency-Key`, same input): the run it started.",
            201: "The run, `queued`.",
            403: "The plan's monthly runs are used up (`quota-exceeded`).",
            409: "The flow is deactivated or has no published version.",
            422: "The input does not match the version's `inputSchema`, or the `Idempotency-Key` was used with "
            "another input.",
            429: "Too many requests, or too many runs in flight for the plan.",
        },
        description="`Idempotency-Key` here is kept for ever per (tenant, flow): a repeat returns the same run.",
        body=RunStart,
        location=True,
    ),
    Op("GET", "/api/v1/runs", "listRuns", "List runs, newest first", "runs", {200: RunPage}, query=RunListQuery),
    Op("GET", "/api/v1/runs/{run_id}", "getRun", "One run", "runs", {200: Run}),
    Op(
        "GET",
        "/api/v1/runs/{run_id}/steps",
        "listRunSteps",
        "The run's steps, in the order they started",
        "runs",
        {200: StepRunPage},
        query=RunStepsQuery,
    ),
    Op(
        "GET",
        "/api/v1/runs/{run_id}/events",
        "listRunEvents",
        "The run's events after `?after=seq`, in `seq` order",
        "runs",
        {200: RunEventPage},
        query=RunEventsQuery,
    ),
    Op(
        "POST",
        "/api/v1/runs/{run_id}/cancel",
        "cancelRun",
        "Cancel a run that has not finished",
        "runs",
        {200: Run},
        errors=(409,),
        notes={409: "The run has already finished."},
    ),
    Op(
        "POST",
        "/api/v1/runs/{run_id}/resume",
        "resumeRun",
        "Approve or reject a waiting approval step",
        "runs",
        {200: Run},
        errors=(409,),
        notes={409: "The step is not waiting for an approval."},
        body=RunResume,
    ),
    Op(
        "POST",
        "/api/v1/runs/{run_id}/retry",
        "retryRun",
        "Retry a failed run",
        "runs",
        {200: Run, 201: Run},
        errors=(403, 409),
        notes={
            200: "`fromFailed`: the same run, reopened (`queued`).",
            201: "`fromStart`: a new run with `triggerType: retry` and `retryOf`.",
            403: "The plan's monthly runs are used up (`quota-exceeded`).",
            409: "Only a failed run can be retried.",
        },
        body=RunRetry,
    ),
    # usage
    Op(
        "GET",
        "/api/v1/flows/{flow_id}/stats",
        "getFlowStats",
        "Executions of a flow: outcomes, average and p95 duration, the last one",
        "flows",
        {200: FlowStats},
        description=(
            "From metered run events (eventually consistent, usually within a second). `executionsTotal` counts "
            "every run of the flow (children of subflow/foreach steps too), running ones included; `succeeded`, "
            "`failed`, `cancelled`, `timedOut` count finished runs by their latest outcome; durations are over "
            "finished runs; `lastExecutedAt` is when the latest run was queued."
        ),
    ),
    Op(
        "GET",
        "/api/v1/usage",
        "getUsage",
        "The tenant's usage in a billing period against its plan",
        "usage",
        {200: UsageSummary},
        description=(
            "Billing periods are calendar months (UTC); `periodEnd` is the first instant of the next month. "
            "`runsUsed` counts top-level runs started (a retry in place is not a new run; children of "
            "subflow/foreach steps are not counted); `stepsUsed` finished steps but the trigger; `tokensUsed` the "
            "input and output tokens of `llm` steps. `estimatedOverage` is in USD, pro rata to the cent. Metering "
            "follows run events, usually within a second."
        ),
        query=UsageQuery,
    ),
    Op(
        "GET",
        "/api/v1/usage/export",
        "exportUsage",
        "Metered usage per day, for a billing system",
        "usage",
        {200: Raw({"application/json": UsageExport, "text/csv": {"type": "string"}})},
        notes={200: "The days with usage, oldest first: JSON, or CSV (RFC 4180, a header line) with `format=csv`."},
        description="Days are UTC. By default, this month up to today; at most 366 days per request.",
        query=UsageExportQuery,
    ),
    Op(
        "GET",
        "/api/v1/api-keys",
        "listApiKeys",
        "Stored LLM provider keys (never shown whole)",
        "usage",
        {200: ApiKeyList},
    ),
    Op(
        "POST",
        "/api/v1/api-keys",
        "putApiKey",
        "Store a provider's key, replacing the one before",
        "usage",
        {201: ApiKeyInfo},
        notes={201: "Stored (encrypted); only `keyHint`, its last four characters, is ever shown."},
        description=(
            "`llm` steps use the tenant's key of their `provider`. A key must be printable ASCII without spaces."
        ),
        body=ApiKeyCreate,
    ),
    Op(
        "DELETE",
        "/api/v1/api-keys/{provider}",
        "deleteApiKey",
        "Forget a provider's key",
        "usage",
        {204: NO_BODY},
        notes={404: "No key of this provider is stored."},
    ),
    Op(
        "PUT",
        "/api/v1/admin/tenants/{tenant_id}/plan",
        "setTenantPlan",
        "Give a tenant a plan (platform admins only)",
        "usage",
        {200: TenantPlan},
        errors=(403,),
        notes={403: "The token's role is not `admin`."},
        description="Creates the tenant's record if it has none. Rate limits follow within a minute.",
        body=PlanAssignment,
    ),
    # live
    Op(
        "POST",
        "/api/v1/ws-tickets",
        "createWsTicket",
        "A single-use, 30-second credential for a browser's WebSocket (`?ticket=`)",
        "live",
        {201: WsTicket},
        calls_service=False,
    ),
    Op(
        "GET",
        "/ws/runs/{run_id}",
        "watchRun",
        "Live run: a snapshot, then every event (WebSocket)",
        "live",
        {101: NO_BODY},
        errors=(400, 401, 403, 404),
        notes={
            101: "Switching to the WebSocket protocol `flowmesh.v1`.",
            400: "`after` is not an integer ≥ 0.",
            401: "No credentials, or an invalid token or ticket.",
            403: "The `Origin` is not allowed.",
        },
        description=_WS_DESCRIPTION.format(
            sub=SUBPROTOCOL,
            bearer=BEARER_PREFIX,
            messages=(
                "without `after`, first `WsSnapshot` (`{type: snapshot, run, steps, seq}`), then `WsEvent` "
                "(`{type: event, seq, event}`) for every event with a greater `seq`; with `?after=k`, no snapshot, "
                "every event after `k` from history then live — never a gap or a duplicate"
            ),
        ),
        query=None,
        headers=("SecWebSocketProtocol",),
        websocket=True,
    ),
    Op(
        "GET",
        "/ws/flows/{flow_id}",
        "watchFlow",
        "Live flow: every event of every run of the flow (WebSocket)",
        "live",
        {101: NO_BODY},
        errors=(400, 401, 403, 404),
        notes={
            101: "Switching to the WebSocket protocol `flowmesh.v1`.",
            400: "`since` is not an RFC 3339 time with a zone.",
            401: "No credentials, or an invalid token or ticket.",
            403: "The `Origin` is not allowed.",
        },
        description=_WS_DESCRIPTION.format(
            sub=SUBPROTOCOL,
            bearer=BEARER_PREFIX,
            messages=(
                "`WsEvent` (`{type: event, seq, event}`, the event carries its `runId`) for every event of every "
                "run of the flow from the moment of connecting; `?since=` first replays the history from then"
            ),
        ),
        headers=("SecWebSocketProtocol",),
        websocket=True,
    ),
)
"""Every documented route. A route the app serves without an entry here is an error."""

HAND_READ_QUERY: Final[Mapping[tuple[str, str], tuple[JsonSchema, ...]]] = {
    ("GET", "/ws/runs/{run_id}"): (
        {
            "name": "after",
            "in": "query",
            "required": False,
            "description": "Replay the events after this `seq` instead of sending a snapshot.",
            "schema": {"type": "integer", "minimum": 0, "maximum": MAX_INT4},
        },
    ),
    ("GET", "/ws/flows/{flow_id}"): (
        {
            "name": "since",
            "in": "query",
            "required": False,
            "description": "First replay the flow's events since this time (RFC 3339 with a zone).",
            "schema": {"type": "string", "format": "date-time"},
        },
    ),
    ("DELETE", "/api/v1/flows/{flow_id}"): (
        {
            "name": "force",
            "in": "query",
            "required": False,
            "description": "Also delete a published flow: deactivates it, keeps its run history.",
            "schema": {"type": "boolean", "default": False},
        },
    ),
}
"""Query parameters a handler reads by hand rather than through a contract model."""

NOT_DOCUMENTED: Final[Mapping[tuple[str, str], str]] = {
    ("GET", "/docs/static/{name}"): "the docs page's own assets (Swagger UI's script, style and icons)",
}
"""Routes deliberately left out of the document, with the reason."""

IMPLICIT_METHODS: Final = frozenset({"HEAD", "OPTIONS"})
"""aiohttp adds HEAD to every GET; OPTIONS is CORS preflight: neither is an operation of its own."""

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
    "tenant_id": (
        "tenantId",
        {"type": "string", "minLength": 1, "maxLength": 255},
        "The tenant's id (its `tenant` claim).",
    ),
}
"""Every path parameter name a route may use: its OpenAPI name, schema and meaning."""

_PARAM = re.compile(r"\{([^}:]+)(?::[^}]*)?\}")

ERRORS: Final[Mapping[int, tuple[str, str]]] = {
    400: ("BadRequest", "The request cannot be read (a body sent as JSON that is not valid JSON)."),
    401: ("Unauthorized", "No valid credentials: a missing, expired or invalid bearer token."),
    403: ("Forbidden", "Valid credentials, but not allowed."),
    404: ("NotFound", "No such resource for this tenant (another tenant's resource answers the same)."),
    409: ("Conflict", "The resource's state does not allow the operation."),
    412: ("PreconditionFailed", "`If-Match` does not match the current `ETag`."),
    413: ("PayloadTooLarge", "The body is over 1 MiB."),
    415: ("UnsupportedMediaType", "The body is not JSON and was not sent as JSON."),
    422: ("ValidationError", "The input is not valid (unknown fields too); `errors` says where, as JSON pointers."),
    429: ("RateLimited", "Too many requests for the tenant's plan; retry after `Retry-After` seconds."),
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
    {"name": "operations", "description": "Health, readiness, metrics and this documentation."},
)

HEADER_PARAMS: Final[Mapping[str, JsonSchema]] = {
    "IdempotencyKey": {
        "name": "Idempotency-Key",
        "in": "header",
        "required": False,
        "description": "Makes a retry safe: the first response is kept 24 h per (tenant, route); the same key with "
        "the same body gets it again, with another body a 422, while the first is in flight a 409. An empty key "
        "counts as none.",
        "schema": {"type": "string", "maxLength": 255},
    },
    "IfMatch": {
        "name": "If-Match",
        "in": "header",
        "required": False,
        "description": "The `ETag` the change is based on; a stale one is a 412 (no lost updates).",
        "schema": {"type": "string"},
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
        "schema": {"type": "string"},
    },
    "WebhookSignature": {
        "name": "webhook-signature",
        "in": "header",
        "required": False,
        "description": 'Standard Webhooks: `v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`, several '
        "space-separated during a secret rotation. Required by signed triggers.",
        "schema": {"type": "string"},
    },
    "SecWebSocketProtocol": {
        "name": "Sec-WebSocket-Protocol",
        "in": "header",
        "required": False,
        "description": f"`{SUBPROTOCOL}, {BEARER_PREFIX}<token>` (or use `?ticket=`).",
        "schema": {"type": "string"},
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


class UndocumentedRoute(LookupError):
    """The application serves a route that :data:`OPERATIONS` does not describe."""


# --- building ---------------------------------------------------------------------------------------


class _Schemas(GenerateJsonSchema):
    """Pydantic's JSON Schema without a title on every field (``"title": "Flowid"`` helps nobody)."""

    def field_title_should_be_set(self, schema: Any) -> bool:
        return False


def app_operations(app: web.Application) -> set[tuple[str, str]]:
    """Every (method, path) the application routes, less implicit methods and deliberately undocumented ones."""
    found: set[tuple[str, str]] = set()
    for route in app.router.routes():
        info = route.resource.canonical if route.resource is not None else None
        if info is None or route.method in IMPLICIT_METHODS:
            continue
        key = (route.method, info)
        if key not in NOT_DOCUMENTED:
            found.add(key)
    return found


def build_openapi(app: web.Application | None = None, *, ops: tuple[Op, ...] = OPERATIONS) -> dict[str, Any]:
    """The OpenAPI 3.1 document of ``app``'s routes (of every entry when ``app`` is None).

    Raises:
        UndocumentedRoute: the application serves a route without an entry in ``ops``.
    """
    by_key = {(op.method, op.path): op for op in ops}
    if len(by_key) != len(ops):
        raise ValueError("two operation entries share a (method, path)")
    if app is not None:
        missing = sorted(app_operations(app) - by_key.keys())
        if missing:
            raise UndocumentedRoute(
                "routes without an OpenAPI entry in flowmesh.gateway.openapi.OPERATIONS: "
                + ", ".join(f"{m} {p}" for m, p in missing)
            )
        served = app_operations(app)
        selected = [op for op in ops if (op.method, op.path) in served]
    else:
        selected = list(ops)

    refs, defs = _model_schemas(selected)
    paths: dict[str, dict[str, Any]] = {}
    for op in selected:
        paths.setdefault(_openapi_path(op.path), {})[op.method.lower()] = _operation(op, refs)
    used_errors = sorted({s for op in selected for s in _error_statuses(op)})
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
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
        },
        "tags": list(TAGS),
        "security": [{"bearerAuth": []}],
        "paths": dict(sorted(paths.items())),
        "components": {
            "schemas": defs,
            "responses": {
                ERRORS[s][0]: {
                    "description": ERRORS[s][1],
                    "content": {PROBLEM_JSON: {"schema": refs[(Problem, "serialization")]}},
                    **({"headers": {"Retry-After": {"$ref": "#/components/headers/RetryAfter"}}} if s == 429 else {}),
                }
                for s in used_errors
            },
            "parameters": HEADER_PARAMS,
            "headers": RESPONSE_HEADERS,
            "securitySchemes": {
                "bearerAuth": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"},
                "wsTicket": {
                    "type": "apiKey",
                    "in": "query",
                    "name": "ticket",
                    "description": "A ticket from `POST /api/v1/ws-tickets` (WebSocket handshakes only); or offer "
                    f"the subprotocol `{BEARER_PREFIX}<token>`, which OpenAPI cannot describe.",
                },
            },
        },
    }


def _model_schemas(ops: list[Op]) -> tuple[dict[tuple[type[BaseModel], JsonSchemaMode], JsonSchema], JsonSchema]:
    """JSON Schemas of every model the operations use, in one ``components.schemas`` namespace."""
    wanted: set[tuple[type[BaseModel], JsonSchemaMode]] = {(Problem, "serialization")}
    bodies: set[type[BaseModel]] = set()
    for op in ops:
        if isinstance(op.body, type):
            wanted.add((op.body, "validation"))
            bodies.add(op.body)
        wanted.update((r, "serialization") for r in op.responses.values() if isinstance(r, type))
        wanted.update(
            (m, "serialization")
            for r in op.responses.values()
            if isinstance(r, Raw)
            for m in r.content.values()
            if isinstance(m, type)
        )
        if op.websocket:
            wanted.update({(WsSnapshot, "serialization"), (WsEvent, "serialization")})
    ordered = sorted(wanted, key=lambda m: (m[0].__name__, m[1]))
    refs, top = models_json_schema(
        ordered, by_alias=True, ref_template="#/components/schemas/{model}", schema_generator=_Schemas
    )
    defs: JsonSchema = top.get("$defs", {})
    for model in bodies:
        # HTTP bodies are read strictly: unknown top-level fields are a 422 (DESIGN §3)
        name = refs[(model, "validation")]["$ref"].rsplit("/", 1)[1]
        defs[name] = {**defs[name], "additionalProperties": False}
    typed = {(m, mode): ref for (m, mode), ref in refs.items() if issubclass(m, BaseModel)}
    return typed, dict(sorted(defs.items()))


def _openapi_path(path: str) -> str:
    return _PARAM.sub(lambda m: "{" + _path_param(m.group(1))[0] + "}", path)


def _path_param(name: str) -> tuple[str, JsonSchema, str]:
    try:
        return PATH_PARAMS[name]
    except KeyError:
        raise UndocumentedRoute(f"path parameter {{{name}}} has no entry in PATH_PARAMS") from None


def _path_names(path: str) -> list[str]:
    return _PARAM.findall(path)


def _idempotent(op: Op) -> bool:
    """Every authenticated POST honours ``Idempotency-Key`` (the gateway's ``idempotent`` middleware)."""
    return op.method == "POST" and op.path.startswith(API_PREFIX) and not op.public


def _error_statuses(op: Op) -> list[int]:
    statuses = set(op.errors)
    if op.path.startswith(API_PREFIX):
        statuses.add(429)
        if not op.public:
            statuses.add(401)
    if op.calls_service:
        statuses.update((503, 504))
    if _path_names(op.path):
        statuses.add(404)
    if isinstance(op.body, type):
        statuses.update(FLOW_BODY_ERRORS)
    if op.query is not None:
        statuses.add(422)
    if _idempotent(op):
        statuses.update((400, 409, 422, 503))
    if op.if_match:
        statuses.add(412)
    return sorted(statuses)


def _operation(op: Op, refs: Mapping[tuple[type[BaseModel], JsonSchemaMode], JsonSchema]) -> dict[str, Any]:
    doc: dict[str, Any] = {"operationId": op.operation_id, "summary": op.summary, "tags": [op.tag]}
    if op.description:
        doc["description"] = op.description
    params = _parameters(op)
    if params:
        doc["parameters"] = params
    if op.body is not None:
        doc["requestBody"] = _request_body(op.body, refs)
    responses: dict[str, Any] = {}
    for status, body in sorted(op.responses.items()):
        responses[str(status)] = _success(op, status, body, refs)
    for status in _error_statuses(op):
        if str(status) in responses:
            continue
        if status in op.notes:
            responses[str(status)] = {
                "description": op.notes[status],
                "content": {PROBLEM_JSON: {"schema": refs[(Problem, "serialization")]}},
                **({"headers": {"Retry-After": {"$ref": "#/components/headers/RetryAfter"}}} if status == 429 else {}),
            }
        else:
            responses[str(status)] = {"$ref": f"#/components/responses/{ERRORS[status][0]}"}
    doc["responses"] = dict(sorted(responses.items()))
    if op.public:
        doc["security"] = []
    elif op.websocket:
        doc["security"] = [{"wsTicket": []}]
    return doc


def _parameters(op: Op) -> list[JsonSchema]:
    params: list[JsonSchema] = []
    names = _path_names(op.path)
    for name in names:
        public_name, schema, description = _path_param(name)
        params.append(
            {"name": public_name, "in": "path", "required": True, "description": description, "schema": schema}
        )
    if op.query is not None:
        params.extend(_query_params(op.query, exclude=set(names)))
    params.extend(HAND_READ_QUERY.get((op.method, op.path), ()))
    headers = (*op.headers, *(("IdempotencyKey",) if _idempotent(op) else ()), *(("IfMatch",) if op.if_match else ()))
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


def _request_body(
    body: type[BaseModel] | Raw, refs: Mapping[tuple[type[BaseModel], JsonSchemaMode], JsonSchema]
) -> JsonSchema:
    if isinstance(body, Raw):
        return {"required": False, "content": _raw_content(body, refs)}
    required = any(f.is_required() for f in body.model_fields.values())
    return {"required": required, "content": {"application/json": {"schema": refs[(body, "validation")]}}}


def _success(
    op: Op, status: int, body: Body, refs: Mapping[tuple[type[BaseModel], JsonSchemaMode], JsonSchema]
) -> JsonSchema:
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


def _raw_content(body: Raw, refs: Mapping[tuple[type[BaseModel], JsonSchemaMode], JsonSchema]) -> JsonSchema:
    return {
        media: {"schema": refs[(schema, "serialization")] if isinstance(schema, type) else schema}
        for media, schema in body.content.items()
    }


def dumps(document: Mapping[str, Any]) -> str:
    """The committed form: pretty-printed, keys sorted, a trailing newline."""
    return json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def main() -> None:
    """Print the document of the gateway as ``create_app`` builds it (no NATS or PostgreSQL needed)."""
    from flowmesh.gateway.app import create_app
    from flowmesh.gateway.settings import GatewaySettings

    app = create_app(GatewaySettings(env="dev", jwt_secret="openapi-" + "x" * 32))
    sys.stdout.write(dumps(build_openapi(app)))


if __name__ == "__main__":
    main()
