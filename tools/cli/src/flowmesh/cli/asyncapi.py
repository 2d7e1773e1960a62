"""The AsyncAPI 3.0 document of Flowmesh's public NATS subjects, built from the contracts.

``python -m flowmesh.cli.asyncapi`` prints it; ``make asyncapi`` writes it to ``docs/api/asyncapi.yaml``
(a test keeps the two equal, another validates the file with the official ``@asyncapi/parser``).

Every subject, stream, header name, pattern and payload schema comes from ``flowmesh.contracts``:
addresses are made by the subject builders themselves (called with a stand-in token per parameter),
a channel's stream is the one whose subjects hold an example subject, the integrator's permissions are
``integrator_permissions``' own, and schemas are the pydantic models' JSON Schemas (run event
examples are written by the models too). What is written here is prose, example values, and two
patterns the contracts do not state (a UUID's, a W3C ``traceparent``'s).

The document describes Flowmesh, the application, as AsyncAPI 3.0's ``action`` does: ``send`` is
what Flowmesh publishes and an integrator reads, ``receive`` is what an integrator publishes and
Flowmesh consumes.
"""

from __future__ import annotations

import re
import sys
import textwrap
from collections.abc import Callable, Iterable
from typing import Any, Final
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel
from pydantic.json_schema import GenerateJsonSchema, models_json_schema

from flowmesh.contracts import headers, permissions, streams, subjects
from flowmesh.contracts.models.run_events import (
    EVENT_DATA,
    EventData,
    RunFailedData,
    RunFailure,
    RunQueuedData,
    StepError,
    StepRetryingData,
    StepSucceededData,
    TokenUsage,
)
from flowmesh.contracts.models.runs import RUN_EVENT_TYPES, RunEvent
from flowmesh.contracts.streams import StreamSpec
from flowmesh.runtime.settings import BaseServiceSettings

ASYNCAPI_VERSION: Final = "3.0.0"
WIDTH: Final = 100
"""Where the YAML's prose wraps."""
JsonSchema = dict[str, Any]

UUID_PATTERN: Final = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
"""Flow and run ids as Flowmesh writes them (``contracts.ids.new_id``: UUIDv7, lower case)."""
TRACEPARENT_PATTERN: Final = r"^00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$"
"""A W3C Trace Context ``traceparent`` of version 00."""

EXAMPLE_TENANT: Final = "acme"
"""The tenant of the example subjects that tell which stream and which permission hold a channel."""
TENANT_MARK: Final = "--tenant--"
"""A safe subject token standing for ``{tenant}`` where a contract builder needs a tenant id."""

EVENTS_CHANNEL: Final = "externalEvents"
RUNS_CHANNEL: Final = "runEvents"
OUT_CHANNEL: Final = "outMessages"
EXTERNAL_EVENT: Final = "externalEvent"
OUT_MESSAGE: Final = "outMessage"


class _Schemas(GenerateJsonSchema):
    """Pydantic's JSON Schema without a title on every field (``"title": "Flowid"`` helps nobody)."""

    def field_title_should_be_set(self, schema: Any) -> bool:
        return False


def _ref(section: str, name: str) -> JsonSchema:
    return {"$ref": f"#/components/{section}/{name}"}


def _markdown(text: str) -> str:
    """Docstring markup (code in double backquotes) as the Markdown AsyncAPI descriptions use."""
    return re.sub(r"``([^`]+)``", r"`\1`", text)


# --- addresses and parameters ----------------------------------------------------------------------


def address(build: Callable[..., str], *params: str) -> str:
    """The channel address ``build`` makes, with ``{param}`` where each argument goes.

    Each parameter is passed as a stand-in that is a safe subject token (so ``tenant_token`` keeps
    it as it is) and replaced in the result: the address is the builder's, not a copy of it.
    """
    marks = {f"--{name}--": f"{{{name}}}" for name in params}
    subject = build(*marks)
    for mark, param in marks.items():
        if subject.count(mark) != 1:
            raise ValueError(f"{build.__name__} does not place its argument {param} once: {subject}")
        subject = subject.replace(mark, param)
    return subject


def _tenant_parameter() -> JsonSchema:
    return {
        "description": (
            "The tenant token: the tenant id itself when it is one safe token, else a stable hash of it "
            "(`flowmesh.contracts.subjects.tenant_token`), so no id can break or widen a subscription. "
            f"Matches `{subjects.SAFE_TOKEN_PATTERN}`."
        ),
        "examples": [subjects.tenant_token(EXAMPLE_TENANT), subjects.tenant_token("user@example.com")],
        "x-pattern": subjects.SAFE_TOKEN_PATTERN,
    }


def _subject_part_parameter(what: str, example: str) -> JsonSchema:
    return {
        "description": (
            f"{what} Safe tokens joined by dots (a part may span several subject tokens), "
            f"at most {subjects.MAX_SUBJECT_PART} characters: matches `{subjects.SAFE_SUBJECT_PART_PATTERN}`, "
            "checked when a flow is validated."
        ),
        "examples": [example],
        "x-pattern": subjects.SAFE_SUBJECT_PART_PATTERN,
    }


def _id_parameter(what: str, field: str) -> JsonSchema:
    return {
        "description": f"The {what} id, a UUIDv7 (the event's `{field}`). Matches `{UUID_PATTERN}`.",
        "location": f"$message.payload#/{field}",
        "x-pattern": UUID_PATTERN,
    }


def integrator_grant(example: str, *, publish: bool) -> str:
    """The integrator permission (with ``{tenant}``) that lets tenant ``EXAMPLE_TENANT`` use ``example``."""
    ours = permissions.integrator_permissions(EXAMPLE_TENANT)
    marked = permissions.integrator_permissions(TENANT_MARK)
    pairs = (
        zip(ours.publish, marked.publish, strict=True)
        if publish
        else zip(ours.subscribe, marked.subscribe, strict=True)
    )
    for grant, template in pairs:
        if subject_matches(grant, example):
            return template.replace(TENANT_MARK, "{tenant}")
    raise ValueError(f"no integrator may {'publish' if publish else 'subscribe'} to {example}")


# --- streams -------------------------------------------------------------------------------------


def subject_matches(filter_subject: str, subject: str) -> bool:
    """Whether a NATS filter (``*`` one token, ``>`` one or more trailing tokens) holds ``subject``."""
    want, have = filter_subject.split("."), subject.split(".")
    for i, token in enumerate(want):
        if token == ">":
            return len(have) > i
        if i >= len(have) or token not in ("*", have[i]):
            return False
    return len(want) == len(have)


def stream_of(subject: str) -> StreamSpec:
    """The one JetStream stream of the mesh whose subjects hold ``subject``."""
    found = [s for s in streams.ALL_STREAMS if any(subject_matches(f, subject) for f in s.subjects)]
    if len(found) != 1:
        raise ValueError(f"{subject} is on {len(found)} streams, not one")
    return found[0]


def _duration(seconds: float) -> str:
    if seconds <= 0:
        return "no age limit"
    days, rest = divmod(int(seconds), 24 * 3600)
    return f"{days} days" if days and not rest else f"{int(seconds)} s"


def _stream_extension(spec: StreamSpec) -> JsonSchema:
    return {
        "stream": spec.name,
        "subjects": list(spec.subjects),
        "retention": spec.retention,
        "maxAgeSeconds": int(spec.max_age_s),
        "duplicateWindowSeconds": int(spec.duplicate_window_s),
        "description": spec.description,
    }


def _stream_sentence(spec: StreamSpec) -> str:
    return (
        f"Stored in the JetStream stream `{spec.name}` ({spec.description}): retention `{spec.retention}`, "
        f"messages kept {_duration(spec.max_age_s)}, duplicates (same `{headers.MSG_ID}`) dropped within "
        f"{_duration(spec.duplicate_window_s)}."
    )


# --- headers -------------------------------------------------------------------------------------


def _header(description: str, **schema: Any) -> JsonSchema:
    return {"type": "string", **schema, "description": description}


def _traceparent(description: str = "W3C trace context of the work that caused the message; optional.") -> JsonSchema:
    return _header(description, pattern=TRACEPARENT_PATTERN)


def _sent_headers() -> JsonSchema:
    """The headers of what Flowmesh publishes (run events, ``publish`` steps' messages)."""
    return {
        "type": "object",
        "description": "Headers of every message Flowmesh publishes on a public subject.",
        "properties": {
            headers.TENANT: _header("The tenant the message belongs to: its id, not the subject's token."),
            headers.SCHEMA: _header(
                "Contract version of the payload. Read payloads tolerantly: a newer Flowmesh may add fields.",
                const=headers.SCHEMA_VERSION,
            ),
            headers.MSG_ID: _header(
                "JetStream de-duplication id: a run event's `id`; for a `publish` step's message, one per run, "
                "retry and step, so a re-run attempt is stored once. A reader that must see each message once "
                "de-duplicates by it."
            ),
            headers.TRACEPARENT: _traceparent(
                "W3C trace context of the run the message belongs to: every run keeps one trace, from the request "
                "or event that started it across its steps, waits and retries (absent only on runs started before "
                "Flowmesh traced them)."
            ),
        },
        "required": [headers.TENANT, headers.SCHEMA, headers.MSG_ID],
    }


def _received_headers() -> JsonSchema:
    """The headers an integrator may set on an external event; none is required."""
    return {
        "type": "object",
        "description": "Headers an integrator may set on an external event; none is required.",
        "properties": {
            headers.MSG_ID: _header(
                "Recommended: a unique id of the event (your own event id). The stream stores an event re-sent "
                "with the same id within its duplicate window once, so it starts each `event` trigger once."
            ),
            headers.SCHEMA: _header("Contract version the sender speaks.", const=headers.SCHEMA_VERSION),
            headers.TRACEPARENT: _traceparent(),
            headers.TENANT: _header(
                "Not needed and not read: the tenant is the subject's `{tenant}` token, which an integrator's "
                "NATS user may publish for its own tenant only."
            ),
        },
    }


# --- payloads and messages -----------------------------------------------------------------------


def model_schemas() -> tuple[dict[type[BaseModel], JsonSchema], JsonSchema]:
    """References to the run event envelope and each type's ``data`` model, and their JSON Schemas.

    Validation mode: what a valid message looks like (``ts`` keeps ``format: date-time``); the
    serialized form differs only there.
    """
    models: list[type[BaseModel]] = [RunEvent, *EVENT_DATA.values()]
    refs, top = models_json_schema(
        [(m, "validation") for m in models],
        by_alias=True,
        ref_template="#/components/schemas/{model}",
        schema_generator=_Schemas,
    )
    defs: JsonSchema = top.get("$defs", {})
    typed = {m: ref for (m, _), ref in refs.items() if isinstance(m, type) and issubclass(m, BaseModel)}
    return typed, _reachable(defs, {ref["$ref"].rsplit("/", 1)[1] for ref in typed.values()})


def _reachable(defs: JsonSchema, roots: set[str]) -> JsonSchema:
    """The schemas reachable from ``roots``, sorted by name (pydantic also emits ones a field replaced)."""
    seen: set[str] = set()
    todo = sorted(roots)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo += re.findall(r"#/components/schemas/([A-Za-z0-9_.-]+)", repr(defs[name]))
    return {name: _described(defs[name]) for name in sorted(seen)}


def _described(schema: Any) -> Any:
    """``schema`` with its descriptions in Markdown."""
    if isinstance(schema, dict):
        return {
            k: _markdown(v) if k == "description" and isinstance(v, str) else _described(v) for k, v in schema.items()
        }
    if isinstance(schema, list):
        return [_described(v) for v in schema]
    return schema


EXAMPLE_IDS: Final = {
    "flowId": "0193b7c2-5e10-7d3a-9c41-2f6a8e0d4b17",
    "runId": "0193b7c4-0a2e-7f61-8b3d-61c9e5a7f203",
}
"""Fixed ids of the examples, so the document is the same at every generation."""

RUN_EVENT_EXAMPLES: Final[dict[str, tuple[int, str | None, int | None, EventData]]] = {
    "run.queued": (1, None, None, RunQueuedData(status="queued", trigger_type="event", parent_run_id=None)),
    "step.retrying": (
        5,
        "fetch",
        1,
        StepRetryingData(
            error=StepError(message="no response from https://api.example.com/orders within 5s", type="timeout"),
            next_attempt_at="2026-01-02T03:04:06.178Z",
            step_type="http",
        ),
    ),
    "step.succeeded": (
        8,
        "summarize",
        1,
        StepSucceededData(
            status="succeeded", duration_ms=840, step_type="llm", usage=TokenUsage(input_tokens=412, output_tokens=96)
        ),
    ),
    "run.failed": (
        9,
        None,
        None,
        RunFailedData(
            status="failed",
            duration_ms=5230,
            trigger_type="event",
            parent_run_id=None,
            error=RunFailure(
                message="no response from https://api.example.com/orders within 5s", step_id="fetch", type="timeout"
            ),
        ),
    ),
}
"""An example of some run event types: (``seq``, ``stepId``, ``attempt``, ``data``)."""


def _run_event_example(event_type: str) -> list[JsonSchema]:
    """The example of ``event_type``, written by the contract model as the runner publishes it."""
    if event_type not in RUN_EVENT_EXAMPLES:
        return []
    seq, step_id, attempt, data = RUN_EVENT_EXAMPLES[event_type]
    event_id = f"0193b7c4-0b{seq:02d}-7000-8000-000000000000"
    event = RunEvent(
        id=event_id,
        seq=seq,
        type=event_type,
        ts="2026-01-02T03:04:05.678Z",
        tenant_id=EXAMPLE_TENANT,
        run_id=EXAMPLE_IDS["runId"],
        flow_id=EXAMPLE_IDS["flowId"],
        version=3,
        step_id=step_id,
        attempt=attempt,
        data=data,
    )
    example_headers = {headers.TENANT: EXAMPLE_TENANT, headers.SCHEMA: headers.SCHEMA_VERSION, headers.MSG_ID: event_id}
    return [{"headers": example_headers, "payload": event.wire(exclude_none=True)}]


def _run_event_message(event_type: str, model: type[EventData], refs: dict[type[BaseModel], JsonSchema]) -> JsonSchema:
    """One run event type: the envelope with this ``type`` and this type's ``data``."""
    narrowed: JsonSchema = {
        "type": "object",
        "properties": {"type": {"const": event_type}, "data": refs[model]},
    }
    if event_type.startswith("step."):
        narrowed["properties"]["stepId"] = {"type": "string", "description": "The step the event is about."}
        narrowed["required"] = ["stepId"]
    summary = _markdown((model.__doc__ or "").strip().splitlines()[0])
    return {
        "name": event_type,
        "title": event_type,
        "summary": summary,
        "contentType": "application/json",
        "headers": _ref("schemas", "FlowmeshHeaders"),
        "payload": {"allOf": [refs[RunEvent], narrowed]},
        **({"examples": examples} if (examples := _run_event_example(event_type)) else {}),
    }


def _messages(refs: dict[type[BaseModel], JsonSchema]) -> JsonSchema:
    messages: JsonSchema = {
        EXTERNAL_EVENT: {
            "name": EXTERNAL_EVENT,
            "title": "External event",
            "summary": "An event from an integrator: any JSON value, usually an object.",
            "description": (
                "It becomes the input of each run an `event` trigger of this `eventType` starts (the trigger's "
                "`filter` sees it as `event`), and the output of each waiting `waitEvent` step of this "
                "`eventType` whose `match` it makes true. A body that is not JSON is dropped."
            ),
            "contentType": "application/json",
            "headers": _ref("schemas", "IntegratorHeaders"),
            "payload": {"description": "Any JSON value."},
            "examples": [
                {
                    "summary": f"Published on {subjects.external_event(EXAMPLE_TENANT, 'order.paid')}",
                    "headers": {headers.MSG_ID: "order-42-paid"},
                    "payload": {"orderId": 42, "amount": 99.5, "currency": "EUR"},
                }
            ],
        },
        OUT_MESSAGE: {
            "name": OUT_MESSAGE,
            "title": "Message a flow publishes",
            "summary": "The `payload` of a `publish` step, its expressions evaluated: any JSON value.",
            "contentType": "application/json",
            "headers": _ref("schemas", "FlowmeshHeaders"),
            "payload": {"description": "Any JSON value: the step's `data.payload` once rendered."},
            "examples": [
                {
                    "summary": f"Published on {subjects.out_message(EXAMPLE_TENANT, 'invoice.ready')}",
                    "headers": {
                        headers.TENANT: EXAMPLE_TENANT,
                        headers.SCHEMA: headers.SCHEMA_VERSION,
                        headers.MSG_ID: f"{EXAMPLE_IDS['runId']}:0:notify",
                    },
                    "payload": {"invoiceId": "inv-2026-0042", "total": 99.5},
                }
            ],
        },
    }
    for event_type in RUN_EVENT_TYPES:
        messages[event_type] = _run_event_message(event_type, EVENT_DATA[event_type], refs)
    return messages


# --- channels and operations ---------------------------------------------------------------------


def _channel(
    title: str, addr: str, example: str, description: str, params: JsonSchema, messages: Iterable[str]
) -> JsonSchema:
    """A channel on ``addr``; ``example`` (a subject the builder made) tells its stream and permission.

    Integrators publish on the channel of the stream of external events and read the others.
    """
    spec = stream_of(example)
    receives = spec is streams.EVENTS
    grant = integrator_grant(example, publish=receives)
    allowed = f"An integrator's NATS user may {'publish' if receives else 'subscribe'} to `{grant}`."
    return {
        "address": addr,
        "title": title,
        "description": f"{description}\n\n{_stream_sentence(spec)} {allowed}",
        "parameters": params,
        "messages": {name: _ref("messages", name) for name in messages},
        "x-jetstream": _stream_extension(spec),
        "x-integrator-permission": {"publish" if receives else "subscribe": grant},
    }


def _events_channel() -> JsonSchema:
    addr = address(subjects.external_event, "tenant", "eventType")
    return _channel(
        "External events (integrators → Flowmesh)",
        addr,
        subjects.external_event(EXAMPLE_TENANT, "order.paid"),
        (
            f"An event published on `{addr}` starts a run for each enabled `event` trigger of the tenant with "
            "this `eventType` (when its flow is published and active, and its `filter`, if it has one, is true "
            "for the event), and resumes each waiting `waitEvent` step of this `eventType` whose `match` is true "
            "for it. Publish it with JetStream to know it is stored (the acknowledgement comes back to your "
            "inbox); a plain publish is stored too. Without NATS, `POST /api/v1/events/{eventType}` (HTTP API) "
            "publishes the request's body here with the same effect."
        ),
        {
            "tenant": _ref("parameters", "tenant"),
            "eventType": _subject_part_parameter(
                "The event's type, as triggers and `waitEvent` steps name it.", "order.paid"
            ),
        },
        [EXTERNAL_EVENT],
    )


def _runs_channel() -> JsonSchema:
    addr = address(subjects.run_event, "tenant", "flowId", "runId", "event")
    of_flow = address(subjects.run_events_of_flow, "tenant", "flowId")
    of_run = address(subjects.run_events_of_run, "tenant", "flowId", "runId")
    tenant_all = integrator_grant(subjects.run_event(EXAMPLE_TENANT, "0", "0", RUN_EVENT_TYPES[0]), publish=False)
    return _channel(
        "Run events (Flowmesh → integrators)",
        addr,
        subjects.run_event(EXAMPLE_TENANT, "0", "0", RUN_EVENT_TYPES[0]),
        (
            "The lifecycle events of every run, each run's in order with a gap-free `seq` from 1. One message "
            "per event type, discriminated by the payload's `type` (also the subject's last part, "
            "`{event}`). Subscribe to "
            f"`{tenant_all}` for every run of the tenant, `{of_flow}` for one flow's, `{of_run}` for one run's. "
            "A subscription is live: it sees events from when it starts; a run's history, and whatever was "
            "missed, comes from the HTTP API (`GET /api/v1/runs/{runId}/events?after=<seq>`)."
        ),
        {
            "tenant": _ref("parameters", "tenant"),
            "flowId": _id_parameter("flow", "flowId"),
            "runId": _id_parameter("run", "runId"),
            "event": {
                "description": "The event's type: the payload's `type`.",
                "enum": list(RUN_EVENT_TYPES),
                "location": "$message.payload#/type",
            },
        },
        RUN_EVENT_TYPES,
    )


def _out_channel() -> JsonSchema:
    addr = address(subjects.out_message, "tenant", "name")
    return _channel(
        "Messages flows publish (Flowmesh → integrators)",
        addr,
        subjects.out_message(EXAMPLE_TENANT, "invoice.ready"),
        (
            f"What a flow's `publish` step sends, on `{addr}` with `{{name}}` its `data.name`; the step's "
            "output holds the message's sequence number in the stream (`seq`)."
        ),
        {
            "tenant": _ref("parameters", "tenant"),
            "name": _subject_part_parameter("The `publish` step's `data.name`.", "invoice.ready"),
        },
        [OUT_MESSAGE],
    )


def _operation(action: str, channel: str, title: str, summary: str, messages: Iterable[str]) -> JsonSchema:
    return {
        "action": action,
        "channel": {"$ref": f"#/channels/{channel}"},
        "title": title,
        "summary": summary,
        "messages": [{"$ref": f"#/channels/{channel}/messages/{name}"} for name in messages],
    }


def _operations() -> JsonSchema:
    return {
        "receiveExternalEvent": _operation(
            "receive",
            EVENTS_CHANNEL,
            "Flowmesh receives an external event",
            "An integrator publishes; Flowmesh starts `event` triggers and resumes `waitEvent` steps.",
            [EXTERNAL_EVENT],
        ),
        "sendRunEvent": _operation(
            "send",
            RUNS_CHANNEL,
            "Flowmesh sends run events",
            "Flowmesh publishes each run's lifecycle events; an integrator subscribes.",
            RUN_EVENT_TYPES,
        ),
        "sendOutMessage": _operation(
            "send",
            OUT_CHANNEL,
            "Flowmesh sends what flows publish",
            "A `publish` step publishes its payload; an integrator subscribes.",
            [OUT_MESSAGE],
        ),
    }


# --- servers and the document --------------------------------------------------------------------


def _servers() -> JsonSchema:
    default = urlsplit(str(BaseServiceSettings.model_fields["nats_url"].default))
    return {
        "dev": {
            "host": f"{default.hostname}:{{port}}",
            "protocol": "nats",
            "title": "make run",
            "description": (
                "The embedded NATS server of `make run`: open (no users, every subject allowed), on the "
                "loopback interface only. For a laptop."
            ),
            "variables": {
                "port": {
                    "description": (
                        "The port `make run` prints on its `NATS` line (a free one at each start); "
                        f"{default.port} is the services' default `NATS_URL` when they run on their own."
                    ),
                    "default": str(default.port),
                }
            },
        },
        "production": {
            "host": "{host}",
            "protocol": "nats",
            "title": "A deployed mesh",
            "description": (
                "A NATS server configured with Flowmesh's users (`deploy/nats/`, `flowmesh nats-config`): "
                "anonymous connections are refused, and an integrator connects as its tenant's user."
            ),
            "variables": {
                "host": {"description": "host:port of the NATS server", "examples": ["nats.example.com:4222"]}
            },
            "security": [_ref("securitySchemes", "integrator")],
        },
    }


def _integrator_guide() -> str:
    """What an integrator needs: its NATS user, inbox prefix and permissions, and the wire's rules."""
    perms = permissions.integrator_permissions(TENANT_MARK)
    user = permissions.integrator_user(TENANT_MARK).replace(TENANT_MARK, "{tenant}")
    inbox = permissions.inbox_prefix(user)

    def listed(grants: Iterable[str]) -> str:
        return ", ".join(f"`{g.replace(TENANT_MARK, '{tenant}')}`" for g in grants)

    return "\n".join(
        [
            "Flowmesh's public NATS subjects: what an integrator publishes to start and resume flows, and what it "
            "reads about runs and about the messages flows publish. Every other subject (request/reply, commands, "
            "work queues) is internal and closed to integrators.",
            "",
            "**Perspective.** Operations are Flowmesh's, as AsyncAPI 3.0 defines `action`: `send` means Flowmesh "
            "publishes and an integrator subscribes; `receive` means an integrator publishes and Flowmesh consumes.",
            "",
            f"**Connecting.** Outside `make run` (an open server), an integrator connects as the NATS user `{user}`, "
            "`{tenant}` being its tenant's subject token (see the channel parameter), with the password its "
            "operator set (`flowmesh nats-config --integrator <tenant id>` renders the user; `make cluster` prints "
            f"dev credentials), and with the inbox prefix `{inbox}` (nats.py `inbox_prefix`, nats.js "
            "`inboxPrefix`): it may receive replies nowhere else. It may",
            "",
            f"- publish: {listed(perms.publish)};",
            f"- subscribe: {listed(perms.subscribe)};",
            "",
            "and nothing else: no request/reply, no KV, no JetStream API. So it reads with plain (core) "
            "subscriptions, live; history comes from the HTTP API. A JetStream publish on the external events' "
            "subject works: its acknowledgement comes back to the inbox.",
            "",
            f"**Headers.** Flowmesh sets `{headers.TENANT}`, `{headers.SCHEMA}` (`{headers.SCHEMA_VERSION}`) and "
            f"`{headers.MSG_ID}` on what it publishes, and `{headers.TRACEPARENT}` when the message belongs to a "
            f"trace; an integrator should set `{headers.MSG_ID}` on its events (see `IntegratorHeaders`).",
            "",
            "**Payloads.** JSON, UTF-8, camelCase field names; ids are UUIDv7 strings, times RFC 3339 UTC with "
            "milliseconds. Read them tolerantly: a newer Flowmesh may add fields and event types; "
            f"`{headers.SCHEMA}` names the contract version.",
        ]
    )


def build_asyncapi() -> JsonSchema:
    """The AsyncAPI 3.0 document of the public subjects, as ``docs/api/asyncapi.yaml`` holds it."""
    refs, schemas = model_schemas()
    return {
        "asyncapi": ASYNCAPI_VERSION,
        "id": "urn:flowmesh:nats:public",
        "info": {
            "title": "Flowmesh public NATS subjects",
            "version": headers.SCHEMA_VERSION,
            "description": _integrator_guide(),
        },
        "defaultContentType": "application/json",
        "servers": _servers(),
        "channels": {EVENTS_CHANNEL: _events_channel(), RUNS_CHANNEL: _runs_channel(), OUT_CHANNEL: _out_channel()},
        "operations": _operations(),
        "components": {
            "schemas": {"FlowmeshHeaders": _sent_headers(), "IntegratorHeaders": _received_headers(), **schemas},
            "messages": _messages(refs),
            "parameters": {"tenant": _tenant_parameter()},
            "securitySchemes": {
                "integrator": {
                    "type": "userPassword",
                    "description": "The tenant's integrator user and its password (see the description above).",
                }
            },
        },
    }


class _Dumper(yaml.SafeDumper):
    """Block style, multi-line strings as literal blocks, keys in the order they were built."""

    def ignore_aliases(self, data: Any) -> bool:
        return True  # a shared ``$ref`` dict is written out each time, never as an ``&id001`` anchor


def _wrapped(text: str) -> str:
    """Markdown prose wrapped at ``WIDTH`` (list items indented under their bullet); same rendering."""
    paragraphs = []
    for paragraph in text.split("\n"):
        indent = "  " if paragraph.startswith("- ") else ""
        paragraphs.append(textwrap.fill(paragraph, WIDTH, subsequent_indent=indent, break_on_hyphens=False) or "")
    return "\n".join(paragraphs)


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    if "\n" in value:
        return dumper.represent_scalar("tag:yaml.org,2002:str", _wrapped(value), style="|")
    return dumper.represent_scalar("tag:yaml.org,2002:str", value)


_Dumper.add_representer(str, _str)


def dumps(document: JsonSchema) -> str:
    """The document in its committed form."""
    return yaml.dump(document, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=WIDTH)


def main() -> None:
    """Write the document, in its committed form, to standard output."""
    sys.stdout.write(dumps(build_asyncapi()))


if __name__ == "__main__":
    main()
