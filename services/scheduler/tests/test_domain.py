"""Misfire plans, reconciling a schedule with its sources, and the messages a fire sends (pure)."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from flowmesh.contracts.models.flows import Trigger
from flowmesh.contracts.models.rpc import StartRun
from flowmesh.contracts.models.schedules import (
    FlowState,
    ScheduledRunInput,
    ScheduleSource,
    parse_schedule_key,
    schedule_key,
)
from flowmesh.scheduler import cron
from flowmesh.scheduler.domain import (
    Schedule,
    from_source,
    plan_fires,
    reconcile,
    start_command,
    with_flow,
)

T0 = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
EVERY_SECOND = cron.parse("* * * * * *")
S = timedelta(seconds=1)
TRIGGER_ID = "0190a000-0000-7000-8000-000000000001"
FLOW_ID = "0190a000-0000-7000-8000-0000000000f1"


def plan(policy: str, due: datetime, now: datetime, *, limit: int = 100):  # type: ignore[no-untyped-def]
    return plan_fires(
        EVERY_SECOND,
        policy,  # type: ignore[arg-type]
        due,
        now=now,
        horizon=now + timedelta(milliseconds=500),
        threshold=timedelta(seconds=5),
        limit=limit,
    )


def source(
    *,
    cron_expr: str = "* * * * * *",
    misfire: str = "skip",
    enabled: bool = True,
    active: bool = True,
    published: bool = True,
    changed: datetime = T0,
) -> ScheduleSource:
    trigger = Trigger(
        id=TRIGGER_ID,
        flow_id=FLOW_ID,
        type="schedule",
        name="tick",
        config={"cron": cron_expr, "timezone": "UTC", "misfire": misfire},
        enabled=enabled,
        created_at=changed,
        updated_at=changed,
    )
    flow = FlowState(flow_id=FLOW_ID, tenant_id="acme", active=active, published=published, updated_at=T0)
    return ScheduleSource(trigger=trigger, flow=flow)


# --- misfires ---------------------------------------------------------------------------------------


def test_an_on_time_claim_fires_its_due_time_and_moves_to_the_next() -> None:
    p = plan("skip", T0 + S, T0 + timedelta(milliseconds=600))
    assert p.fires == (T0 + S,)
    assert p.next_due == T0 + 2 * S
    assert not p.missed


def test_a_late_due_time_within_the_threshold_fires_whatever_the_policy() -> None:
    for policy in ("skip", "fireOnce", "fireAll"):
        p = plan(policy, T0, T0 + 3 * S)
        assert p.fires[0] == T0
        assert not p.missed


def test_skip_fires_none_of_the_missed_due_times() -> None:
    p = plan("skip", T0, T0 + 10 * S)
    # due times up to now - 5 s are missed; the later ones are only late and fire
    assert p.fires == (T0 + 6 * S,)
    assert p.next_due == T0 + 7 * S
    assert p.missed


def test_fire_once_fires_the_latest_missed_due_time_once() -> None:
    p = plan("fireOnce", T0, T0 + 10 * S)
    assert p.fires == (T0 + 5 * S, T0 + 6 * S)
    assert p.missed


def test_fire_once_with_a_single_missed_time_misses_nothing() -> None:
    p = plan("fireOnce", T0, T0 + 5 * S + timedelta(milliseconds=10))
    assert p.fires == (T0, T0 + 6 * S) or p.fires[0] == T0
    assert not p.missed


def test_fire_all_fires_every_missed_due_time_in_order() -> None:
    p = plan("fireAll", T0, T0 + 10 * S)
    assert p.fires == tuple(T0 + i * S for i in range(7))
    assert p.next_due == T0 + 7 * S
    assert not p.missed


def test_fire_all_is_bounded_and_skips_the_rest() -> None:
    p = plan("fireAll", T0, T0 + timedelta(hours=1), limit=100)
    assert p.fires[:100] == tuple(T0 + i * S for i in range(100))
    assert p.fires[100] == T0 + timedelta(hours=1) - 5 * S + S
    assert p.missed


def test_a_week_of_missed_seconds_is_planned_quickly() -> None:
    now = T0 + timedelta(days=7)
    assert plan("fireOnce", T0, now).fires[0] == now - 5 * S
    assert len(plan("fireAll", T0, now).fires) == 101


# --- reconciling --------------------------------------------------------------------------------------


def stored(**changes: object) -> Schedule:
    row = reconcile(None, from_source(source())).row
    assert row is not None
    return replace(row, **changes)  # type: ignore[arg-type]


def test_a_new_runnable_schedule_starts_at_least_one_second_after_its_change() -> None:
    out = reconcile(None, from_source(source(changed=T0 + timedelta(milliseconds=300))))
    assert out.row is not None and out.changed and out.rearmed
    assert out.row.next_due_at == T0 + 2 * S


@pytest.mark.parametrize("change", [{"enabled": False}, {"active": False}, {"published": False}])
def test_a_disabled_or_deactivated_or_unpublished_schedule_waits_for_nothing(change: dict[str, bool]) -> None:
    out = reconcile(stored(next_due_at=T0 + 30 * S), from_source(source(**change)))  # type: ignore[arg-type]
    assert out.row is not None and out.row.next_due_at is None
    assert out.rearmed


def test_re_enabling_starts_again_from_the_change() -> None:
    later = T0 + timedelta(minutes=5)
    out = reconcile(stored(enabled=False, next_due_at=None), from_source(source(changed=later)))
    assert out.row is not None and out.row.next_due_at == later + S


def test_a_new_cron_re_arms_and_a_new_misfire_policy_does_not() -> None:
    keep = stored(next_due_at=T0 + 30 * S)
    out = reconcile(keep, from_source(source(misfire="fireAll", changed=T0 + 20 * S)))
    assert out.row is not None and out.row.next_due_at == T0 + 30 * S
    assert out.changed and not out.rearmed
    out = reconcile(keep, from_source(source(cron_expr="*/10 * * * * *", changed=T0 + 20 * S)))
    assert out.row is not None and out.row.next_due_at == T0 + 30 * S  # next */10 at least 1 s after 20 s
    assert out.rearmed


def test_the_same_state_again_changes_nothing() -> None:
    keep = stored(next_due_at=T0 + 30 * S)
    out = reconcile(keep, from_source(source()))
    assert not out.changed and not out.rearmed


def test_a_deleted_trigger_or_flow_removes_the_schedule() -> None:
    out = reconcile(stored(), None)
    assert out.row is None and out.changed
    assert not reconcile(None, None).changed


def test_a_flow_change_applies_to_its_stored_schedules() -> None:
    keep = stored(next_due_at=T0 + 30 * S)
    off = FlowState(flow_id=FLOW_ID, tenant_id="acme", active=False, published=True, updated_at=T0 + 10 * S)
    out = reconcile(keep, with_flow(keep, off))
    assert out.row is not None and out.row.next_due_at is None
    on = off.model_copy(update={"active": True, "updated_at": T0 + 60 * S})
    back = reconcile(out.row, with_flow(out.row, on))
    assert back.row is not None and back.row.next_due_at == T0 + 61 * S


def test_an_unusable_config_never_fires() -> None:
    out = reconcile(None, from_source(source(cron_expr="not a cron")))
    assert out.row is not None and not out.row.valid and out.row.next_due_at is None


# --- messages ------------------------------------------------------------------------------------------


def test_a_fire_is_a_start_command_keyed_by_trigger_and_due_time() -> None:
    row = stored()
    out = start_command(row, T0 + S, fired_at=T0 + S + timedelta(milliseconds=3), subject="fm.cmd.runs.start")
    assert out.msg_id == f"sched:{TRIGGER_ID}:2026-01-01T12:00:01.000Z"
    assert out.tenant == "acme"
    body = json.loads(out.body)
    assert body == {
        "flowId": FLOW_ID,
        "input": {"scheduledAt": "2026-01-01T12:00:01.000Z", "firedAt": "2026-01-01T12:00:01.003Z"},
        "idempotencyKey": out.msg_id,
        "triggerType": "schedule",
        "triggerId": TRIGGER_ID,
    }
    start = StartRun.model_validate(body)
    assert (start.flow_id, start.trigger_type, start.trigger_id) == (FLOW_ID, "schedule", TRIGGER_ID)
    assert ScheduledRunInput.model_validate(start.input).scheduled_at == T0 + S
    assert parse_schedule_key(out.msg_id) == (TRIGGER_ID, "2026-01-01T12:00:01.000Z")
    assert schedule_key(TRIGGER_ID, T0 + S) == out.msg_id
    assert parse_schedule_key("event:x:1") is None
