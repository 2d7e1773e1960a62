"""OWASP API6:2023 Unrestricted Access to Sensitive Business Flows.

The risk for Flowmesh: the flows that cost money or capacity are making flows and starting runs
(a plan sells a number of each), and a webhook sender's retries. Automated clients abuse them by
racing: many creates at once to slip past a plan's limit, a retried start or redelivered webhook
that runs a paid workflow twice, or another tenant's idempotency key to read someone's answer.

What these tests prove, with concurrent requests as a script would send them: a free tenant's
concurrent creates, duplicates and imports make exactly the one flow its plan allows (the rest are
403 ``quota-exceeded``); concurrent starts with one ``Idempotency-Key`` make one run, and the same
key in another tenant is that tenant's own; concurrent redeliveries of one ``webhook-id`` make one
run. Deeper tests: ``tests/e2e/test_quotas.py`` (monthly runs, runs in flight, plan upgrades),
``test_gateway_rules.py`` (idempotency across replicas, in-flight claims), ``test_webhooks.py``.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from stack import ProcessStack, chain, publish_flow, wait_run

RACERS = 12


def race(make: Callable[[int], httpx.Response], n: int = RACERS) -> list[httpx.Response]:
    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(make, range(n)))


def patient(send: Callable[[], httpx.Response]) -> httpx.Response:
    """``send()`` again while it is 429, as ``Retry-After`` says (bounded)."""
    deadline = time.monotonic() + 10
    while (r := send()).status_code == 429:
        assert time.monotonic() < deadline
        time.sleep(int(r.headers["Retry-After"]))
    return r


def flows_of(c: httpx.Client) -> int:
    """How many flows the tenant has."""
    total: int = patient(lambda: c.get("/flows")).json()["total"]
    return total


@pytest.fixture
def free(stack: ProcessStack) -> Iterator[httpx.Client]:
    """A tenant on the free plan (1 flow), given by the platform operator."""
    tenant = f"free-{uuid.uuid4().hex[:10]}"
    with stack.client(f"ops-{uuid.uuid4().hex[:6]}", role="admin") as admin:
        assert admin.put(f"/admin/tenants/{tenant}/plan", json={"plan": "free"}).status_code == 200
    with stack.client(tenant) as c:
        yield c


def test_racing_creates_make_no_more_flows_than_the_plan_allows(free: httpx.Client) -> None:
    answers = race(lambda i: free.post("/flows", json={"name": f"racer {i}"}))
    statuses = sorted(r.status_code for r in answers)
    assert statuses == [201] + [403] * (RACERS - 1), [r.text for r in answers]
    assert {r.json()["type"] for r in answers if r.status_code == 403} == {"quota-exceeded"}
    assert flows_of(free) == 1
    flow_id = next(r for r in answers if r.status_code == 201).json()["id"]
    export = patient(lambda: free.get(f"/flows/{flow_id}/export")).json()
    more = race(
        lambda i: free.post(f"/flows/{flow_id}/duplicate") if i % 2 else free.post("/flows/import", json=export)
    )
    # 403 quota-exceeded, or 429: the free plan's 20 requests/s hold a script back first
    assert {r.status_code for r in more} <= {403, 429} and 403 in {r.status_code for r in more}, [r.text for r in more]
    assert flows_of(free) == 1


def test_racing_starts_with_one_idempotency_key_make_one_run(
    stack: ProcessStack, victim: httpx.Client, attacker: httpx.Client
) -> None:
    flow_id = publish_flow(victim, chain(1))
    key = {"Idempotency-Key": f"pay-invoice-{uuid.uuid4().hex}"}
    answers = race(lambda _: victim.post(f"/flows/{flow_id}/runs", json={"input": {"v": 1}}, headers=key))
    assert {r.status_code for r in answers} <= {200, 201, 409}, [r.text for r in answers]
    run_ids = {r.json()["id"] for r in answers if r.status_code in (200, 201)}
    assert len(run_ids) == 1
    runs = victim.get("/runs", params={"flowId": flow_id}).json()
    assert runs["total"] == 1 and runs["items"][0]["id"] in run_ids
    wait_run(victim, next(iter(run_ids)))
    # the key seen in the victim's traffic is nothing in another tenant: the victim's stored answer
    # is not replayed to it, on the victim's flow (404) or on its own (a run of its own)
    stolen = attacker.post(f"/flows/{flow_id}/runs", json={"input": {"v": 1}}, headers=key)
    assert stolen.status_code == 404 and "Idempotent-Replayed" not in stolen.headers
    with stack.client(f"other-{uuid.uuid4().hex[:8]}") as other:
        own_flow = publish_flow(other, chain(1))
        theirs = other.post(f"/flows/{own_flow}/runs", json={"input": {"v": 1}}, headers=key)
    assert theirs.status_code == 201 and theirs.json()["id"] not in run_ids
    assert "Idempotent-Replayed" not in theirs.headers


def test_racing_redeliveries_of_one_webhook_make_one_run(victim: httpx.Client) -> None:
    flow_id = publish_flow(victim, chain(1))
    r = victim.post(f"/flows/{flow_id}/triggers", json={"type": "webhook", "name": "in"})
    assert r.status_code == 201, r.text
    url = r.json()["url"]
    delivery: dict[str, Any] = {"json": {"order": 42}, "headers": {"webhook-id": f"msg_{uuid.uuid4().hex}"}}
    with httpx.Client(timeout=15) as public:
        answers = race(lambda _: public.post(url, **delivery))
    assert {r.status_code for r in answers} <= {202, 409}, [r.text for r in answers]
    run_ids = {r.json()["runId"] for r in answers if r.status_code == 202}
    assert len(run_ids) == 1
    wait_run(victim, next(iter(run_ids)))
    assert victim.get("/runs", params={"flowId": flow_id}).json()["total"] == 1
