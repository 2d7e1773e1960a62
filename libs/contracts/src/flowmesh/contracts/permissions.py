"""Who may publish and subscribe to what on NATS: one user per service and per integrator.

Derived from the subjects, streams, consumers and buckets of this package, so the NATS server's
configuration (``deploy/nats/``, ``flowmesh nats-config``) cannot drift from the code. Each service
gets what it needs and nothing more:

- request/reply: a service subscribes to its own ``fm.rpc.<service>.>`` (and may answer the callers,
  ``allow_responses``); it may publish only the operations it calls. This is what makes the
  privileged headers safe: ``Flowmesh-Role: admin`` can only arrive on ``fm.rpc.usage.plan.set``
  from the gateway (which sets it from a verified token), and ``Flowmesh-Role: service:runner``
  only on ``fm.rpc.usage.keys.reveal`` and ``fm.rpc.usage.secrets.reveal`` from the runner,
  because nobody else may publish there;
- replies: every user has an inbox prefix of its own (``_INBOX.<user>``) and may subscribe only
  under it, so nobody can read another user's replies (a revealed API key or secret travels in one);
- JetStream: each service may manage only the streams of the mesh (create, update, read; never
  delete), its own durable consumers, and the KV buckets it uses;
- integrators: publish their own tenant's ``fm.events.{t}.>``, read their own ``fm.runs.{t}.>`` and
  ``fm.out.{t}.>``; no request/reply, no commands, no KV, no JetStream API.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from flowmesh.contracts import streams, subjects
from flowmesh.contracts.streams import ConsumerSpec
from flowmesh.contracts.subjects import FlowsOp, RunsOp, SchedulerOp, UsageOp

JS_API: Final = "$JS.API"
"""Prefix of the JetStream API subjects."""
INBOX_ROOT: Final = "_INBOX"
"""Root of every reply inbox; each user's inboxes live under ``_INBOX.<user>``."""

SERVICES: Final = ("gateway", "flows", "runner", "scheduler", "usage")
"""The services that connect to NATS, each as the user of its own name."""

INTEGRATOR_PREFIX: Final = "integrator-"
"""NATS user name of a tenant's integrator: ``integrator-<tenant token>``."""


@dataclass(frozen=True, slots=True)
class Permissions:
    """What one NATS user may do.

    Attributes:
        publish: Subjects (wildcards allowed) the user may publish to.
        subscribe: Subjects the user may subscribe to (with or without a queue group).
        allow_responses: Whether the user may answer the requests it receives (reply subjects).
    """

    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    allow_responses: bool = False


def inbox_prefix(user: str) -> str:
    """The inbox prefix a user's connection must use (nats-py: ``inbox_prefix``)."""
    return f"{INBOX_ROOT}.{user}"


def integrator_user(tenant_id: str) -> str:
    """The NATS user name of a tenant's integrator."""
    return INTEGRATOR_PREFIX + subjects.tenant_token(tenant_id)


# --- what each service calls over request/reply -------------------------------------------------

CALLS: Final[dict[str, tuple[str, ...]]] = {
    "gateway": (
        FlowsOp.CREATE,
        FlowsOp.LIST,
        FlowsOp.GET,
        FlowsOp.UPDATE,
        FlowsOp.REPLACE,
        FlowsOp.DELETE,
        FlowsOp.VALIDATE,
        FlowsOp.PUBLISH,
        FlowsOp.VERSIONS,
        FlowsOp.VERSION,
        FlowsOp.ROLLBACK,
        FlowsOp.ACTIVATE,
        FlowsOp.DEACTIVATE,
        FlowsOp.DUPLICATE,
        FlowsOp.EXPORT,
        FlowsOp.IMPORT,
        FlowsOp.CATALOG,
        FlowsOp.TRIGGERS,
        FlowsOp.TRIGGER_CREATE,
        FlowsOp.TRIGGER_UPDATE,
        FlowsOp.TRIGGER_DELETE,
        FlowsOp.WEBHOOK,
        FlowsOp.AUDIT,
        RunsOp.START,
        RunsOp.GET,
        RunsOp.LIST,
        RunsOp.STEPS,
        RunsOp.EVENTS,
        RunsOp.SNAPSHOT,
        RunsOp.CANCEL,
        RunsOp.RESUME,
        RunsOp.RETRY,
        UsageOp.PLAN,
        UsageOp.PLAN_SET,
        UsageOp.SUMMARY,
        UsageOp.EXPORT,
        UsageOp.FLOW_STATS,
        UsageOp.KEYS_LIST,
        UsageOp.KEYS_PUT,
        UsageOp.KEYS_DELETE,
        UsageOp.AUDIT,
        UsageOp.SECRETS_LIST,
        UsageOp.SECRETS_PUT,
        UsageOp.SECRETS_DELETE,
        # /readyz asks every service
        *(subjects.ping(name) for name in subjects.RPC_PREFIXES),
    ),
    "flows": (UsageOp.QUOTA,),
    "runner": (
        FlowsOp.RUNNABLE,
        UsageOp.QUOTA,
        UsageOp.KEYS_REVEAL,
        UsageOp.SECRETS_REVEAL,
        SchedulerOp.TIMER_SET,
        SchedulerOp.TIMER_CANCEL,
    ),
    "scheduler": (FlowsOp.SCHEDULES,),
    "usage": (),
}
"""The request/reply operations each service calls; a service may publish no other ``fm.rpc`` subject."""


# --- JetStream building blocks --------------------------------------------------------------------


def _stream_admin(spec_names: Iterable[str]) -> list[str]:
    """Create, bring up to date and read the given streams (never delete or purge them)."""
    return [f"{JS_API}.STREAM.{op}.{name}" for name in spec_names for op in ("CREATE", "UPDATE", "INFO")]


def _durable(spec: ConsumerSpec) -> list[str]:
    """Publish subjects to create, read, pull from and acknowledge one shared durable consumer."""
    s, d = spec.stream, spec.durable
    return [
        f"{JS_API}.CONSUMER.CREATE.{s}.{d}",
        f"{JS_API}.CONSUMER.CREATE.{s}.{d}.>",  # the create subject may carry the filter subject
        f"{JS_API}.CONSUMER.DURABLE.CREATE.{s}.{d}",
        f"{JS_API}.CONSUMER.INFO.{s}.{d}",
        f"{JS_API}.CONSUMER.MSG.NEXT.{s}.{d}",
        f"$JS.ACK.{s}.{d}.>",
    ]


def _ordered(stream: str) -> list[str]:
    """Ephemeral ordered consumers on ``stream`` (live streams, KV watches): create, reset, delete."""
    return [
        f"{JS_API}.CONSUMER.CREATE.{stream}",
        f"{JS_API}.CONSUMER.CREATE.{stream}.>",
        f"{JS_API}.CONSUMER.INFO.{stream}.*",
        f"{JS_API}.CONSUMER.DELETE.{stream}.*",
        f"$JS.FC.{stream}.>",  # flow-control answers
    ]


def _kv(bucket: str, *, write: bool, watch: bool = False) -> list[str]:
    """Use the KV bucket ``bucket``: create it if missing, read keys; write keys; watch it."""
    stream = f"KV_{bucket}"
    grants = [
        *_stream_admin([stream]),
        f"{JS_API}.DIRECT.GET.{stream}",
        f"{JS_API}.DIRECT.GET.{stream}.>",
        f"{JS_API}.STREAM.MSG.GET.{stream}",
    ]
    if write:
        grants.append(f"$KV.{bucket}.>")
    if watch:
        grants += _ordered(stream)
    return grants


_EVERYONE_JS: Final = (
    f"{JS_API}.INFO",  # account limits, asked by clients at start
    f"{JS_API}.STREAM.NAMES",  # which stream holds a subject (read-only)
)


def _service(
    name: str,
    *,
    publishes: Iterable[str] = (),
    subscribes: Iterable[str] = (),
    consumers: Iterable[ConsumerSpec] = (),
    js: Iterable[str] = (),
) -> Permissions:
    serves = [f"{subjects.RPC_PREFIXES[name]}.>"] if name in subjects.RPC_PREFIXES else []
    pub = [*CALLS[name], *publishes, *_EVERYONE_JS, *_stream_admin(s.name for s in streams.ALL_STREAMS), *js]
    for spec in consumers:
        pub += _durable(spec)
    sub = [f"{inbox_prefix(name)}.>", *serves, *subscribes]
    return Permissions(publish=_unique(pub), subscribe=_unique(sub), allow_responses=bool(serves))


def _unique(items: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(items))


def service_permissions() -> dict[str, Permissions]:
    """The permissions of each service's NATS user (named after the service)."""
    return {
        "gateway": _service(
            "gateway",
            # POST /api/v1/events/{eventType}: the tenant's events, published as an integrator would
            publishes=[subjects.EVENTS_ALL],
            # webhook lookups are cached per replica and dropped on every flow announcement
            subscribes=[subjects.FLOWS_EVENTS_ALL],
            js=[
                *_kv(streams.IDEMPOTENCY_BUCKET, write=True),
                *_kv(streams.WS_TICKETS_BUCKET, write=True),
                *_ordered(streams.RUN_EVENTS.name),  # WebSocket live streams
            ],
        ),
        "flows": _service(
            "flows",
            publishes=[subjects.FLOWS_EVENTS_ALL],
            js=_kv(streams.QUOTA_BUCKET, write=False, watch=True),
        ),
        "runner": _service(
            "runner",
            publishes=[subjects.STEP_WORK, subjects.RUN_EVENTS_ALL, subjects.OUT_ALL],
            # the cache of runnable flows is dropped on every flow announcement, in every replica
            subscribes=[subjects.FLOWS_EVENTS_ALL],
            consumers=[
                streams.RUNNER_STEPS,
                streams.RUNNER_STARTS,
                streams.RUNNER_FLOWS,
                streams.RUNNER_TIMERS,
                streams.RUNNER_EVENTS,
            ],
            js=_kv(streams.QUOTA_BUCKET, write=False, watch=True),
        ),
        "scheduler": _service(
            "scheduler",
            publishes=[subjects.RUN_START_CMD, subjects.TIMERS_FIRED_ALL],
            consumers=[streams.SCHEDULER_FLOWS],
        ),
        "usage": _service(
            "usage",
            consumers=[streams.USAGE_METER],
            js=_kv(streams.QUOTA_BUCKET, write=True),
        ),
    }


def integrator_permissions(tenant_id: str) -> Permissions:
    """What a tenant's integrator may do: its own events in, its own run events and out messages.

    Reading is live (core subscriptions on the stream subjects); history comes from the HTTP API
    (``GET /runs/{id}/events``, WebSocket ``?after=``). Publishing to ``fm.events`` with a JetStream
    acknowledgement works: the acknowledgement comes back to the integrator's own inbox.
    """
    t = subjects.tenant_token(tenant_id)
    user = integrator_user(tenant_id)
    return Permissions(
        publish=(f"{subjects.PREFIX}.events.{t}.>",),
        subscribe=(f"{subjects.PREFIX}.runs.{t}.>", f"{subjects.PREFIX}.out.{t}.>", f"{inbox_prefix(user)}.>"),
    )
