"""Plan limits end to end (``flowmesh.contracts.plans``): the flow limit, the free plan's monthly runs, runs in flight.

Each test puts a tenant of its own on the `free` plan through the admin API; the stack's default plan
is `enterprise`. The free plan allows 20 requests per second, so the tests poll gently.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import nats
import pytest

from flowmesh.contracts import headers
from flowmesh.contracts.models.usage import TenantQuota, quota_key
from flowmesh.contracts.streams import QUOTA_BUCKET
from flowmesh.contracts.subjects import RUN_START_CMD
from stack import ProcessStack, chain, publish_flow
from upstream import Upstream

POLL_S = 0.25  # 4 requests per second: well inside the free plan's 20


@pytest.fixture
def admin(stack: ProcessStack) -> Iterator[httpx.Client]:
    with stack.client(f"ops-{uuid.uuid4().hex[:6]}", role="admin") as client:
        yield client


@pytest.fixture
def tenant(admin: httpx.Client) -> str:
    tenant = f"free-{uuid.uuid4().hex[:10]}"
    set_plan(admin, tenant, "free")
    return tenant


@pytest.fixture
def c(stack: ProcessStack, tenant: str) -> Iterator[httpx.Client]:
    with stack.client(tenant) as client:
        yield client


def set_plan(admin: httpx.Client, tenant: str, plan: str) -> None:
    r = admin.put(f"/admin/tenants/{tenant}/plan", json={"plan": plan})
    assert r.status_code == 200, r.text


def eventually(read: Callable[[], Any], until: Callable[[Any], bool], timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while not until(found := read()):
        assert time.monotonic() < deadline, f"still {found!r} after {timeout}s"
        time.sleep(POLL_S)
    return found


def refused(r: httpx.Response, status: int, type_: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    problem: dict[str, Any] = r.json()
    assert problem["type"] == type_
    return problem


async def _send_starts(nats_url: str, tenant: str, flow_id: str, keys: list[str]) -> None:
    """Durable starts, as a schedule or an event trigger sends them."""
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        acks = [
            await js.publish_async(
                RUN_START_CMD,
                json.dumps(
                    {"flowId": flow_id, "input": {"v": i}, "idempotencyKey": key, "triggerType": "schedule"}
                ).encode(),
                headers={headers.TENANT: tenant, headers.SCHEMA: "1", headers.MSG_ID: f"{tenant}:{key}"},
            )
            for i, key in enumerate(keys)
        ]
        await asyncio.gather(*acks)
    finally:
        await nc.close()


async def _snapshot(nats_url: str, tenant: str) -> TenantQuota | None:
    nc = await nats.connect(nats_url)
    try:
        kv = await nc.jetstream().key_value(QUOTA_BUCKET)
        try:
            entry = await kv.get(quota_key(tenant))
        except nats.js.errors.KeyNotFoundError:
            return None
        return TenantQuota.model_validate_json(entry.value or b"")
    finally:
        await nc.close()


def test_the_flow_limit_refuses_a_new_flow_however_it_is_made(
    c: httpx.Client, admin: httpx.Client, tenant: str
) -> None:
    first = c.post("/flows", json={"name": "one", "definition": chain(1)})
    assert first.status_code == 201, first.text
    flow_id = first.json()["id"]

    problem = refused(c.post("/flows", json={"name": "two"}), 403, "quota-exceeded")
    assert "free plan allows 1 flow" in problem["detail"] and "upgrade" in problem["detail"]
    refused(c.post(f"/flows/{flow_id}/duplicate"), 403, "quota-exceeded")
    export = c.get(f"/flows/{flow_id}/export")
    assert export.status_code == 200
    refused(c.post("/flows/import", json=export.json()), 403, "quota-exceeded")
    assert c.get("/flows").json()["total"] == 1  # nothing was made

    assert c.delete(f"/flows/{flow_id}").status_code == 204  # a deleted flow no longer counts
    assert c.post("/flows", json={"name": "again"}).status_code == 201
    refused(c.post("/flows", json={"name": "more"}), 403, "quota-exceeded")

    set_plan(admin, tenant, "pro")
    assert c.post("/flows", json={"name": "more"}).status_code == 201
    assert c.get("/flows").json()["total"] == 2


def test_the_free_plans_monthly_runs_are_refused_over_the_limit_and_pro_may_go_over(
    c: httpx.Client, admin: httpx.Client, infra: Any, tenant: str
) -> None:
    flow_id = publish_flow(c, chain(1))
    keys = [f"k{i}" for i in range(1000)]
    asyncio.run(_send_starts(infra.nats_url, tenant, flow_id, keys))
    eventually(lambda: c.get("/usage").json()["runsUsed"], lambda used: used == 1000)
    quota = eventually(lambda: asyncio.run(_snapshot(infra.nats_url, tenant)), lambda q: q and q.runs_exhausted)
    assert (quota.plan, quota.runs_used, quota.runs_limit) == ("free", 1000, 1000)

    problem = refused(c.post(f"/flows/{flow_id}/runs", json={"input": {"v": 1}}), 403, "quota-exceeded")
    assert "1000 runs" in problem["detail"] and "upgrade the plan" in problem["detail"]
    # a repeat of an accepted start still answers with its run
    repeat = c.post(f"/flows/{flow_id}/runs", json={"input": {"v": 0}}, headers={"Idempotency-Key": "k0"})
    assert repeat.status_code == 200, repeat.text

    # a durable start (a schedule's) is recorded as a failed run of type quota-exceeded, not billed
    asyncio.run(_send_starts(infra.nats_url, tenant, flow_id, ["late"]))
    failed = eventually(
        lambda: c.get("/runs", params={"flowId": flow_id, "status": "failed"}).json(), lambda page: page["total"] == 1
    )
    run = failed["items"][0]
    assert run["idempotencyKey"] == "late" and run["error"]["type"] == "quota-exceeded"
    events = c.get(f"/runs/{run['id']}/events").json()["items"]
    assert [e["type"] for e in events] == ["run.failed"]
    since = (datetime.now(UTC) - timedelta(days=1)).date().isoformat()  # the test may cross midnight
    export = {"from": since, "to": datetime.now(UTC).date().isoformat()}
    days = eventually(
        lambda: c.get("/usage/export", params=export).json()["items"],
        lambda days: sum(d["runsRefused"] for d in days) == 1,
    )
    assert sum(d["runs"] for d in days) == 1000 and sum(d["runsFailed"] for d in days) == 0
    assert c.get("/runs", params={"flowId": flow_id}).json()["total"] == 1001

    set_plan(admin, tenant, "pro")  # over its monthly runs, pro bills the overage instead
    eventually(lambda: asyncio.run(_snapshot(infra.nats_url, tenant)), lambda q: q.plan == "pro")
    r = c.post(f"/flows/{flow_id}/runs", json={"input": {"v": 1}})
    assert r.status_code == 201, r.text


def test_runs_in_flight_over_the_plans_limit_get_429_until_some_finish(
    c: httpx.Client, upstream: Upstream, tenant: str
) -> None:
    hold = uuid.uuid4().hex
    flow = {
        "nodes": [
            {"id": "start", "type": "trigger", "data": {}},
            {"id": "wait", "type": "http", "data": {"url": f"{upstream.base}/hold/{hold}"}},
        ],
        "edges": [{"id": "e", "source": "start", "target": "wait"}],
    }
    flow_id = publish_flow(c, flow)
    started = []
    for _ in range(10):  # the free plan's runs in flight
        r = c.post(f"/flows/{flow_id}/runs", json={"input": {}})
        assert r.status_code == 201, r.text
        started.append(r.json()["id"])
    over = c.post(f"/flows/{flow_id}/runs", json={"input": {}})
    problem = refused(over, 429, "rate-limited")
    assert int(over.headers["Retry-After"]) >= 1 and "10 runs" in problem["detail"]
    assert c.get("/runs", params={"flowId": flow_id}).json()["total"] == 10  # nothing was made

    upstream.release(hold)
    eventually(
        lambda: c.get("/runs", params={"flowId": flow_id, "status": "succeeded"}).json()["total"], lambda n: n == 10
    )
    r = c.post(f"/flows/{flow_id}/runs", json={"input": {}})
    assert r.status_code == 201, r.text
