"""Metering against real NATS and PostgreSQL: exact counters under duplicate and redelivered events,
flow statistics, and the quota snapshots in ``fm_quota`` (usage is exact whatever fails)."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError

from flowmesh.contracts import headers
from flowmesh.contracts.errors import Forbidden, InvalidInput
from flowmesh.contracts.ids import format_time, new_id
from flowmesh.contracts.models.usage import TenantQuota, quota_key
from flowmesh.contracts.plans import PLANS
from flowmesh.contracts.streams import QUOTA_BUCKET, RUN_EVENTS, USAGE_METER
from flowmesh.contracts.subjects import UsageOp, run_event
from flowmesh.runtime.rpc import RpcClient
from flowmesh.runtime.service import ServiceRuntime
from flowmesh.usage.domain import METERED_TYPES
from flowmesh.usage.meter import Meter
from flowmesh.usage.quota import PlanBook, QuotaSnapshots


class Run:
    """Builds the events of one run as the runner publishes them (seq from 1)."""

    def __init__(self, tenant: str, flow_id: str | None = None, *, parent: str | None = None) -> None:
        self.tenant = tenant
        self.flow_id = flow_id or new_id()
        self.id = new_id()
        self.parent = parent
        self.seq = 0

    def event(
        self, type_: str, *, step_id: str | None = None, ts: datetime | None = None, **data: Any
    ) -> dict[str, Any]:
        self.seq += 1
        ev: dict[str, Any] = {
            "id": new_id(),
            "seq": self.seq,
            "type": type_,
            "ts": format_time(ts or datetime.now(UTC)),
            "tenantId": self.tenant,
            "runId": self.id,
            "flowId": self.flow_id,
            "version": 1,
            "data": data,
        }
        if step_id is not None:
            ev["stepId"] = step_id
            ev["attempt"] = 1
        return ev

    def queued(self, **kw: Any) -> dict[str, Any]:
        return self.event("run.queued", status="queued", triggerType="manual", parentRunId=self.parent, **kw)

    def step(self, step_id: str, type_: str = "transform", ms: int = 5, ok: bool = True, **data: Any) -> dict[str, Any]:
        kind = "step.succeeded" if ok else "step.failed"
        return self.event(kind, step_id=step_id, status=kind.split(".")[1], durationMs=ms, stepType=type_, **data)

    def final(self, status: str = "succeeded", ms: int = 100, **data: Any) -> dict[str, Any]:
        return self.event(
            f"run.{status}", status=status, durationMs=ms, triggerType="manual", parentRunId=self.parent, **data
        )


async def publish(js: JetStreamContext, *events: dict[str, Any], msg_id: str | None = None) -> None:
    """Publish run events on their subjects; ``Nats-Msg-Id`` is the event id unless given."""
    for ev in events:
        await js.publish(
            run_event(ev["tenantId"], ev["flowId"], ev["runId"], ev["type"]),
            orjson.dumps(ev),
            headers={headers.MSG_ID: msg_id or ev["id"], headers.TENANT: ev["tenantId"]},
        )


async def drained(js: JetStreamContext, timeout: float = 15) -> None:
    """Wait until the metering consumer has every published event delivered and acknowledged."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = await js.consumer_info(RUN_EVENTS.name, USAGE_METER.durable)
        if info.num_pending == 0 and info.num_ack_pending == 0:
            return
        await asyncio.sleep(0.05)
    raise TimeoutError("the metering consumer did not catch up")


TODAY = datetime.now(UTC).date().isoformat()


async def export(client: RpcClient, tenant: str) -> dict[str, Any]:
    data: dict[str, Any] = await client.call(UsageOp.EXPORT, {"from": TODAY, "to": TODAY}, tenant=tenant)
    return data["items"][0] if data["items"] else {}


def llm_run(tenant: str) -> tuple[Run, list[dict[str, Any]]]:
    run = Run(tenant)
    events = [
        run.queued(),
        run.event("run.started", status="running"),
        run.event("step.started", step_id="start", stepType="trigger"),
        run.step("start", "trigger", ms=0),
        run.step("ask", "llm", ms=40, usage={"inputTokens": 12, "outputTokens": 30}),
        run.step("shape", "transform", ms=2),
        run.final("succeeded", ms=50),
    ]
    return run, events


async def test_an_event_published_twice_or_redelivered_is_counted_once(
    client: RpcClient, js: JetStreamContext, tenant: str, usage_service: ServiceRuntime
) -> None:
    run, events = llm_run(tenant)
    await publish(js, *events)
    # the same events again under other message ids: JetStream cannot de-duplicate them, we must
    for ev in events:
        await publish(js, ev, msg_id=f"again-{ev['id']}")
    await drained(js)
    day = await export(client, tenant)
    assert (day["runs"], day["runsSucceeded"], day["steps"], day["stepMs"]) == (1, 1, 2, 42)
    assert (day["inputTokens"], day["outputTokens"]) == (12, 30)
    summary = await client.call(UsageOp.SUMMARY, {}, tenant=tenant)
    assert (summary["runsUsed"], summary["stepsUsed"], summary["tokensUsed"]) == (1, 2, 42)

    # a batch metered again (a crash after the commit, before the acknowledgement) changes nothing
    plans = PlanBook(usage_service.db, default="free", ttl_s=0)
    meter = Meter(usage_service.db, plans, QuotaSnapshots())
    again = await meter.meter(events + events)
    assert (again.new, again.duplicates) == (0, 4)  # queued, two steps, the outcome (the others add nothing)
    assert await export(client, tenant) == day
    stats = await client.call(UsageOp.FLOW_STATS, {"flowId": run.flow_id}, tenant=tenant)
    assert stats["executionsTotal"] == 1 and stats["succeeded"] == 1 and stats["avgDurationMs"] == 50


async def test_a_lone_event_is_metered_at_once_not_after_a_redelivery(js: JetStreamContext, tenant: str) -> None:
    for _ in range(3):
        started = time.monotonic()
        await publish(js, Run(tenant).queued())
        await drained(js)
        assert time.monotonic() - started < 5  # a dropped partial batch would come back after ack_wait (10 s)


async def test_only_the_event_types_that_count_are_delivered_to_the_meter(js: JetStreamContext, tenant: str) -> None:
    await drained(js)
    info = await js.consumer_info(RUN_EVENTS.name, USAGE_METER.durable)
    assert sorted(info.config.filter_subjects or []) == sorted(f"fm.runs.*.*.*.{t}" for t in METERED_TYPES)
    before = info.delivered.consumer_seq
    run = Run(tenant)
    await publish(js, run.queued())
    await publish(js, run.event("run.started"))
    await publish(js, run.event("step.started", step_id="a"))
    await drained(js)
    info = await js.consumer_info(RUN_EVENTS.name, USAGE_METER.durable)
    assert info.delivered.consumer_seq == before + 1  # started events never reach the meter


async def test_malformed_messages_are_skipped_and_the_rest_of_the_batch_counts(
    client: RpcClient, js: JetStreamContext, tenant: str
) -> None:
    run = Run(tenant)
    subject = f"fm.runs.{tenant}.{run.flow_id}.{run.id}.run.queued"
    await js.publish(subject, b"not json")
    await js.publish(subject, orjson.dumps({"id": "nope", "tenantId": tenant}))
    await publish(js, run.queued(), run.final("failed", ms=7, error={"message": "x", "type": "fail"}))
    await drained(js)
    day = await export(client, tenant)
    assert (day["runs"], day["runsFailed"], day["runsSucceeded"]) == (1, 1, 0)


async def test_children_retries_in_place_and_quota_refusals_follow_the_metering_rules(
    client: RpcClient, js: JetStreamContext, tenant: str
) -> None:
    parent = Run(tenant)
    child = Run(tenant, parent=parent.id)
    refused = Run(tenant)
    events = [
        parent.queued(),
        child.queued(),
        child.step("work", "http", ms=10),
        child.final("succeeded", ms=11),
        parent.step("sub", "subflow", ms=20, ok=False),
        parent.final("failed", ms=30, error={"message": "boom", "type": "error"}),
        # retry in place: the same run queued again, then it succeeds; not a new run
        parent.queued(retryCount=1),
        parent.step("sub", "subflow", ms=25),
        parent.final("succeeded", ms=60),
        refused.final("failed", ms=0, error={"message": "over the plan", "type": "quota-exceeded"}),
    ]
    await publish(js, *events)
    await drained(js)
    day = await export(client, tenant)
    assert (day["runs"], day["childRuns"], day["runsRefused"]) == (1, 1, 1)
    assert (day["runsSucceeded"], day["runsFailed"]) == (1, 1)  # the parent's two outcomes; the child's apart
    assert (day["steps"], day["stepMs"]) == (3, 55)
    stats = await client.call(UsageOp.FLOW_STATS, {"flowId": parent.flow_id}, tenant=tenant)
    # the retried run counts once, with its latest outcome; the refused run is no execution
    assert (stats["executionsTotal"], stats["succeeded"], stats["failed"]) == (1, 1, 0)
    assert stats["avgDurationMs"] == 60


async def test_flow_stats_from_many_runs_in_any_order(client: RpcClient, js: JetStreamContext, tenant: str) -> None:
    flow_id = Run(tenant).flow_id
    durations = [10, 20, 30, 40, 50, 60, 70, 80, 90, 1000]
    finals, queues = [], []
    for i, ms in enumerate(durations):
        run = Run(tenant, flow_id)
        queues.append(run.queued())
        status = "failed" if i == 0 else "cancelled" if i == 1 else "succeeded"
        finals.append(run.final(status, ms=ms))
    await publish(js, *reversed(finals))  # outcomes before their runs were queued
    await publish(js, *queues)
    await drained(js)
    stats = await client.call(UsageOp.FLOW_STATS, {"flowId": flow_id}, tenant=tenant)
    assert (stats["executionsTotal"], stats["succeeded"], stats["failed"], stats["cancelled"]) == (10, 8, 1, 1)
    assert stats["avgDurationMs"] == sum(durations) / 10
    assert stats["p95DurationMs"] == 90 + 0.55 * (1000 - 90)  # percentile_cont: linear between the 9th and 10th
    assert stats["lastExecutedAt"] == max(q["ts"] for q in queues)
    unknown = await client.call(UsageOp.FLOW_STATS, {"flowId": Run(tenant).flow_id}, tenant=tenant)
    assert unknown["executionsTotal"] == 0 and unknown["p95DurationMs"] is None


async def kv_quota(js: JetStreamContext, tenant: str) -> TenantQuota | None:
    kv = await js.key_value(QUOTA_BUCKET)
    try:
        entry = await kv.get(quota_key(tenant))
    except KeyNotFoundError:
        return None
    assert entry.value is not None
    return TenantQuota.model_validate(orjson.loads(entry.value))


async def wait_quota(js: JetStreamContext, tenant: str, **expected: Any) -> TenantQuota:
    deadline = time.monotonic() + 10
    found = None
    while time.monotonic() < deadline:
        found = await kv_quota(js, tenant)
        if found is not None and all(getattr(found, k) == v for k, v in expected.items()):
            return found
        await asyncio.sleep(0.05)
    raise AssertionError(f"the snapshot of {tenant} is {found}, not {expected}")


async def test_the_quota_snapshot_follows_runs_and_plan_changes(
    client: RpcClient, js: JetStreamContext, tenant: str
) -> None:
    runs = [Run(tenant) for _ in range(3)]
    await publish(js, *(r.queued() for r in runs))
    snap = await wait_quota(js, tenant, runs_used=3)
    assert (snap.plan, snap.plan_revision, snap.runs_limit, snap.runs_exhausted) == ("free", 0, 1000, False)
    assert snap.period == datetime.now(UTC).strftime("%Y-%m") and snap.runs_in_flight_limit == 10
    answer = await client.call(UsageOp.QUOTA, tenant=tenant)
    assert {**answer, "updatedAt": None} == {**snap.wire(), "updatedAt": None}

    await client.call(UsageOp.PLAN_SET, {"tenantId": tenant, "plan": "pro"}, tenant="ops", role="admin")
    snap = await wait_quota(js, tenant, plan="pro")
    assert (snap.plan_revision, snap.runs_used, snap.runs_limit, snap.overage_allowed) == (1, 3, 100_000, True)
    assert snap.caps == PLANS["pro"].caps() and snap.caps.foreach_items == 1_000
    assert await client.call(UsageOp.PLAN, tenant=tenant) == {
        "tenantId": tenant,
        "plan": "pro",
        "assigned": True,
        "limits": PLANS["pro"].wire(),
    }

    # a plan whose limit is reached refuses the next run, and the snapshot says so
    await client.call(UsageOp.PLAN_SET, {"tenantId": tenant, "plan": "free"}, tenant="ops", role="admin")
    more = [Run(tenant) for _ in range(2)]
    await publish(js, *(r.queued() for r in more))
    snap = await wait_quota(js, tenant, runs_used=5, plan="free", plan_revision=2)
    assert snap.runs_exhausted is False  # 5 of 1,000


async def test_plan_changes_are_for_admins_and_known_plans(client: RpcClient, tenant: str) -> None:
    with pytest.raises(Forbidden):
        await client.call(UsageOp.PLAN_SET, {"tenantId": tenant, "plan": "pro"}, tenant=tenant)
    with pytest.raises(InvalidInput) as refused:
        await client.call(UsageOp.PLAN_SET, {"tenantId": tenant, "plan": "gold"}, tenant="ops", role="admin")
    assert refused.value.errors and refused.value.errors[0].path == "/plan"
    for bad in ({"tenantId": f"{tenant}\u0000", "plan": "pro"}, {"tenantId": tenant, "plan": "pro\u0000"}):
        with pytest.raises(InvalidInput):  # PostgreSQL text holds no NUL: a 422, not a 500
            await client.call(UsageOp.PLAN_SET, bad, tenant="ops", role="admin")
    answer = await client.call(UsageOp.PLAN, tenant=tenant)
    assert answer == {"tenantId": tenant, "plan": "free", "assigned": False, "limits": PLANS["free"].wire()}


@pytest.mark.parametrize("plan", sorted(PLANS))
async def test_the_plans_table_holds_every_plans_caps_as_the_contracts_say(
    client: RpcClient, tenant: str, plan: str
) -> None:
    """Migration 0004 wrote its own copy of the figures: they must be the contracts' (plans.py)."""
    await client.call(UsageOp.PLAN_SET, {"tenantId": tenant, "plan": plan}, tenant="ops", role="admin")
    answer = await client.call(UsageOp.PLAN, tenant=tenant)
    assert answer["limits"] == PLANS[plan].wire()
    quota = TenantQuota.model_validate(await client.call(UsageOp.QUOTA, tenant=tenant))
    assert quota.caps == PLANS[plan].caps()
