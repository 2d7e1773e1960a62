"""A plan's caps end to end (P9), on the `free` plan's own figures (``flowmesh.contracts.plans``).

The figures travel as in production: the plans table (migration 0004) → the usage service → the
``fm_quota`` snapshot (flows, runner) and the plan lookup (gateway). Each test puts a tenant of its
own on `free` through the admin API; the stack's default plan is `enterprise`. Free allows 20 API
requests per second, so the tests go gently where they do not mean to hit a limit.
"""

from __future__ import annotations

import contextlib
import secrets
import time
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import ClientConnection, connect

from flowmesh.contracts.plans import FREE
from flowmesh.contracts.testing import linear, node
from stack import ProcessStack, chain, publish_flow, token, wait_run


@pytest.fixture
def admin(stack: ProcessStack) -> Iterator[httpx.Client]:
    with stack.client(f"ops-{uuid.uuid4().hex[:6]}", role="admin") as client:
        yield client


@pytest.fixture
def tenant(admin: httpx.Client) -> str:
    tenant = f"caps-{uuid.uuid4().hex[:10]}"
    r = admin.put(f"/admin/tenants/{tenant}/plan", json={"plan": "free"})
    assert r.status_code == 200, r.text
    return tenant


@pytest.fixture
def c(stack: ProcessStack, tenant: str) -> Iterator[httpx.Client]:
    with stack.client(tenant) as client:
        yield client


@pytest.fixture
def public(stack: ProcessStack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.base + "/api/v1", timeout=15) as client:
        yield client


def problem(r: httpx.Response, status: int, type_: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = r.json()
    assert body["type"] == type_
    return body


def webhook(c: httpx.Client, flow_id: str) -> dict[str, Any]:
    r = c.post(f"/flows/{flow_id}/triggers", json={"type": "webhook", "name": "in"})
    assert r.status_code == 201, r.text
    return dict(r.json())


def schedule(c: httpx.Client, flow_id: str, cron: str) -> httpx.Response:
    return c.post(f"/flows/{flow_id}/triggers", json={"type": "schedule", "name": "tick", "config": {"cron": cron}})


# --- flows: triggers per flow, the shortest cron interval --------------------------------------------


def test_a_flow_has_at_most_the_plans_triggers_however_they_are_made(c: httpx.Client) -> None:
    assert FREE.triggers_per_flow == 5
    draft = c.post("/flows", json={"name": "hooks", "definition": chain(1)})
    assert draft.status_code == 201, draft.text
    flow_id = draft.json()["id"]
    made = [webhook(c, flow_id) for _ in range(5)]  # at the cap
    over = problem(schedule(c, flow_id, "0 * * * *"), 403, "quota-exceeded")
    assert "free plan allows 5 triggers per flow" in over["detail"] and "would have 6" in over["detail"]
    assert len(c.get(f"/flows/{flow_id}/triggers").json()["items"]) == 5

    assert c.delete(f"/triggers/{made[0]['id']}").status_code == 204  # room for one again
    assert schedule(c, flow_id, "0 * * * *").status_code == 201

    document = c.get(f"/flows/{flow_id}/export").json()
    assert c.delete(f"/flows/{flow_id}").status_code == 204  # the free plan's one flow
    document["flow"]["triggers"].append(document["flow"]["triggers"][0])
    over = problem(c.post("/flows/import", json=document), 403, "quota-exceeded")
    assert "free plan allows 5 triggers per flow" in over["detail"]
    assert c.get("/flows").json()["total"] == 0  # nothing was made
    document["flow"]["triggers"].pop()
    assert c.post("/flows/import", json=document).status_code == 201


def test_a_schedule_fires_no_more_often_than_the_plans_shortest_interval(c: httpx.Client) -> None:
    assert FREE.cron_min_interval_s == 300
    flow_id = publish_flow(c, chain(1))
    made = schedule(c, flow_id, "*/5 * * * *")  # every 300 s: at the cap
    assert made.status_code == 201, made.text
    for cron, gap in (("*/4 * * * *", "240"), ("0,1 * * * *", "60"), ("* * * * * *", "1")):
        refused = problem(schedule(c, flow_id, cron), 422, "validation-error")
        [error] = refused["errors"]
        assert error["path"] == "/config/cron"
        assert (
            f"fires {gap} s apart" in error["message"]
            and "free plan's shortest cron interval is 300 s" in (error["message"])
        )
    patched = c.patch(f"/triggers/{made.json()['id']}", json={"config": {"cron": "* * * * *"}})
    assert problem(patched, 422, "validation-error")["errors"][0]["path"] == "/config/cron"
    [kept] = c.get(f"/flows/{flow_id}/triggers").json()["items"]
    assert kept["config"]["cron"] == "*/5 * * * *"


# --- runner: foreach items -----------------------------------------------------------------------------


def test_a_foreach_over_the_plans_items_fails_limit_exceeded_and_starts_no_child(
    stack: ProcessStack, admin: httpx.Client, c: httpx.Client, tenant: str
) -> None:
    assert FREE.foreach_items == 100
    # two flows (a parent and its child) are over the free plan's one: this test's tenant is on pro
    # for a moment to make them, then back on free (the caps are read when a run's step starts)
    assert admin.put(f"/admin/tenants/{tenant}/plan", json={"plan": "pro"}).status_code == 200
    child = publish_flow(c, linear(node("x", output="ok")))
    parent = publish_flow(
        c,
        {
            "nodes": [
                {"id": "start", "type": "trigger", "data": {}},
                {"id": "each", "type": "foreach", "data": {"flowId": child, "items": "input.xs"}},
            ],
            "edges": [{"id": "e", "source": "start", "target": "each"}],
        },
    )
    assert admin.put(f"/admin/tenants/{tenant}/plan", json={"plan": "free"}).status_code == 200
    deadline = time.monotonic() + 30
    while True:  # the runner follows the plan change through the fm_quota snapshot
        r = c.post(f"/flows/{parent}/runs", json={"input": {"xs": list(range(101))}})
        assert r.status_code == 201, r.text
        run = wait_run(c, r.json()["id"])
        if run["status"] == "failed" and run["error"]["type"] == "limit-exceeded":
            break
        assert time.monotonic() < deadline, f"the free plan's caps never applied: {run}"
        time.sleep(0.5)
    assert run["error"] == {
        "message": "step 'each': 101 items, over the free plan's cap of 100 foreach items",
        "stepId": "each",
        "type": "limit-exceeded",
    }
    started = c.get("/runs", params={"flowId": child, "pageSize": 100}).json()["items"]
    assert all(x.get("parentRunId") != run["id"] for x in started)


# --- gateway: webhooks in a bucket of their own, unknown tokens per address ------------------------------


def test_a_webhook_flood_is_refused_in_its_own_bucket_and_the_api_still_answers(
    c: httpx.Client, public: httpx.Client
) -> None:
    assert FREE.webhooks_per_second == 10 and FREE.requests_per_second == 20
    flow_id = publish_flow(c, chain(1))
    url = urlsplit(webhook(c, flow_id)["url"]).path.removeprefix("/api/v1")
    answers = [public.post(url, json={"i": i}) for i in range(40)]
    bucket = [r for r in answers if r.status_code == 429 and "webhook deliveries per second" in r.json()["detail"]]
    assert bucket, [r.status_code for r in answers]
    assert all(r.status_code == 202 or "runs of this tenant" in r.text for r in answers[:10])  # the burst: 10
    assert all(int(r.headers["Retry-After"]) >= 1 for r in bucket)
    assert "free plan's 10 webhook deliveries per second" in bucket[0].json()["detail"]
    # the tenant's API bucket is untouched: a second's worth of requests all answered
    assert [c.get("/flows").status_code for _ in range(15)] == [200] * 15


def test_lookups_of_unknown_webhook_urls_are_limited_per_client_address(c: httpx.Client, public: httpx.Client) -> None:
    def unknown() -> httpx.Response:
        return public.post(f"/hooks/{secrets.token_urlsafe(24)}", json={})

    time.sleep(1.1)  # a full bucket for this address, whatever ran before (one second refills it)
    statuses = [unknown().status_code for _ in range(10)]  # the burst: 10 per second
    assert statuses == [404] * 10
    deadline = time.monotonic() + 5
    while (r := unknown()).status_code == 404:
        assert time.monotonic() < deadline, "never limited"
    problem(r, 429, "rate-limited")
    assert "unknown webhook URLs" in r.json()["detail"] and int(r.headers["Retry-After"]) >= 1
    # the tenant is not concerned (unknown tokens have none), and the address recovers
    assert c.get("/flows").status_code == 200
    time.sleep(int(r.headers["Retry-After"]))
    assert unknown().status_code == 404


# --- gateway: WebSockets per token and per tenant ------------------------------------------------------


def ws(stack: ProcessStack, path: str, bearer: str) -> ClientConnection:
    url = "ws://" + urlsplit(stack.base).netloc + path
    return connect(url, subprotocols=["flowmesh.v1", "bearer." + bearer], open_timeout=10)  # type: ignore[list-item]


def ws_refused(stack: ProcessStack, path: str, bearer: str) -> tuple[int, str]:
    with pytest.raises(InvalidStatus) as exc:
        ws(stack, path, bearer)
    response = exc.value.response
    assert response.headers["Retry-After"] == "1"
    return response.status_code, response.body.decode() if response.body else ""


def test_websockets_are_capped_per_token_and_per_tenant_before_upgrading(
    stack: ProcessStack, c: httpx.Client, tenant: str
) -> None:
    assert (FREE.websockets_per_token, FREE.websockets_per_tenant) == (5, 10)
    flow_id = publish_flow(c, chain(1))
    path = f"/ws/flows/{flow_id}"
    first, second, third = (token(f"{tenant}-{who}", tenant=tenant) for who in ("a", "b", "c"))
    with contextlib.ExitStack() as held:
        for _ in range(4):
            held.enter_context(ws(stack, path, first))
        with ws(stack, path, first):  # the fifth: at the token's cap
            status, body = ws_refused(stack, path, first)
            assert status == 429 and "5 WebSockets open, the free plan's cap per token" in body
        deadline = time.monotonic() + 10  # the gateway sees the close: the token has room for one again
        while True:
            try:
                held.enter_context(ws(stack, path, first))
                break
            except InvalidStatus:
                assert time.monotonic() < deadline, "a closed socket was never given back"
                time.sleep(0.1)
        for _ in range(5):  # the tenant's 10: at its cap
            held.enter_context(ws(stack, path, second))
        status, body = ws_refused(stack, path, third)
        assert status == 429 and "10 WebSockets open, the free plan's cap per tenant" in body
