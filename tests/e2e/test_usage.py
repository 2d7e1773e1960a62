"""Usage end to end (usage is exact: guarantee 3 of docs/architecture.md#guarantees): the dashboard,
flow statistics and the billing export against known runs, exact counters after duplicate events and
a SIGKILLed usage service, admin-only plan changes, and BYOK keys that are never shown or logged whole."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import secrets
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import nats
import pytest

from flowmesh.contracts import headers
from flowmesh.contracts.models.usage import KEYS_REVEAL_ROLE
from flowmesh.contracts.streams import RUN_EVENTS, USAGE_METER
from flowmesh.contracts.subjects import UsageOp, run_event
from stack import ProcessStack, chain, publish_flow, wait_run

T = {"id": "start", "type": "trigger", "data": {}}
FAILING = {
    "nodes": [T, {"id": "boom", "type": "fail", "data": {"message": "no"}}],
    "edges": [{"id": "e", "source": "start", "target": "boom"}],
}
FINAL = {"run.succeeded", "run.failed", "run.cancelled", "run.timedOut"}
STATUS_FIELD = {
    "run.succeeded": "runsSucceeded",
    "run.failed": "runsFailed",
    "run.cancelled": "runsCancelled",
    "run.timedOut": "runsTimedOut",
}


@pytest.fixture
def tenant() -> str:
    return f"usage-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def c(stack: ProcessStack, tenant: str) -> Iterator[httpx.Client]:
    with stack.client(tenant) as client:
        yield client


@pytest.fixture
def admin(stack: ProcessStack) -> Iterator[httpx.Client]:
    with stack.client(f"ops-{uuid.uuid4().hex[:6]}", role="admin") as client:
        yield client


def today() -> str:
    return datetime.now(UTC).date().isoformat()


def run_flow(c: httpx.Client, flow_id: str, n: int) -> list[dict[str, Any]]:
    started = []
    for i in range(n):
        r = c.post(f"/flows/{flow_id}/runs", json={"input": {"v": i}})
        assert r.status_code == 201, r.text
        started.append(r.json()["id"])
    return [wait_run(c, run_id) for run_id in started]


def events_of(c: httpx.Client, run_id: str) -> list[dict[str, Any]]:
    r = c.get(f"/runs/{run_id}/events", params={"pageSize": 1000})
    assert r.status_code == 200, r.text
    items: list[dict[str, Any]] = r.json()["items"]
    return items


def expected_usage(c: httpx.Client, run_ids: list[str]) -> dict[str, int]:
    """What the runs' events say, by the metering rules."""
    counts: Counter[str] = Counter()
    for run_id in run_ids:
        for e in events_of(c, run_id):
            data = e["data"]
            top = data.get("parentRunId") is None
            if e["type"] == "run.queued" and not data.get("retryCount"):
                counts["runs" if top else "childRuns"] += 1
            elif e["type"] in FINAL and top:
                counts[STATUS_FIELD[e["type"]]] += 1
            elif e["type"] in ("step.succeeded", "step.failed") and data["stepType"] != "trigger":
                counts["steps"] += 1
                counts["stepMs"] += data["durationMs"]
    return {k: v for k, v in counts.items() if v}  # as the export sums it: zeros left out


def exported(c: httpx.Client) -> dict[str, int]:
    """The tenant's metered usage over yesterday and today (a test may cross midnight UTC)."""
    since = (datetime.now(UTC) - timedelta(days=1)).date().isoformat()
    r = c.get("/usage/export", params={"from": since, "to": today()})
    assert r.status_code == 200, r.text
    total: Counter[str] = Counter()
    for day in r.json()["items"]:
        total.update({k: v for k, v in day.items() if isinstance(v, int) and v})
    return dict(total)


def eventually(read: Callable[[], Any], expected: Any, timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    found = read()
    while found != expected and time.monotonic() < deadline:
        time.sleep(0.1)
        found = read()
    assert found == expected
    return found


async def _drained(nats_url: str, timeout: float = 30) -> None:
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = await js.consumer_info(RUN_EVENTS.name, USAGE_METER.durable)
            if info.num_pending == 0 and info.num_ack_pending == 0:
                return
            await asyncio.sleep(0.1)
        raise TimeoutError("metering did not catch up")
    finally:
        await nc.close()


def p95(values: list[int]) -> float:
    """PostgreSQL's percentile_cont(0.95): linear between the two nearest ranks."""
    ordered = sorted(values)
    rank = 0.95 * (len(ordered) - 1)
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (rank - low) * (ordered[high] - ordered[low])


def test_the_dashboard_and_flow_stats_match_a_known_set_of_runs(
    c: httpx.Client, admin: httpx.Client, tenant: str, mallory: httpx.Client
) -> None:
    good = publish_flow(c, chain(3))
    bad = publish_flow(c, FAILING)
    runs = run_flow(c, good, 3) + run_flow(c, bad, 2)
    assert [r["status"] for r in runs] == ["succeeded"] * 3 + ["failed"] * 2
    expected = expected_usage(c, [r["id"] for r in runs])
    expected.pop("stepMs", None)  # pure steps take 0 ms or a few
    assert expected == {"runs": 5, "runsSucceeded": 3, "runsFailed": 2, "steps": 11}

    def used() -> tuple[int, int]:
        u = c.get("/usage").json()
        return u["runsUsed"], u["stepsUsed"]

    eventually(used, (5, 11))
    usage = c.get("/usage", params={"period": "current"}).json()
    now = datetime.now(UTC)
    start = datetime(now.year, now.month, 1, tzinfo=UTC)
    assert usage["plan"] == "enterprise" and usage["runsLimit"] is None and usage["runsPercentage"] is None
    assert usage["tokensUsed"] == 0 and usage["estimatedOverage"] == 0
    assert usage["periodStart"] == start.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    assert 1 <= usage["daysRemaining"] <= 31
    assert c.get("/usage", params={"period": "previous"}).json()["runsUsed"] == 0

    r = admin.put(f"/admin/tenants/{tenant}/plan", json={"plan": "pro"})
    assert r.status_code == 200 and r.json() == {"tenantId": tenant, "plan": "pro"}
    pro = c.get("/usage").json()
    assert (pro["plan"], pro["runsLimit"], pro["runsPercentage"]) == ("pro", 100_000, round(5 * 100 / 100_000, 2))

    durations = {}
    for r in runs:
        evs = events_of(c, r["id"])
        durations[r["id"]] = (evs[0]["ts"], next(e["data"]["durationMs"] for e in evs if e["type"] in FINAL))
    good_runs = [durations[r["id"]] for r in runs[:3]]
    eventually(lambda: c.get(f"/flows/{good}/stats").json()["succeeded"], 3)
    stats = c.get(f"/flows/{good}/stats").json()
    assert (stats["succeeded"], stats["failed"], stats["cancelled"], stats["timedOut"]) == (3, 0, 0, 0)
    assert stats["avgDurationMs"] == pytest.approx(sum(d for _, d in good_runs) / 3, abs=0.001)
    assert stats["p95DurationMs"] == pytest.approx(p95([d for _, d in good_runs]), abs=0.001)
    assert stats["lastExecutedAt"] == max(ts for ts, _ in good_runs)
    failed = c.get(f"/flows/{bad}/stats").json()
    assert (failed["executionsTotal"], failed["succeeded"], failed["failed"]) == (2, 0, 2)

    assert c.get(f"/flows/{uuid.uuid4()}/stats").status_code == 404
    assert c.get("/flows/not-a-flow/stats").status_code == 404
    assert mallory.get(f"/flows/{good}/stats").status_code == 404  # another tenant's flow


def test_the_export_is_per_day_in_json_and_csv_and_refuses_bad_queries(c: httpx.Client, tenant: str) -> None:
    flow_id = publish_flow(c, chain(2))
    run_flow(c, flow_id, 2)
    eventually(lambda: exported(c).get("runsSucceeded", 0), 2)
    doc = c.get("/usage/export", params={"from": today(), "to": today(), "format": "json"})
    assert doc.status_code == 200 and doc.headers["content-type"].startswith("application/json")
    body = doc.json()
    assert (body["tenantId"], body["from"], body["to"]) == (tenant, today(), today())
    (day,) = body["items"]
    assert (day["date"], day["tenantId"], day["runs"], day["steps"], day["runsSucceeded"]) == (
        today(),
        tenant,
        2,
        4,
        2,
    )

    text = c.get("/usage/export", params={"from": today(), "to": today(), "format": "csv"})
    assert text.status_code == 200 and text.headers["content-type"].startswith("text/csv")
    assert "attachment" in text.headers["content-disposition"]
    rows = list(csv.DictReader(io.StringIO(text.text)))
    assert len(rows) == 1 and rows[0]["date"] == today() and rows[0]["runs"] == "2" and rows[0]["steps"] == "4"
    assert rows[0]["tenantId"] == tenant

    this_month = c.get("/usage/export").json()  # default: this month so far
    assert this_month["to"] == today() and this_month["items"][-1]["date"] == today()
    empty = c.get("/usage/export", params={"from": "2020-01-01", "to": "2020-01-31"}).json()
    assert empty["items"] == []

    for params in (
        {"from": "2026-02-30"},
        {"from": "20260101"},
        {"from": "1700000000"},
        {"to": "tomorrow"},
        {"format": "xml"},
        {"from": "2026-03-02", "to": "2026-03-01"},
        {"from": "2024-01-01", "to": "2026-01-01"},
    ):
        r = c.get("/usage/export", params=params)
        assert r.status_code == 422, (params, r.text)
        assert r.headers["content-type"].startswith("application/problem+json") and r.json()["errors"]
    for period in ("last", "2026-13", "2026-1"):
        assert c.get("/usage", params={"period": period}).status_code == 422


def test_only_admins_change_plans_and_only_to_known_plans(
    c: httpx.Client, admin: httpx.Client, stack: ProcessStack, tenant: str
) -> None:
    r = c.put(f"/admin/tenants/{tenant}/plan", json={"plan": "high_frequency"})
    assert r.status_code == 403 and r.json()["type"] == "forbidden"
    assert c.get("/usage").json()["plan"] == "enterprise"  # nothing changed

    assert admin.put(f"/admin/tenants/{tenant}/plan", json={"plan": "gold"}).status_code == 422
    assert admin.put(f"/admin/tenants/{tenant}/plan", json={"plan": "pro", "extra": 1}).status_code == 422
    assert admin.put(f"/admin/tenants/{tenant}/plan", json={}).status_code == 422
    broken = admin.put(f"/admin/tenants/{tenant}/plan", content=b"{", headers={"Content-Type": "application/json"})
    assert broken.status_code == 400
    assert admin.put(f"/admin/tenants/{'x' * 300}/plan", json={"plan": "pro"}).status_code == 422

    new_tenant = f"new-{uuid.uuid4().hex[:8]}"
    r = admin.put(f"/admin/tenants/{new_tenant}/plan", json={"plan": "free"})
    assert r.status_code == 200 and r.json() == {"tenantId": new_tenant, "plan": "free"}
    with stack.client(new_tenant) as newcomer:
        usage = newcomer.get("/usage").json()
        assert (usage["plan"], usage["runsLimit"], usage["runsUsed"], usage["runsPercentage"]) == ("free", 1000, 0, 0)
    r = admin.put(f"/admin/tenants/{new_tenant}/plan", json={"plan": "enterprise"})
    assert r.status_code == 200 and r.json()["plan"] == "enterprise"


def test_keys_are_never_returned_or_logged_whole(
    c: httpx.Client, mallory: httpx.Client, stack: ProcessStack, infra: Any, tenant: str
) -> None:
    key = "sk-e2e-" + secrets.token_urlsafe(32)
    r = c.post("/api-keys", json={"provider": "openai", "apiKey": key})
    assert r.status_code == 201, r.text
    assert r.json()["keyHint"] == "…" + key[-4:] and r.json()["provider"] == "openai"
    assert key not in r.text and key[:-4] not in r.text
    listed = c.get("/api-keys")
    assert listed.status_code == 200 and key not in listed.text
    assert [k["provider"] for k in listed.json()["items"]] == ["openai"]
    assert mallory.get("/api-keys").json() == {"items": []}

    replacement = "sk-e2e-" + secrets.token_urlsafe(32)
    assert c.post("/api-keys", json={"provider": "OpenAI", "apiKey": replacement}).status_code == 201
    (only,) = c.get("/api-keys").json()["items"]
    assert only["keyHint"] == "…" + replacement[-4:]

    async def reveal(role: str) -> Any:
        nc = await nats.connect(infra.nats_url)
        try:
            hdrs = {headers.TENANT: tenant, headers.ROLE: role, headers.SCHEMA: headers.SCHEMA_VERSION}
            msg = await nc.request(UsageOp.KEYS_REVEAL, json.dumps({"provider": "openai"}).encode(), headers=hdrs)
            return json.loads(msg.data)
        finally:
            await nc.close()

    assert asyncio.run(reveal("member"))["error"]["status"] == 403
    assert asyncio.run(reveal("admin"))["error"]["status"] == 403
    assert asyncio.run(reveal(KEYS_REVEAL_ROLE))["data"] == {"provider": "openai", "apiKey": replacement}
    assert c.get("/api-keys").json()["items"][0]["lastUsedAt"] is not None

    for body in (
        {"provider": "openai"},
        {"apiKey": key},
        {"provider": "open ai", "apiKey": key},
        {"provider": "openai", "apiKey": "has a space"},
        {"provider": "openai", "apiKey": key, "note": "x"},
        {"provider": "x" * 65, "apiKey": key},
    ):
        bad = c.post("/api-keys", json=body)
        assert bad.status_code == 422, (body, bad.text)
        assert key not in bad.text
    assert c.post("/api-keys", content=b"nope", headers={"Content-Type": "application/json"}).status_code == 400

    assert mallory.delete("/api-keys/openai").status_code == 404
    assert c.delete("/api-keys/bad%20name").status_code == 404
    assert c.delete("/api-keys/openai").status_code == 204
    assert c.delete("/api-keys/openai").status_code == 404
    assert c.get("/api-keys").json() == {"items": []}

    for name in ("usage", "gateway"):
        text = (stack.workdir / f"{name}.log").read_text(errors="replace")
        assert key not in text and replacement not in text, f"a key is in the {name} log"


def test_a_republished_run_event_is_counted_once(c: httpx.Client, infra: Any, tenant: str) -> None:
    flow_id = publish_flow(c, chain(2))
    (run,) = run_flow(c, flow_id, 1)
    eventually(lambda: exported(c).get("runsSucceeded", 0), 1)
    before = exported(c)
    assert before["runs"] == 1 and before["steps"] == 2

    async def republish() -> None:
        nc = await nats.connect(infra.nats_url)
        try:
            js = nc.jetstream()
            for e in events_of(c, run["id"]):
                # a new message id: JetStream's de-duplication cannot catch it, the event id must
                await js.publish(
                    run_event(tenant, flow_id, run["id"], e["type"]),
                    json.dumps(e).encode(),
                    headers={headers.MSG_ID: f"again-{e['id']}", headers.TENANT: tenant},
                )
        finally:
            await nc.close()

    asyncio.run(republish())
    asyncio.run(_drained(infra.nats_url))
    assert exported(c) == before
    assert c.get(f"/flows/{flow_id}/stats").json()["executionsTotal"] == 1


def test_counters_are_exact_after_the_usage_service_is_killed_mid_stream(
    c: httpx.Client, stack: ProcessStack, infra: Any
) -> None:
    flows = [publish_flow(c, chain(4)), publish_flow(c, FAILING)]
    started: list[str] = []

    def start(n: int) -> None:
        for i in range(n):
            r = c.post(f"/flows/{flows[i % 2]}/runs", json={"input": {"v": i}})
            assert r.status_code == 201, r.text
            started.append(r.json()["id"])

    try:
        start(20)
        stack.kill("usage")  # SIGKILL, while it meters what the first runs published
        start(20)  # events pile up in RUN_EVENTS meanwhile
        stack.start("usage")
        start(10)
        time.sleep(0.3)
        stack.kill("usage")  # again, while it catches up
        start(10)
    finally:
        if "usage" not in stack.procs:
            stack.start("usage")
    stack.wait_ready()
    for run_id in started:
        wait_run(c, run_id)
    expected = expected_usage(c, started)
    assert expected["runs"] == 60 and expected["runsSucceeded"] == 30 and expected["runsFailed"] == 30
    eventually(lambda: exported(c), expected, timeout=60)
    asyncio.run(_drained(infra.nats_url))
    assert exported(c) == expected
    usage = c.get("/usage").json()
    assert (usage["runsUsed"], usage["stepsUsed"]) == (60, expected["steps"])
