"""OWASP API4:2023 Unrestricted Resource Consumption.

The risk for Flowmesh: one tenant (or anyone, on the public webhook and probe routes) can send
bodies, pages, headers and request rates that cost the shared gateway, the services, NATS and
PostgreSQL memory and time, starving every other tenant.

What these tests prove, as a client trying to exhaust the platform: a body over the limit is a 413
whether its length is announced or streamed in chunks, and creates nothing; pages stop at 100 items;
JSON nested past 64 levels is a 422, however deep; header fields over 8 KiB are a 431; a tenant over
its plan's rate gets 429 with a whole-second ``Retry-After`` while another tenant at the same moment
is served; a request that outlives the gateway's time limit is a 504 and the gateway goes on serving.
The gateway stays ready after each attack. Per plan, in the plans data: a flow's triggers, the
shortest cron interval, a foreach's items (and a run's children), WebSockets per token and per
tenant, a webhook bucket of its own (a flood leaves the API answering), and lookups of unknown
webhook URLs per client address. Deeper tests: ``tests/e2e/test_gateway_rules.py`` (rates
refill, timeouts release idempotency keys, header logs), ``test_sizes.py`` (huge runs stay readable),
``services/runner/tests/test_output_limits.py`` and ``test_rpc_output_limits.py`` (a step's and a
run's recorded output), ``test_webhooks.py`` (webhook bodies) and, here,
``test_api10_unsafe_consumption_of_apis.py`` (upstream bodies and time).
"""

from __future__ import annotations

import contextlib
import json
import secrets
import signal
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import ClientConnection, connect

from attacks import problem
from flowmesh.contracts.plans import FREE
from flowmesh.contracts.testing import linear, node
from stack import ProcessStack, chain, publish_flow, token, wait_run

TIMEOUT_S = 1
MIB = 1024 * 1024


@pytest.fixture(scope="module")
def limited(stack: ProcessStack) -> Iterator[str]:
    """A second gateway whose tenants have the free plan's 20 requests/s and a 1 s request time limit."""
    base = stack.start_gateway(
        "api4", {"FLOWMESH_DEFAULT_PLAN": "free", "FLOWMESH_GATEWAY_REQUEST_TIMEOUT_S": str(TIMEOUT_S)}
    )
    try:
        stack.wait_ready(base=base)
        yield base
    finally:
        stack.kill("gateway#api4", signal.SIGTERM)


def ready(stack: ProcessStack) -> None:
    assert httpx.get(stack.base + "/readyz", timeout=5).status_code == 200


def test_a_body_over_the_limit_is_413_announced_or_streamed_and_creates_nothing(
    stack: ProcessStack, victim: httpx.Client
) -> None:
    big = json.dumps({"name": "big", "description": "x", "inputSchema": {"pad": "y" * (MIB + 10)}}).encode()
    total = victim.get("/flows").json()["total"]
    problem(victim.post("/flows", content=big, headers={"content-type": "application/json"}), 413)

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(big), 64 * 1024):
            yield big[i : i + 64 * 1024]

    r = victim.post("/flows", content=chunks(), headers={"content-type": "application/json"})
    problem(r, 413)
    assert "Content-Length" not in r.request.headers  # it really was streamed
    assert victim.get("/flows").json()["total"] == total
    ready(stack)


@pytest.mark.parametrize("path", ["/flows", "/runs", "/audit"])
def test_pages_stop_at_100_items(victim: httpx.Client, path: str) -> None:
    assert victim.get(path, params={"pageSize": 100}).status_code == 200
    for size in (101, 10**6, -1, 0):
        problem(victim.get(path, params={"pageSize": size}), 422)


def test_deep_json_is_refused_however_deep(stack: ProcessStack, victim: httpx.Client) -> None:
    for depth in (65, 10_000, 200_000):
        body = '{"name": "deep", "inputSchema": ' + '{"a": ' * depth + "1" + "}" * depth + "}"
        if len(body) > MIB:
            body = '{"name": "deep", "inputSchema": ' + "[" * depth + "]" * depth + "}"
        r = victim.post("/flows", content=body.encode(), headers={"content-type": "application/json"})
        assert r.status_code in (400, 413, 422), (depth, r.status_code, r.text[:200])
        assert r.headers["content-type"].startswith("application/problem+json")
    deep = victim.post("/flows", json={"name": "deep", "inputSchema": _nested(70)})
    assert "nested deeper than 64 levels" in json.dumps(problem(deep, 422))
    assert victim.post("/flows", json={"name": "not so deep", "inputSchema": _nested(30)}).status_code == 201
    ready(stack)


def _nested(depth: int) -> dict[str, object]:
    value: dict[str, object] = {}
    for _ in range(depth - 1):
        value = {"a": value}
    return value


def test_header_fields_over_8_kib_are_431(stack: ProcessStack) -> None:
    r = httpx.get(stack.base + "/api/v1/flows", headers={"X-Pad": "p" * 9000}, timeout=10)
    assert r.status_code == 431 and r.json()["type"] == "headers-too-large"
    r = httpx.post(stack.base + "/api/v1/hooks/" + "t" * 9000, timeout=10)  # the public route too
    assert r.status_code == 431
    ready(stack)


def test_a_tenant_over_its_rate_gets_429_and_others_are_still_served(limited: str) -> None:
    greedy = {"Authorization": "Bearer " + token(f"greedy-{uuid.uuid4().hex[:6]}")}
    calm = {"Authorization": "Bearer " + token(f"calm-{uuid.uuid4().hex[:6]}")}
    with httpx.Client(base_url=limited + "/api/v1", timeout=15) as c, ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda _: c.get("/flows", headers=greedy), range(80)))
        served_meanwhile = c.get("/flows", headers=calm)
    statuses = [r.status_code for r in answers]
    assert set(statuses) == {200, 429}, statuses
    assert statuses.count(200) <= 40  # one second of burst and what refilled while the rest arrived
    limited_answer = next(r for r in answers if r.status_code == 429)
    assert problem(limited_answer, 429)["type"] == "rate-limited"
    retry_after = limited_answer.headers["Retry-After"]
    assert retry_after.isdigit() and int(retry_after) >= 1
    assert served_meanwhile.status_code == 200, served_meanwhile.text


def test_a_request_past_the_time_limit_is_504_and_the_gateway_goes_on(stack: ProcessStack, limited: str) -> None:
    headers = {"Authorization": "Bearer " + token(f"slow-{uuid.uuid4().hex[:6]}")}
    flows = stack.procs["flows"]
    flows.send_signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        r = httpx.get(limited + "/api/v1/flows", headers=headers, timeout=30)
        waited = time.monotonic() - started
    finally:
        flows.send_signal(signal.SIGCONT)
    assert problem(r, 504)["type"] == "timeout"
    assert TIMEOUT_S <= waited < TIMEOUT_S + 3
    deadline = time.monotonic() + 15
    while (again := httpx.get(limited + "/api/v1/flows", headers=headers, timeout=10)).status_code != 200:
        assert time.monotonic() < deadline, again.text
        time.sleep(0.1)


# --- Per-plan caps -------------------------------------------------------------------------------
# On the `free` plan's own figures (``flowmesh.contracts.plans``), travelling as in production: the
# plans table (usage migration 0004) → the usage service → the ``fm_quota`` snapshot (flows, runner)
# and the plan lookup (gateway). Each test puts a tenant of its own on `free` through the admin API;
# free allows 20 API requests per second, so the tests go gently where they do not mean to hit a limit.


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


def capped(r: httpx.Response, status: int, type_: str) -> dict[str, Any]:
    """The refusal of a cap: ``status``, a problem+json body of type ``type_``."""
    body = problem(r, status)
    assert body["type"] == type_, body
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
    over = capped(schedule(c, flow_id, "0 * * * *"), 403, "quota-exceeded")
    assert "free plan allows 5 triggers per flow" in over["detail"] and "would have 6" in over["detail"]
    assert len(c.get(f"/flows/{flow_id}/triggers").json()["items"]) == 5

    assert c.delete(f"/triggers/{made[0]['id']}").status_code == 204  # room for one again
    assert schedule(c, flow_id, "0 * * * *").status_code == 201

    document = c.get(f"/flows/{flow_id}/export").json()
    assert c.delete(f"/flows/{flow_id}").status_code == 204  # the free plan's one flow
    document["flow"]["triggers"].append(document["flow"]["triggers"][0])
    over = capped(c.post("/flows/import", json=document), 403, "quota-exceeded")
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
        refused = capped(schedule(c, flow_id, cron), 422, "validation-error")
        [error] = refused["errors"]
        assert error["path"] == "/config/cron"
        assert (
            f"fires {gap} s apart" in error["message"]
            and "free plan's shortest cron interval is 300 s" in (error["message"])
        )
    patched = c.patch(f"/triggers/{made.json()['id']}", json={"config": {"cron": "* * * * *"}})
    assert capped(patched, 422, "validation-error")["errors"][0]["path"] == "/config/cron"
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
    capped(r, 429, "rate-limited")
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
