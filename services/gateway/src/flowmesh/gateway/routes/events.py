"""``POST /api/v1/events/{eventType}``: an external event over HTTP, for clients that do not speak NATS.

The event goes where an integrator's NATS publish goes, ``fm.events.{t}.{eventType}`` in the
``EVENTS`` stream, with the headers every message carries; the runner then starts the flows with
an ``event`` trigger for the type and resumes the ``waitEvent`` steps waiting for it. The answer
comes once JetStream has acknowledged the event, so a 202 means it is stored.
"""

from __future__ import annotations

import json
import logging
import uuid
from typing import Any, Final

from aiohttp import web
from nats.errors import Error as NatsError

from flowmesh.contracts import headers, subjects
from flowmesh.contracts.errors import InvalidInput, ServiceUnavailable
from flowmesh.contracts.ids import new_id
from flowmesh.contracts.models import FieldError
from flowmesh.contracts.models.runs import EventAccepted
from flowmesh.gateway import idempotency, keys
from flowmesh.gateway.body import MESSAGE_HEADROOM, check_fits, read_json
from flowmesh.gateway.openapi.operation import Operation, Raw
from flowmesh.gateway.routes.common import json_response

log = logging.getLogger(__name__)

routes = web.RouteTableDef()

EVENT_IDS: Final = uuid.UUID("0193f1a2-7c3e-7b6d-9a41-5e0c2f8d4b17")
"""Namespace of the name-based event ids of requests that carry an ``Idempotency-Key``."""


def event_id(tenant: str, key: str | None, fingerprint: str) -> str:
    """The id of an event, which is also its ``Nats-Msg-Id``.

    Without an ``Idempotency-Key``: a new UUIDv7. With one: a name-based UUID of the tenant, the key
    and the request's fingerprint, so every attempt of the same request (a retry after a 5xx, which
    the gateway's idempotency store forgets; a retry reaching another replica) publishes under the
    same id and JetStream keeps one copy within its duplicate window.
    """
    if key is None:
        return new_id()
    return str(uuid.uuid5(EVENT_IDS, f"{tenant}\n{key}\n{fingerprint}"))


def checked_event_type(value: str) -> str:
    """The path's ``eventType`` when it is one safe subject part (tokens of ``[A-Za-z0-9_-]`` joined by dots).

    Raises:
        InvalidInput: anything else; a ``*``, ``>`` or empty token would widen or break the subject.
    """
    if not subjects.is_safe_subject_part(value):
        message = "must be 1 to 64 characters of A-Z, a-z, 0-9, _ and -, or such tokens joined by dots (at most 255)"
        raise InvalidInput(f"eventType {message}", errors=[FieldError(path="/eventType", message=message)])
    return value


@routes.post("/api/v1/events/{event_type}")
@Operation(
    "publishEvent",
    "Publish an external event, as an integrator does on fm.events",
    tag="events",
    responses={202: EventAccepted},
    errors=(413, 415, 422, 503, 504),
    notes={
        202: "Stored in the `EVENTS` stream (JetStream acknowledged it): flows with an `event` trigger for the "
        "type start, and `waitEvent` steps waiting for it resume. A repeat with the same `Idempotency-Key` "
        "gets the same `eventId` and publishes nothing.",
        400: "A body sent as JSON that is not valid JSON, or a header that is not UTF-8.",
        413: "The body is over 1 MiB, or too large for a run's input once it starts a flow.",
        415: "A body that is not JSON and was not sent as JSON.",
        422: "An `eventType` that is not a safe subject part; a body nested over 64 levels, holding a NUL "
        "character or a number that is not finite; or an `Idempotency-Key` used for another request.",
        504: "The request took longer than the gateway's limit; the event may or may not be stored: retry "
        "with the same `Idempotency-Key`.",
        503: "NATS did not acknowledge the event: it may or may not be stored; retry with the same `Idempotency-Key`.",
    },
    description=(
        "The same as publishing the body on `fm.events.{tenant}.{eventType}` over NATS (see "
        "`docs/integrators.md`): the tenant is the token's. Any JSON value is an event; an empty body is `{}`. "
        "The message carries `Flowmesh-Tenant`, `Flowmesh-Schema`, the request's `traceparent` and "
        "`Nats-Msg-Id` = `eventId`."
    ),
    calls_service=False,
    body=Raw({"application/json": {"description": "The event: any JSON value, the input of the runs it starts."}}),
)
async def publish_event(request: web.Request) -> web.Response:
    """Publish the body as an event of the token's tenant; 202 ``{eventId}`` once JetStream has it."""
    event_type = checked_event_type(request.match_info["event_type"])
    doc = await read_json(request)
    limit = request.app[keys.BROKER].connection.max_payload - MESSAGE_HEADROOM
    check_fits(doc, limit, "the event")
    principal = request[keys.PRINCIPAL]
    raw_key = request.headers.get(idempotency.KEY_HEADER, "").strip()
    fp = idempotency.fingerprint(request.method, request.path, request.query.items(), await request.read())
    eid = event_id(principal.tenant, raw_key or None, fp)
    await _publish(request, subjects.external_event(principal.tenant, event_type), doc, eid)
    return json_response(EventAccepted(event_id=eid).model_dump(by_alias=True), status=202)


async def _publish(request: web.Request, subject: str, doc: Any, eid: str) -> None:
    """Publish with JetStream and wait for its acknowledgement."""
    settings = request.app[keys.SETTINGS]
    hdrs = {
        headers.TENANT: request[keys.PRINCIPAL].tenant,
        headers.SCHEMA: headers.SCHEMA_VERSION,
        headers.TRACEPARENT: request[keys.TRACEPARENT],
        headers.MSG_ID: eid,
    }
    payload = json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()
    try:
        await request.app[keys.JETSTREAM].publish(subject, payload, timeout=settings.rpc_timeout_s, headers=hdrs)
    except (NatsError, TimeoutError) as exc:
        log.warning("event %s on %s not acknowledged: %r", eid, subject, exc)
        raise ServiceUnavailable("the event could not be stored; retry with the same Idempotency-Key") from exc
