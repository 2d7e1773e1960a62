"""``POST /api/v1/hooks/{token}``: public webhooks start runs, no JWT.

The token decides the tenant. Checks, in order: the token names a webhook (404), the body is
within the limit (413), a signed trigger's signature and timestamp (401), the trigger and its
flow accept deliveries (409); then the runner starts the run, keyed by ``webhook-id`` when given
so that a redelivery answers the first run and starts none.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from typing import Any, Final

from aiohttp import web

from flowmesh.contracts.errors import NotFound, PayloadTooLarge
from flowmesh.contracts.models.rpc import StartRun, WebhookLookup, WebhookTarget
from flowmesh.contracts.models.runs import RunAccepted
from flowmesh.contracts.subjects import FLOWS_EVENTS_ALL, FlowsOp, RunsOp
from flowmesh.gateway import keys, webhooks
from flowmesh.gateway.body import MESSAGE_HEADROOM, check_fits
from flowmesh.gateway.hookcache import HookCache
from flowmesh.gateway.openapi.operation import Operation, Raw
from flowmesh.gateway.routes.common import json_response
from flowmesh.gateway.webhooks import Hook

log = logging.getLogger(__name__)

LOOKUP_TTL_S: Final = 2.0
"""How long a token's lookup is reused: a backstop, as flow announcements drop entries at once."""

routes = web.RouteTableDef()


@routes.post("/api/v1/hooks/{token}")
@Operation(
    "deliverWebhook",
    "Start a run from a webhook (no JWT: the URL's token is the credential)",
    tag="triggers",
    responses={202: RunAccepted},
    errors=(400, 401, 403, 404, 409, 413, 415, 422, 429),
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
        429: "Over the plan's webhook deliveries per second (a bucket apart from the API's requests), or, from "
        "one client address, too many lookups of unknown webhook URLs; retry after `Retry-After` seconds.",
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
)
async def deliver(request: web.Request) -> web.Response:
    """Accept one delivery: 202 ``{runId}`` (the same run again for a redelivered ``webhook-id``)."""
    hook = await _hook(request, request.match_info["token"])
    # a bucket of their own: a flood on a webhook URL cannot lock its tenant out of the API
    await request.app[keys.WEBHOOK_LIMITER].admit(hook.tenant_id)
    raw = await _body(request)
    msg_id = _delivery_id(request, hook, raw)
    hook.check_accepting()
    result = await request.app[keys.RPC].call(
        RunsOp.START,
        _start_run(request, hook, raw, msg_id),
        tenant=hook.tenant_id,
        sub=f"webhook:{hook.trigger_id}",
        traceparent=request[keys.TRACEPARENT],
    )
    return json_response({"runId": result["run"]["id"]}, status=202)


def _delivery_id(request: web.Request, hook: Hook, raw: bytes) -> str | None:
    """The delivery's ``webhook-id``; a signed trigger's signature and timestamp are checked first (401)."""
    if not hook.signed:
        return webhooks.delivery_id(request.headers.get(webhooks.WEBHOOK_ID))
    return webhooks.verify(
        hook.keys,
        msg_id=request.headers.get(webhooks.WEBHOOK_ID),
        timestamp=request.headers.get(webhooks.WEBHOOK_TIMESTAMP),
        signature=request.headers.get(webhooks.WEBHOOK_SIGNATURE),
        body=raw,
        now=time.time(),
    )


def _start_run(request: web.Request, hook: Hook, raw: bytes, msg_id: str | None) -> StartRun:
    """The run to start: the delivery as ``{body, headers, query}``, keyed by its ``webhook-id`` when given."""
    run_input = webhooks.run_input(
        webhooks.parse_body(raw, request.content_type, request.charset),
        webhooks.safe_headers(request.headers.items()),
        webhooks.query_values(request.query.items()),
    )
    check_fits(
        run_input,
        request.app[keys.BROKER].connection.max_payload - MESSAGE_HEADROOM,
        "the run input (body, headers and query)",
    )
    return StartRun(
        flow_id=hook.flow_id,
        input=run_input,
        idempotency_key=webhooks.idempotency_key(hook.trigger_id, msg_id),
        trigger_type="webhook",
        trigger_id=hook.trigger_id,
    )


HOOKS: Final = web.AppKey("hooks", HookCache)


async def _hook(request: web.Request, token: str) -> Hook:
    """The trigger behind a token, from the cache or the flows service."""
    if not webhooks.plausible_token(token):
        raise webhooks.not_found()

    unknown = request.app[keys.UNKNOWN_HOOKS]
    address = request.remote or ""

    async def ask() -> Hook:
        unknown.check(address)  # an address that looked up too many unknown tokens waits (429)
        try:
            found = await request.app[keys.RPC].call(
                FlowsOp.WEBHOOK, WebhookLookup(token=token), tenant="", traceparent=request[keys.TRACEPARENT]
            )
        except NotFound as exc:
            unknown.spend(address)
            raise webhooks.not_found() from exc
        return Hook.of(WebhookTarget.model_validate(found))

    return await request.app[HOOKS].get(token, ask)


async def _body(request: web.Request) -> bytes:
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge as exc:
        raise PayloadTooLarge(
            f"the body is over the limit of {request.app[keys.SETTINGS].max_body_bytes} bytes; "
            "send a smaller payload (or a reference to it)"
        ) from exc


async def _watch_flows(app: web.Application) -> AsyncIterator[None]:
    """Drop cached lookups of a flow as soon as the flows service announces a change to it."""
    cache = app[HOOKS]
    subscriber = app[keys.BROKER].subscriber(
        FLOWS_EVENTS_ALL, persistent=False, no_reply=True
    )  # every replica: no queue

    @subscriber
    async def flow_changed(body: Any) -> None:
        flow_id = body.get("flowId") if isinstance(body, dict) else None
        if isinstance(flow_id, str):
            cache.forget_flow(flow_id)

    await subscriber.start()
    try:
        yield
    finally:
        await subscriber.stop()


def setup(app: web.Application) -> None:
    """Add the webhook route, its lookup cache and the cache's invalidation (after NATS connects)."""
    app[HOOKS] = HookCache(ttl_s=LOOKUP_TTL_S)
    app.cleanup_ctx.append(_watch_flows)
    app.add_routes(routes)
