"""OWASP API4:2023 Unrestricted Resource Consumption.

The risk for Flowmesh: one tenant (or anyone, on the public webhook and probe routes) can send
bodies, pages, headers and request rates that cost the shared gateway, the services, NATS and
PostgreSQL memory and time, starving every other tenant.

What these tests prove, as a client trying to exhaust the platform: a body over the limit is a 413
whether its length is announced or streamed in chunks, and creates nothing; pages stop at 100 items;
JSON nested past 64 levels is a 422, however deep; header fields over 8 KiB are a 431; a tenant over
its plan's rate gets 429 with a whole-second ``Retry-After`` while another tenant at the same moment
is served; a request that outlives the gateway's time limit is a 504 and the gateway goes on serving.
The gateway stays ready after each attack. Deeper tests: ``tests/e2e/test_gateway_rules.py`` (rates
refill, timeouts release idempotency keys, header logs), ``test_sizes.py`` (huge runs stay readable),
``services/runner/tests/test_output_limits.py`` and ``test_rpc_output_limits.py`` (a step's and a
run's recorded output), ``test_webhooks.py`` (webhook bodies) and, here,
``test_api10_unsafe_consumption_of_apis.py`` (upstream bodies and time).
"""

from __future__ import annotations

import json
import signal
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from attacks import problem
from stack import ProcessStack, token

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


# --- Per-plan caps ------------------------------------------------------------------------------
# foreach items, triggers per flow, cron interval, WebSockets per token, the webhook bucket:
# their tests go here once the per-plan caps are merged.
