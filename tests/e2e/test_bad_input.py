"""Bad input over HTTP, end to end (P9): each case is a 4xx problem naming what is wrong, never a 500,
and changes nothing.

Time zones the system cannot open (over-long names, directories of the zone database), NUL
characters that PostgreSQL text cannot hold, JSON numbers that are not finite or do not fit in 64
bits, loose booleans, and crons that never fire.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from stack import ProcessStack, publish_flow

PROBLEM = "application/problem+json"
JSON = {"content-type": "application/json"}
T = {"id": "start", "type": "trigger", "data": {}}
ECHO = {"nodes": [T], "edges": []}


def problem(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith(PROBLEM)
    return r.json()  # type: ignore[no-any-return]


def paths(body: dict[str, Any]) -> set[str]:
    return {e["path"] for e in body.get("errors", [])}


@pytest.fixture
def admin(stack: ProcessStack) -> Iterator[httpx.Client]:
    with stack.client(f"ops-{uuid.uuid4().hex[:6]}", role="admin") as client:
        yield client


@pytest.fixture
def public(stack: ProcessStack) -> Iterator[httpx.Client]:
    with httpx.Client(timeout=10) as client:
        yield client


def triggers(c: httpx.Client, flow_id: str) -> list[dict[str, Any]]:
    r = c.get(f"/flows/{flow_id}/triggers")
    assert r.status_code == 200, r.text
    return r.json()["items"]  # type: ignore[no-any-return]


def test_time_zones_that_cannot_be_opened_are_refused_naming_the_field(alice: httpx.Client) -> None:
    flow_id = publish_flow(alice, ECHO)
    for zone in ("A" * 300, "Europe", "America", "Europe/" + "x" * 260, ".", "..", "Europe/../UTC", "/etc/passwd"):
        body = problem(
            alice.post(
                f"/flows/{flow_id}/triggers",
                json={"type": "schedule", "name": "t", "config": {"cron": "0 * * * *", "timezone": zone}},
            ),
            422,
        )
        assert paths(body) == {"/config/timezone"}, (zone, body)
    made = alice.post(
        f"/flows/{flow_id}/triggers",
        json={"type": "schedule", "name": "t", "config": {"cron": "0 * * * *", "timezone": "Europe/Paris"}},
    )
    assert made.status_code == 201, made.text
    body = problem(
        alice.patch(f"/triggers/{made.json()['id']}", json={"config": {"cron": "0 * * * *", "timezone": "Europe"}}), 422
    )
    assert paths(body) == {"/config/timezone"}
    assert [t["config"]["timezone"] for t in triggers(alice, flow_id)] == ["Europe/Paris"]


def test_a_cron_that_never_fires_is_refused(alice: httpx.Client) -> None:
    flow_id = publish_flow(alice, ECHO)
    for cron in ("0 0 31 2 *", "0 0 30 2 *", "0 0 0 31 4 *", "0 0 31 11 *"):
        body = problem(
            alice.post(f"/flows/{flow_id}/triggers", json={"type": "schedule", "name": "t", "config": {"cron": cron}}),
            422,
        )
        assert paths(body) == {"/config/cron"}, (cron, body)
        assert "never" in body["errors"][0]["message"]
    leap = alice.post(
        f"/flows/{flow_id}/triggers", json={"type": "schedule", "name": "t", "config": {"cron": "0 0 29 2 *"}}
    )
    assert leap.status_code == 201, leap.text  # once every four years still fires
    assert len(triggers(alice, flow_id)) == 1


def test_a_nul_in_a_plan_change_is_refused(admin: httpx.Client) -> None:
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    problem(admin.put(f"/admin/tenants/{tenant}%00x/plan", json={"plan": "pro"}), 422)
    problem(admin.put(f"/admin/tenants/{tenant}/plan", json={"plan": "pro\u0000"}), 422)
    problem(admin.put(f"/admin/tenants/{tenant}/plan", content=b'{"plan": "pro\\u0000"}', headers=JSON), 422)
    problem(admin.put(f"/admin/tenants/{tenant}/plan", json={"plan": "no-such-plan"}), 422)


def test_a_nul_in_a_path_or_query_is_refused_before_it_reaches_a_service(alice: httpx.Client) -> None:
    flow_id = publish_flow(alice, ECHO)
    problem(alice.get(f"/flows/{flow_id}%00"), 422)
    problem(alice.get("/runs", params={"flowId": f"{flow_id}\u0000"}), 422)
    problem(alice.get("/runs", params={"status": "x\u0000"}), 422)
    problem(alice.delete("/api-keys/openai%00"), 422)
    problem(alice.get("/flows", params={"q": "a\u0000b"}), 422)
    problem(alice.get("/flows", params={"status": "draft\u0000"}), 422)
    problem(alice.get(f"/runs/{flow_id}%00/events"), 422)
    assert alice.get(f"/flows/{flow_id}", params={"ignored": "\u0000"}).status_code == 200  # not read: not refused


@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity", "1e309", "-1e309", "18446744073709551616"])
def test_numbers_that_are_not_finite_or_not_64_bit_are_refused(
    alice: httpx.Client, public: httpx.Client, number: str
) -> None:
    flow_id = publish_flow(alice, ECHO)
    raw = b'{"input": {"a": [1, ' + number.encode() + b"]}}"
    body = problem(alice.post(f"/flows/{flow_id}/runs", content=raw, headers=JSON), 422)
    assert paths(body) == {"/input/a/1"}, body
    assert alice.get("/runs", params={"flowId": flow_id}).json()["items"] == []
    # any JSON body: a flow definition, and a webhook's
    doc = b'{"name": "n", "definition": {"nodes": [], "edges": []}, "settings": {"x": ' + number.encode() + b"}}"
    problem(alice.post("/flows", content=doc, headers=JSON), 422)
    hook = alice.post(f"/flows/{flow_id}/triggers", json={"type": "webhook", "name": "h"})
    assert hook.status_code == 201, hook.text
    problem(public.post(hook.json()["url"], content=b'{"n": ' + number.encode() + b"}", headers=JSON), 422)


def test_the_largest_64_bit_integers_stay_exact(alice: httpx.Client) -> None:
    flow_id = publish_flow(alice, ECHO)
    values = [2**63 - 1, -(2**63), 2**53 + 1, 1.5e308]
    r = alice.post(f"/flows/{flow_id}/runs", json={"input": {"a": values}})
    assert r.status_code in (200, 201, 202), r.text
    run = alice.get(f"/runs/{r.json()['id']}").json()
    assert run["input"] == {"a": values}


def test_booleans_are_strict(alice: httpx.Client) -> None:
    flow_id = publish_flow(alice, ECHO)
    for loose in ("yes", "true", 1, 0, "on"):
        body = problem(
            alice.post(
                f"/flows/{flow_id}/triggers", json={"type": "webhook", "name": "h", "config": {"signed": loose}}
            ),
            422,
        )
        assert paths(body) == {"/config/signed"}, (loose, body)
    assert triggers(alice, flow_id) == []
    # a step's data too: "5" is no number of milliseconds
    wait = {"nodes": [T, {"id": "x", "type": "delay", "data": {"durationMs": "5"}}], "edges": []}
    r = alice.post("/flows", json={"name": "n", "definition": wait})
    assert r.status_code == 201, r.text
    report = alice.post(f"/flows/{r.json()['id']}/validate")
    assert report.status_code == 200, report.text
    assert report.json()["valid"] is False, report.json()
