"""JetStream streams, consumers and KV buckets, defined once: services and the NATS permissions read them here.

Map of the streams and who produces and consumes each: ``docs/architecture.md#subjects``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final, Literal

from flowmesh.contracts import subjects

DAY: Final = 24 * 3600.0


@dataclass(frozen=True, slots=True)
class StreamSpec:
    """What a JetStream stream must look like; provisioned idempotently at start-up."""

    name: str
    subjects: tuple[str, ...]
    retention: Literal["limits", "workqueue", "interest"] = "limits"
    max_age_s: float = 0.0
    duplicate_window_s: float = 120.0
    description: str = ""


FLOWS: Final = StreamSpec(
    "FLOWS", (subjects.FLOWS_EVENTS_ALL,), max_age_s=7 * DAY, description="flow lifecycle announcements"
)
RUN_CMDS: Final = StreamSpec(
    "RUN_CMDS", (subjects.RUN_START_CMD,), retention="workqueue", description="run starts that must not be lost"
)
STEP_WORK: Final = StreamSpec(
    "STEP_WORK", (subjects.STEP_WORK,), retention="workqueue", description="steps ready to execute"
)
RUN_EVENTS: Final = StreamSpec(
    "RUN_EVENTS", (subjects.RUN_EVENTS_ALL,), max_age_s=7 * DAY, description="run lifecycle events"
)
TIMERS: Final = StreamSpec(
    "TIMERS", (subjects.TIMERS_FIRED_ALL,), max_age_s=7 * DAY, description="durable timers that came due"
)
EVENTS: Final = StreamSpec(
    "EVENTS", (subjects.EVENTS_ALL,), max_age_s=7 * DAY, description="external events from integrators"
)
OUT: Final = StreamSpec("OUT", (subjects.OUT_ALL,), max_age_s=7 * DAY, description="messages flows publish")

ALL_STREAMS: Final = (FLOWS, RUN_CMDS, STEP_WORK, RUN_EVENTS, TIMERS, EVENTS, OUT)
"""Every stream of the mesh."""


@dataclass(frozen=True, slots=True)
class ConsumerSpec:
    """A shared durable pull consumer."""

    stream: str
    durable: str
    filter_subjects: tuple[str, ...] = field(default_factory=tuple)
    ack_wait_s: float = 30.0
    max_deliver: int = -1
    max_ack_pending: int = 1000


RUNNER_STEPS: Final = ConsumerSpec(STEP_WORK.name, "runner-steps")
"""The runner's shared consumer of ready steps."""
RUNNER_STARTS: Final = ConsumerSpec(RUN_CMDS.name, "runner-starts")
"""The runner's shared consumer of durable run starts."""
RUNNER_FLOWS: Final = ConsumerSpec(FLOWS.name, "runner-flows")
"""The runner's consumer of flow announcements."""
RUNNER_TIMERS: Final = ConsumerSpec(TIMERS.name, "runner-timers", (subjects.timer_fired("runner"),))
"""The runner's consumer of its fired timers."""
RUNNER_EVENTS: Final = ConsumerSpec(EVENTS.name, "runner-events")
"""The runner's consumer of external events (event triggers, waitEvent)."""
SCHEDULER_FLOWS: Final = ConsumerSpec(FLOWS.name, "scheduler-flows")
"""The scheduler's consumer of flow announcements."""
USAGE_METER: Final = ConsumerSpec(RUN_EVENTS.name, "usage-meter")
"""The usage service's metering consumer of run events."""

IDEMPOTENCY_BUCKET: Final = "fm_idempotency"
"""KV bucket of the gateway's stored first responses (24 h)."""
IDEMPOTENCY_TTL_S: Final = DAY
WS_TICKETS_BUCKET: Final = "fm_ws_tickets"
"""KV bucket of single-use WebSocket tickets (30 s)."""
WS_TICKET_TTL_S: Final = 30.0
QUOTA_BUCKET: Final = "fm_quota"
"""KV bucket of per-tenant quota snapshots kept fresh by the usage service."""
