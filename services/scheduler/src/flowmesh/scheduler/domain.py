"""What the scheduler decides, without I/O: a schedule's state from its sources, misfire plans, messages.

A schedule is *runnable* when its trigger is enabled and its flow is active and published. Its
``next_due_at`` is the one due time it waits for; firing a due time moves it on. A schedule that
becomes runnable (new, re-enabled, flow activated or published) or whose cron or zone changes
starts from its first due time at least one second after the change (the public API's rule for
trigger changes: a change never fires a due time in its own second).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any, Final, Literal, cast

import orjson
from pydantic import ValidationError

from flowmesh.contracts.ids import format_time
from flowmesh.contracts.models.flows import ScheduleConfig
from flowmesh.contracts.models.schedules import FlowState, ScheduleSource, schedule_key
from flowmesh.contracts.models.timers import TimerFired, timer_msg_id
from flowmesh.scheduler import cron

log = logging.getLogger(__name__)

MisfirePolicy = Literal["skip", "fireOnce", "fireAll"]
MISFIRE_POLICIES: Final = ("skip", "fireOnce", "fireAll")


@dataclass(frozen=True, slots=True)
class Schedule:
    """The scheduler's copy of one schedule trigger (a row of ``schedules``)."""

    trigger_id: str
    tenant_id: str
    flow_id: str
    cron: str
    timezone: str
    misfire: str
    enabled: bool
    flow_active: bool
    flow_published: bool
    valid: bool
    trigger_updated_at: datetime
    flow_updated_at: datetime
    next_due_at: datetime | None

    @property
    def runnable(self) -> bool:
        """Whether it fires: enabled, its flow active and published, its expression usable."""
        return self.valid and self.enabled and self.flow_active and self.flow_published


@dataclass(frozen=True, slots=True)
class Reconciled:
    """What to do with the stored copy: ``row`` None deletes it; ``rearmed`` moves its due time."""

    row: Schedule | None
    changed: bool
    rearmed: bool


def spec_of(row: Schedule) -> cron.CronSpec:
    """The parsed cron of a stored schedule (stored rows were checked when written)."""
    return cron.parse(row.cron, row.timezone)


def policy_of(row: Schedule) -> MisfirePolicy:
    """The misfire policy of a stored schedule; anything unknown behaves as ``skip``."""
    return cast(MisfirePolicy, row.misfire) if row.misfire in MISFIRE_POLICIES else "skip"


def from_source(source: ScheduleSource) -> Schedule:
    """The schedule a trigger and its flow describe (its due time still to be decided)."""
    trigger, flow = source.trigger, source.flow
    valid = True
    try:
        config = ScheduleConfig.model_validate(trigger.config)
        cron.parse(config.cron, config.timezone)
        expression, zone, misfire = config.cron, config.timezone, config.misfire
    except (ValidationError, cron.InvalidCron) as exc:
        # the flows service validates configs, so this is a config from an older rule: never fire it
        log.warning("schedule trigger %s has an unusable config, it will not fire: %s", trigger.id, exc)
        valid = False
        expression = str(trigger.config.get("cron", ""))
        zone = str(trigger.config.get("timezone", "UTC"))
        misfire = "skip"
    return Schedule(
        trigger_id=trigger.id,
        tenant_id=flow.tenant_id,
        flow_id=flow.flow_id,
        cron=expression,
        timezone=zone,
        misfire=misfire,
        enabled=trigger.enabled,
        flow_active=flow.active,
        flow_published=flow.published,
        valid=valid,
        trigger_updated_at=trigger.updated_at or flow.updated_at,
        flow_updated_at=flow.updated_at,
        next_due_at=None,
    )


def with_flow(row: Schedule, flow: FlowState) -> Schedule:
    """A stored schedule with its flow's new state."""
    return replace(
        row, flow_active=flow.active, flow_published=flow.published, flow_updated_at=flow.updated_at, next_due_at=None
    )


def reconcile(stored: Schedule | None, wanted: Schedule | None) -> Reconciled:
    """Bring the stored copy to what the sources say now (``wanted`` None: the trigger or flow is gone).

    The due time is kept while the schedule stays runnable with the same cron and zone (a rename,
    a new misfire policy or a new flow version change nothing about when it fires); it is
    re-armed from the latest change otherwise.
    """
    if wanted is None:
        return Reconciled(row=None, changed=stored is not None, rearmed=stored is not None)
    same_timing = (
        stored is not None
        and stored.runnable
        and wanted.runnable
        and stored.next_due_at is not None
        and (stored.cron, stored.timezone) == (wanted.cron, wanted.timezone)
    )
    due: datetime | None = None
    if same_timing:
        assert stored is not None
        due = stored.next_due_at
    elif wanted.runnable:
        changed_at = max(wanted.trigger_updated_at, wanted.flow_updated_at)
        due = cron.first_due(cron.parse(wanted.cron, wanted.timezone), changed_at)
    row = replace(wanted, next_due_at=due)
    # a claim taken under the old timing must neither fire nor record its plan
    rearmed = stored is None or (not same_timing and (stored.next_due_at is not None or due is not None))
    return Reconciled(row=row, changed=row != stored, rearmed=rearmed)


@dataclass(frozen=True, slots=True)
class FirePlan:
    """What one claim of a schedule fires, and the due time it waits for afterwards."""

    fires: tuple[datetime, ...]
    """Due times to fire, oldest first; those already past fire at once, a future one at its time."""
    next_due: datetime | None
    missed: bool
    """Whether the misfire policy left some missed due times out."""


def plan_fires(
    spec: cron.CronSpec,
    policy: MisfirePolicy,
    due: datetime,
    *,
    now: datetime,
    horizon: datetime,
    threshold: timedelta,
    limit: int,
) -> FirePlan:
    """The fires of a claimed schedule whose next due time is ``due`` (at or before ``horizon``).

    A due time more than ``threshold`` in the past is a misfire (every replica was down or behind):
    ``skip`` fires none of them, ``fireOnce`` the latest one, ``fireAll`` them all, oldest first, at
    most ``limit`` (any more are skipped). Due times within ``threshold`` of now are merely late
    and always fire. Then the next due time fires if it comes before ``horizon``.
    """
    fires: list[datetime] = []
    missed = False
    cutoff = now - threshold
    current: datetime | None = due
    if due <= cutoff:
        if policy == "fireAll":
            fires = [due, *cron.due_between(spec, due, cutoff, limit=limit - 1)]
            after = cron.next_due(spec, fires[-1])
            missed = after is not None and after <= cutoff
        else:
            missed = True
            if policy == "fireOnce":
                latest = cron.last_due(spec, cutoff, not_before=due)
                fires.append(latest or due)
                missed = latest is not None and latest != due
        current = cron.next_due(spec, cutoff)
    if current is not None and current <= horizon:
        fires.append(current)
        current = cron.next_due(spec, current)
    return FirePlan(fires=tuple(fires), next_due=current, missed=missed)


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One JetStream message to publish: subject, body and ``Nats-Msg-Id``."""

    subject: str
    body: bytes
    msg_id: str
    tenant: str | None


def start_command(row: Schedule, due: datetime, *, fired_at: datetime, subject: str) -> Outgoing:
    """The durable run start of one due time: idempotency key and message id ``sched:{triggerId}:{due}``.

    The body is a :class:`StartRun` whose input is a :class:`ScheduledRunInput`, written out by
    hand: this runs for every fire at the due instant, where building the models costs ~30 µs a
    message (a test reads the body back through both models).
    """
    key = schedule_key(row.trigger_id, due)
    body = {
        "flowId": row.flow_id,
        "input": {"scheduledAt": format_time(due), "firedAt": format_time(fired_at)},
        "idempotencyKey": key,
        "triggerType": "schedule",
        "triggerId": row.trigger_id,
    }
    return Outgoing(subject, orjson.dumps(body), key, row.tenant_id)


def fired_timer(
    owner: str, key: str, due_at: datetime, payload: dict[str, Any], *, fired_at: datetime, subject: str
) -> Outgoing:
    """The message of a timer that came due: one per (timer, due time), whichever replica sends it."""
    fired = TimerFired(owner=owner, key=key, due_at=due_at, payload=payload, fired_at=fired_at)
    return Outgoing(
        subject,
        fired.model_dump_json(by_alias=True).encode(),
        timer_msg_id(owner, key, format_time(due_at)),
        None,
    )
