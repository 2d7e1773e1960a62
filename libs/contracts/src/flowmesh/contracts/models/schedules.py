"""Cron triggers between the flows service and the scheduler: one run per due time, whatever fails.

The scheduler learns *that* something changed from the ``fm.flows.{t}.<event>`` announcements and
reads *what* is true now with ``fm.rpc.flows.schedules`` (no tenant: the scheduler serves every
tenant). Reading the current state under a per-flow lock makes the scheduler's copy independent of
the order in which announcements arrive or are redelivered.

A due time fires as one ``fm.cmd.runs.start`` (:class:`ScheduledRunInput` as the run input) whose
idempotency key and ``Nats-Msg-Id`` are both :func:`schedule_key`: one run per (trigger, due time)
whichever replica fires it, however many times.
"""

from __future__ import annotations

from datetime import datetime
from typing import Final

from pydantic import Field

from flowmesh.contracts.ids import format_time, is_uuid
from flowmesh.contracts.models.base import Timestamp, WireModel
from flowmesh.contracts.models.flows import Trigger

MAX_LOOKUP: Final = 500
"""Most ids one ``schedules`` lookup may name (a reply stays well under NATS's 1 MiB payload)."""

SCHEDULE_KEY_PREFIX: Final = "sched:"
"""Prefix of every scheduled run's idempotency key."""


class ScheduleSourcesQuery(WireModel):
    """``fm.rpc.flows.schedules``: one of three lookups.

    - ``trigger_ids``: those schedule triggers (of live flows) with their flow's state;
    - ``flow_ids``: those live flows' state only (a flow may have thousands of triggers);
    - neither: one page of every schedule trigger of every live flow, by id, after ``after``.
    """

    trigger_ids: list[str] | None = Field(default=None, max_length=MAX_LOOKUP)
    flow_ids: list[str] | None = Field(default=None, max_length=MAX_LOOKUP)
    after: str | None = None
    limit: int = Field(default=200, ge=1, le=MAX_LOOKUP)


class FlowState(WireModel):
    """What decides whether a live flow's schedules may fire."""

    flow_id: str
    tenant_id: str
    active: bool
    published: bool
    updated_at: Timestamp


class ScheduleSource(WireModel):
    """A schedule trigger as the flows service holds it now, with its flow's state."""

    trigger: Trigger
    flow: FlowState


class ScheduleSources(WireModel):
    """Reply of ``fm.rpc.flows.schedules``: a trigger or a flow that is absent is deleted (or never was)."""

    items: list[ScheduleSource] = Field(default_factory=list)
    flows: list[FlowState] = Field(default_factory=list)


class ScheduledRunInput(WireModel):
    """The input of a run started by a cron trigger."""

    scheduled_at: Timestamp
    """The due time this run is for (for a misfire, the missed time it stands for)."""
    fired_at: Timestamp
    """When the scheduler sent the start (``scheduledAt`` plus the lateness)."""


def schedule_key(trigger_id: str, due_at: datetime) -> str:
    """Idempotency key and ``Nats-Msg-Id`` of one due time of a trigger: ``sched:{triggerId}:{dueTime}``."""
    return f"{SCHEDULE_KEY_PREFIX}{trigger_id}:{format_time(due_at)}"


def parse_schedule_key(key: str) -> tuple[str, str] | None:
    """``(triggerId, dueTime)`` of a :func:`schedule_key`, or None for any other key."""
    if not key.startswith(SCHEDULE_KEY_PREFIX):
        return None
    trigger_id, sep, due = key.removeprefix(SCHEDULE_KEY_PREFIX).partition(":")
    if not sep or not is_uuid(trigger_id) or not due:
        return None
    return trigger_id, due
