"""Public webhooks through the gateway, end to end: ``POST /api/v1/hooks/{token}`` starts runs.

Signatures here are computed in the test, straight from the Standard Webhooks scheme (not with
the gateway's own code), so a wrong reading of the scheme in the gateway cannot pass unnoticed.
"""

from __future__ import annotations

import base64
import time
import uuid
from typing import Any

import httpx
import pytest

from stack import signed_headers, std_sign, wait_run

PROBLEM = "application/problem+json"
JSON = {"content-type": "application/json"}
ECHO = {
    "nodes": [
        {"id": "start", "type": "trigger", "data": {}},
        {"id": "echo", "type": "transform", "data": {"output": {"body": "{{ input.body }}"}}},
    ],
    "edges": [{"id": "e", "source": "start", "target": "echo"}],
}


def problem(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith(PROBLEM)
    body: dict[str, Any] = r.json()
    assert body["status"] == status and body["detail"]
    return body


def hook_flow(c: httpx.Client, *, signed: bool = False, publish: bool = True) -> tuple[str, dict[str, Any]]:
    """A flow (published unless told) with one webhook trigger: its id and the created trigger."""
    r = c.post("/flows", json={"name": f"hook-{uuid.uuid4().hex[:6]}", "definition": ECHO})
    assert r.status_code == 201, r.text
    flow_id: str = r.json()["id"]
    if publish:
        assert c.post(f"/flows/{flow_id}/publish").status_code == 201
    r = c.post(f"/flows/{flow_id}/triggers", json={"type": "webhook", "name": "in", "config": {"signed": signed}})
    assert r.status_code == 201, r.text
    trigger: dict[str, Any] = r.json()
    assert ("secret" in trigger) is signed
    return flow_id, trigger


def runs_of(c: httpx.Client, flow_id: str) -> list[dict[str, Any]]:
    r = c.get("/runs", params={"flowId": flow_id})
    assert r.status_code == 200, r.text
    items: list[dict[str, Any]] = r.json()["items"]
    return items


def accepted(r: httpx.Response) -> str:
    assert r.status_code == 202, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json")
    assert set(r.json()) == {"runId"}
    run_id: str = r.json()["runId"]
    return run_id


@pytest.fixture
def public() -> Any:
    """A client without credentials, as a webhook sender is."""
    with httpx.Client(timeout=15) as c:
        yield c


def test_an_unsigned_webhook_starts_a_run_with_body_headers_and_query(
    alice: httpx.Client, public: httpx.Client
) -> None:
    flow_id, trigger = hook_flow(alice)
    r = public.post(
        trigger["url"],
        params=[("a", "1"), ("a", "2"), ("b", "x y")],
        json={"order": 42, "items": ["pen"]},
        headers={
            "X-Event": "order.paid",
            "User-Agent": "shop/1.0",
            "Authorization": "Bearer not-for-the-flow",
            "Cookie": "session=abc",
            "X-Api-Key": "k",
        },
    )
    run = wait_run(alice, accepted(r))
    assert run["status"] == "succeeded" and run["flowId"] == flow_id
    assert run["triggerType"] == "webhook" and run["triggerId"] == trigger["id"]
    assert run["output"] == {"body": {"order": 42, "items": ["pen"]}}
    inp = run["input"]
    assert inp["body"] == {"order": 42, "items": ["pen"]}
    assert inp["query"] == {"a": ["1", "2"], "b": "x y"}
    assert inp["headers"]["x-event"] == "order.paid" and inp["headers"]["user-agent"] == "shop/1.0"
    assert inp["headers"]["content-type"] == "application/json"
    for hidden in ("authorization", "cookie", "x-api-key", "host", "content-length"):
        assert hidden not in inp["headers"]


def test_form_text_and_empty_bodies_become_the_run_input(alice: httpx.Client, public: httpx.Client) -> None:
    _, trigger = hook_flow(alice)
    url = trigger["url"]
    cases: list[tuple[dict[str, Any], Any]] = [
        ({"data": {"name": "Ada Lovelace", "tag": ["a", "b"]}}, {"name": "Ada Lovelace", "tag": ["a", "b"]}),
        ({"content": b"plain words", "headers": {"content-type": "text/plain"}}, "plain words"),
        ({"content": b"<a>1</a>", "headers": {"content-type": "application/xml"}}, "<a>1</a>"),
        ({"content": b'{"x": 1}', "headers": {"content-type": "application/vnd.api+json"}}, {"x": 1}),
        ({"content": b'{"as": "text"}'}, '{"as": "text"}'),  # no content type: not guessed
        ({}, None),
    ]
    for kwargs, body in cases:
        run = wait_run(alice, accepted(public.post(url, **kwargs)))
        assert run["status"] == "succeeded" and run["input"]["body"] == body, kwargs


def test_bodies_that_cannot_be_read_are_4xx_problems(alice: httpx.Client, public: httpx.Client) -> None:
    flow_id, trigger = hook_flow(alice)
    url = trigger["url"]
    r = public.post(url, content=b"{oops", headers=JSON)
    assert "not valid JSON" in problem(r, 400)["detail"]
    problem(public.post(url, content=b"\x89PNG\r\n\x1a\n\xff\xfe", headers={"content-type": "image/png"}), 415)
    problem(public.post(url, content=b'{"a": "\\u0000"}', headers=JSON), 422)
    problem(public.post(url, content=b"[" * 100 + b"]" * 100, headers=JSON), 422)
    problem(public.post(url, params={"q": "\x00"}), 422)
    problem(public.post(url, content=b"a=%ff", headers={"content-type": "application/x-www-form-urlencoded"}), 400)
    problem(public.post(url, headers={"webhook-id": "x" * 201}), 400)
    assert runs_of(alice, flow_id) == []


def test_a_body_over_one_mebibyte_is_413(alice: httpx.Client, public: httpx.Client) -> None:
    flow_id, trigger = hook_flow(alice)
    big = b'{"pad": "' + b"x" * (1024 * 1024) + b'"}'
    assert "limit" in problem(public.post(trigger["url"], content=big, headers=JSON), 413)["detail"]
    _, signed = hook_flow(alice, signed=True)
    problem(public.post(signed["url"], content=big, headers=signed_headers(signed["secret"], big)), 413)
    # under the HTTP limit, but the run would not fit in one NATS message (1 MiB by default)
    near = b'"' + b"x" * (1024 * 1024 - 100) + b'"'
    assert "once encoded" in problem(public.post(trigger["url"], content=near, headers=JSON), 413)["detail"]
    # (the echo flow doubles it: input and output together must fit in the reply of GET /runs/{id})
    large = b'"' + b"x" * (300 * 1024) + b'"'
    run = wait_run(alice, accepted(public.post(trigger["url"], content=large, headers=JSON)))
    assert run["status"] == "succeeded" and len(run["input"]["body"]) == 300 * 1024
    problem(public.post(trigger["url"], content=b'["\\ud800"]', headers=JSON), 422)
    assert len(runs_of(alice, flow_id)) == 1


def test_a_signed_webhook_accepts_a_valid_signature(alice: httpx.Client, public: httpx.Client) -> None:
    _, trigger = hook_flow(alice, signed=True)
    body = b'{"event": "invoice.paid", "amount": 1200}'
    hdrs = signed_headers(trigger["secret"], body)
    run = wait_run(alice, accepted(public.post(trigger["url"], content=body, headers=hdrs)))
    assert run["status"] == "succeeded" and run["input"]["body"] == {"event": "invoice.paid", "amount": 1200}
    # the signature and the per-attempt timestamp are not handed to the flow; the delivery id is
    assert run["input"]["headers"]["webhook-id"] == hdrs["webhook-id"]
    assert "webhook-signature" not in run["input"]["headers"] and "webhook-timestamp" not in run["input"]["headers"]
    assert run["idempotencyKey"] == f"hook:{trigger['id']}:{hdrs['webhook-id']}"


def test_a_redelivery_returns_the_same_run_and_starts_none(alice: httpx.Client, public: httpx.Client) -> None:
    flow_id, trigger = hook_flow(alice, signed=True)
    body = b'{"n": 1}'
    msg_id = f"msg_{uuid.uuid4().hex}"
    hdrs = signed_headers(trigger["secret"], body, msg_id=msg_id)
    first = accepted(public.post(trigger["url"], content=body, headers=hdrs))
    wait_run(alice, first)
    # a retry is signed afresh: a later timestamp, hence another signature, same id and body
    again = signed_headers(trigger["secret"], body, msg_id=msg_id, ts=int(time.time()) + 5)
    assert accepted(public.post(trigger["url"], content=body, headers=again)) == first
    assert [r["id"] for r in runs_of(alice, flow_id)] == [first]
    other = accepted(public.post(trigger["url"], content=body, headers=signed_headers(trigger["secret"], body)))
    assert other != first and len(runs_of(alice, flow_id)) == 2


def test_an_unsigned_webhook_deduplicates_by_webhook_id_too(alice: httpx.Client, public: httpx.Client) -> None:
    flow_id, trigger = hook_flow(alice)
    hdrs = {"webhook-id": f"evt-{uuid.uuid4().hex}"}
    first = accepted(public.post(trigger["url"], json={"a": 1}, headers=hdrs))
    assert accepted(public.post(trigger["url"], json={"a": 1}, headers=hdrs)) == first
    # the same id for another payload is the sender's mistake: refused, and no second run
    assert "another input" in problem(public.post(trigger["url"], json={"a": 2}, headers=hdrs), 422)["detail"]
    without_id = [accepted(public.post(trigger["url"], json={"a": 1})) for _ in range(2)]
    assert len(set(without_id)) == 2
    assert len(runs_of(alice, flow_id)) == 3


def test_bad_signatures_and_missing_headers_are_401(alice: httpx.Client, public: httpx.Client) -> None:
    flow_id, trigger = hook_flow(alice, signed=True)
    url, secret = trigger["url"], trigger["secret"]
    body = b'{"a": 1}'
    good = signed_headers(secret, body)
    other_secret = "whsec_" + base64.b64encode(b"z" * 32).decode()
    bad: list[tuple[bytes, dict[str, Any]]] = [
        (body, signed_headers(other_secret, body)),  # another secret
        (b'{"a": 2}', good),  # the body was changed on the way
        (body, {**good, "webhook-id": "msg_other"}),  # the id was changed
        (body, {**good, "webhook-signature": "v1,AAAA"}),
        (body, {**good, "webhook-signature": "v1,not base64!"}),
        (body, {**good, "webhook-signature": good["webhook-signature"].replace("v1,", "v2,")}),
        (body, {**good, "webhook-signature": "v1,\u00e9t\u00e9".encode()}),
        (body, {k: v for k, v in good.items() if k != "webhook-signature"}),
        (body, {k: v for k, v in good.items() if k != "webhook-timestamp"}),
        (body, {k: v for k, v in good.items() if k != "webhook-id"}),
        (body, {**good, "webhook-timestamp": "yesterday"}),
        (body, {"content-type": "application/json"}),
    ]
    for content, hdrs in bad:
        detail = problem(public.post(url, content=content, headers=hdrs), 401)["detail"]
        assert "webhook" in detail, detail
    assert "missing: webhook-signature" in problem(public.post(url, content=body, headers=bad[7][1]), 401)["detail"]
    assert runs_of(alice, flow_id) == []


@pytest.mark.parametrize(("offset", "when"), [(-301, "in the past"), (-3600, "in the past"), (301, "in the future")])
def test_a_stale_or_future_timestamp_is_401(alice: httpx.Client, public: httpx.Client, offset: int, when: str) -> None:
    flow_id, trigger = hook_flow(alice, signed=True)
    body = b"{}"
    hdrs = signed_headers(trigger["secret"], body, ts=int(time.time()) + offset)
    assert when in problem(public.post(trigger["url"], content=body, headers=hdrs), 401)["detail"]
    assert runs_of(alice, flow_id) == []


def test_several_signatures_during_rotation_one_valid_is_enough(alice: httpx.Client, public: httpx.Client) -> None:
    flow_id, trigger = hook_flow(alice, signed=True)
    body = b'{"rotating": true}'
    msg_id, ts = f"msg_{uuid.uuid4().hex}", int(time.time())
    valid = std_sign(trigger["secret"], msg_id, ts, body)
    retired = std_sign("whsec_" + base64.b64encode(b"old-secret-bytes-24-long").decode(), msg_id, ts, body)
    hdrs = {"webhook-id": msg_id, "webhook-timestamp": str(ts), "content-type": "application/json"}
    for header in (f"{retired} {valid}", f"{valid} {retired}", f"v1a,abc {valid}"):
        assert accepted(public.post(trigger["url"], content=body, headers={**hdrs, "webhook-signature": header}))
    assert len(runs_of(alice, flow_id)) == 1  # one delivery id: one run
    hdrs["webhook-signature"] = f"{retired} {retired}"
    problem(public.post(trigger["url"], content=body, headers=hdrs), 401)


def test_an_unknown_or_deleted_token_is_404(alice: httpx.Client, public: httpx.Client, stack: Any) -> None:
    for token in ("A" * 32, "nope", "x" * 200, "a.b.c.d.e.f.g.h.i.j.k"):
        body = problem(public.post(f"{stack.base}/api/v1/hooks/{token}", json={}), 404)
        assert "no webhook has this URL" in body["detail"]
    _, trigger = hook_flow(alice)
    accepted(public.post(trigger["url"], json={}))  # now in the gateway's lookup cache
    assert alice.delete(f"/triggers/{trigger['id']}").status_code == 204
    problem(public.post(trigger["url"], json={}), 404)


def test_only_post_is_allowed(alice: httpx.Client, public: httpx.Client) -> None:
    _, trigger = hook_flow(alice)
    for method in ("GET", "PUT", "DELETE"):
        problem(public.request(method, trigger["url"]), 405)


def test_a_disabled_trigger_is_409_until_enabled_again(alice: httpx.Client, public: httpx.Client) -> None:
    flow_id, trigger = hook_flow(alice, signed=True)
    body = b"{}"
    accepted(public.post(trigger["url"], content=body, headers=signed_headers(trigger["secret"], body)))
    assert alice.patch(f"/triggers/{trigger['id']}", json={"enabled": False}).json()["enabled"] is False
    detail = problem(public.post(trigger["url"], content=body, headers=signed_headers(trigger["secret"], body)), 409)
    assert "disabled" in detail["detail"]
    # a disabled trigger still checks signatures first: its state is told only to its sender
    problem(public.post(trigger["url"], content=body, headers={"webhook-id": "x"}), 401)
    assert alice.patch(f"/triggers/{trigger['id']}", json={"enabled": True}).status_code == 200
    accepted(public.post(trigger["url"], content=body, headers=signed_headers(trigger["secret"], body)))
    assert len(runs_of(alice, flow_id)) == 2


def test_a_deactivated_or_unpublished_flow_is_409(alice: httpx.Client, public: httpx.Client) -> None:
    flow_id, trigger = hook_flow(alice)
    accepted(public.post(trigger["url"], json={}))
    assert alice.post(f"/flows/{flow_id}/deactivate").json()["active"] is False
    assert "deactivated" in problem(public.post(trigger["url"], json={}), 409)["detail"]
    assert alice.post(f"/flows/{flow_id}/activate").json()["active"] is True
    accepted(public.post(trigger["url"], json={}))
    assert len(runs_of(alice, flow_id)) == 2

    draft_id, draft_trigger = hook_flow(alice, publish=False)
    assert "no published version" in problem(public.post(draft_trigger["url"], json={}), 409)["detail"]
    assert alice.post(f"/flows/{draft_id}/publish").status_code == 201
    accepted(public.post(draft_trigger["url"], json={}))


def test_a_webhook_run_belongs_to_the_trigger_owner_only(
    alice: httpx.Client, mallory: httpx.Client, public: httpx.Client
) -> None:
    flow_id, trigger = hook_flow(alice)
    run_id = accepted(public.post(trigger["url"], json={"secret": "of alice"}))
    assert wait_run(alice, run_id)["status"] == "succeeded"
    problem(mallory.get(f"/runs/{run_id}"), 404)
    assert mallory.get("/runs", params={"flowId": flow_id}).json()["items"] == []
