"""``POST /api/v1/events/{eventType}``: an event over HTTP does what a NATS publish on fm.events does."""

from __future__ import annotations

import json
import uuid

import httpx
import jwt
import pytest

from flowmesh.contracts.ids import is_uuid
from flowmesh.contracts.subjects import external_event
from integrators import (
    add_event_trigger,
    events_handled,
    greeting_flow,
    last_event,
    runs_of,
    stored_events,
    tenant_of,
    unique_event_type,
    waiting_flow,
)
from stack import ProcessStack, publish_flow, token, wait_run

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def test_an_http_event_starts_the_flows_with_an_event_trigger_for_its_type(
    stack: ProcessStack, alice: httpx.Client, mallory: httpx.Client
) -> None:
    flow_id = publish_flow(alice, greeting_flow())
    event_type = unique_event_type("signup")
    trigger_id = add_event_trigger(alice, stack.env["DATABASE_URL"], flow_id, event_type)
    tenant = tenant_of(alice, flow_id)

    # another tenant's event of the same type is the other tenant's
    assert mallory.post(f"/events/{event_type}", json={"name": "mallory"}).status_code == 202
    r = alice.post(f"/events/{event_type}", json={"name": "ada"}, headers={"traceparent": TRACEPARENT})
    assert r.status_code == 202, r.text
    event_id = r.json()["eventId"]
    assert is_uuid(event_id) and set(r.json()) == {"eventId"}

    runs = runs_of(alice, flow_id, at_least=1)
    assert len(runs) == 1
    assert runs[0]["triggerType"] == "event" and runs[0]["triggerId"] == trigger_id
    assert runs[0]["input"] == {"name": "ada"} and runs[0]["output"] == {"hello": "ada"}

    # the message is the one an integrator would have published, with every header a message carries
    stored = last_event(stack.env["NATS_URL"], external_event(tenant, event_type))
    assert stored is not None
    headers, data = stored
    assert json.loads(data) == {"name": "ada"}
    assert headers["Flowmesh-Tenant"] == tenant and headers["Flowmesh-Schema"] == "1"
    assert headers["Nats-Msg-Id"] == event_id
    assert headers["traceparent"] == TRACEPARENT


def test_an_http_event_resumes_the_waitevent_step_it_matches(alice: httpx.Client) -> None:
    event_type = unique_event_type("paid")
    flow_id = publish_flow(alice, waiting_flow(event_type))
    r = alice.post(f"/flows/{flow_id}/runs", json={"input": {"orderId": "A-1"}})
    assert r.status_code == 201, r.text
    run_id = r.json()["id"]
    wait_run(alice, run_id, until=("waiting",))

    assert alice.post(f"/events/{event_type}", json={"orderId": "B-2", "total": 1}).status_code == 202
    assert alice.post(f"/events/{event_type}", json={"orderId": "A-1", "total": 42}).status_code == 202
    run = wait_run(alice, run_id)
    assert run["status"] == "succeeded" and run["output"] == {"total": 42}


def test_the_same_idempotency_key_gets_the_same_event_and_starts_one_run(
    stack: ProcessStack, alice: httpx.Client
) -> None:
    flow_id = publish_flow(alice, greeting_flow())
    event_type = unique_event_type("signup")
    add_event_trigger(alice, stack.env["DATABASE_URL"], flow_id, event_type)
    tenant = tenant_of(alice, flow_id)
    key = {"Idempotency-Key": f"signup-{uuid.uuid4()}"}

    first = alice.post(f"/events/{event_type}", json={"name": "ada"}, headers=key)
    again = alice.post(f"/events/{event_type}", json={"name": "ada"}, headers=key)
    assert first.status_code == again.status_code == 202, (first.text, again.text)
    assert again.json()["eventId"] == first.json()["eventId"]
    assert again.headers.get("Idempotent-Replayed") == "true"
    # the key with another body is another request: refused, not published
    other = alice.post(f"/events/{event_type}", json={"name": "eve"}, headers=key)
    assert other.status_code == 422 and other.headers["content-type"].startswith("application/problem+json")

    events_handled(stack.env["NATS_URL"])
    assert stored_events(stack.env["NATS_URL"], tenant) == {external_event(tenant, event_type): 1}
    runs = runs_of(alice, flow_id, at_least=1)
    assert [r["output"] for r in runs] == [{"hello": "ada"}]

    # without a key, each request is an event of its own
    ids = {alice.post(f"/events/{event_type}", json={"name": "ada"}).json()["eventId"] for _ in range(2)}
    assert len(ids) == 2
    assert len(runs_of(alice, flow_id, at_least=3)) == 3


@pytest.mark.parametrize(
    "event_type",
    ["a.*", "a.%3E", "%3E", "a..b", ".a", "a.", "a%20b", "x" * 65, ".".join(["abcdefgh"] * 29), "%C3%A9t%C3%A9"],
    ids=[
        "star",
        "gt-token",
        "gt",
        "empty-token",
        "leading-dot",
        "trailing-dot",
        "space",
        "long-token",
        "over-255",
        "non-ascii",
    ],
)
def test_an_event_type_that_is_not_a_safe_subject_part_is_a_422(
    stack: ProcessStack, alice: httpx.Client, event_type: str
) -> None:
    r = alice.post(f"/events/{event_type}", json={"name": "ada"})
    assert r.status_code == 422, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    assert r.json()["errors"][0]["path"] == "/eventType"
    assert stored_events(stack.env["NATS_URL"], _tenant(alice)) == {}


def _tenant(c: httpx.Client) -> str:
    claims = jwt.decode(str(c.headers["Authorization"]).removeprefix("Bearer "), options={"verify_signature": False})
    return str(claims["tenant"])


def test_bad_bodies_and_bad_credentials_are_refused_and_publish_nothing(stack: ProcessStack) -> None:
    tenant = f"ev-{uuid.uuid4().hex[:8]}"
    url = stack.base + "/api/v1/events/order.paid"
    member = {"Authorization": "Bearer " + token(tenant)}
    json_type = {"Content-Type": "application/json"}
    refused = [
        (httpx.post(url, content=b'{"orderId": ', headers={**member, **json_type}), 400),  # not JSON
        (httpx.post(url, content=b"orderId=1", headers={**member, "Content-Type": "text/plain"}), 415),
        (httpx.post(url, content=b'{"a": ' * 100 + b"1" + b"}" * 100, headers={**member, **json_type}), 422),
        (httpx.post(url, content=b'{"total": NaN}', headers={**member, **json_type}), 422),
        (httpx.post(url, content=b'{"id": "\\u0000"}', headers={**member, **json_type}), 422),
        (httpx.post(url, content=b"x" * (1024 * 1024 + 1), headers={**member, **json_type}), 413),
        (httpx.post(url, json={}), 401),  # no credentials
        (httpx.post(url, json={}, headers={"Authorization": "Bearer " + token(tenant, role="viewer")}), 401),
        (httpx.post(url, json={}, headers={"Authorization": "Bearer " + token(tenant, exp_in=-120)}), 401),
        (httpx.post(url, json={}, headers={"Authorization": "Bearer " + token(tenant, secret="x" * 64)}), 401),
        (httpx.post(url, json={}, headers={**member, "Idempotency-Key": "k" * 256}), 400),
    ]
    for r, status in refused:
        assert r.status_code == status, (status, r.status_code, r.text[:300])
        assert r.headers["content-type"].startswith("application/problem+json"), r.headers
    assert stored_events(stack.env["NATS_URL"], tenant) == {}

    # the same token, role and body that were refused above are fine once right: it is the input that was wrong
    admin = {"Authorization": "Bearer " + token(tenant, role="admin")}
    assert httpx.post(url, json={"orderId": "A-1"}, headers=member).status_code == 202
    assert httpx.post(url, content=b"", headers=admin).status_code == 202  # an empty body is {}
    assert httpx.post(url, json=[1, "two", None], headers=member).status_code == 202  # any JSON value
    assert stored_events(stack.env["NATS_URL"], tenant) == {external_event(tenant, "order.paid"): 3}
