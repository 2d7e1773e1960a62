"""Runs through the gateway, end to end: every step type the runner has, control, events, isolation."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import httpx

from stack import chain, publish_flow, wait_run
from upstream import Upstream

T = {"id": "start", "type": "trigger", "data": {}}


def edge(source: str, target: str, handle: str | None = None) -> dict[str, Any]:
    e: dict[str, Any] = {"id": f"{source}-{target}-{handle}", "source": source, "target": target}
    if handle:
        e["sourceHandle"] = handle
    return e


def start(c: httpx.Client, flow_id: str, inp: Any = None, **headers: str) -> httpx.Response:
    return c.post(f"/flows/{flow_id}/runs", json={"input": inp if inp is not None else {}}, headers=headers)


def run_of(c: httpx.Client, flow_id: str, inp: Any = None) -> dict[str, Any]:
    r = start(c, flow_id, inp)
    assert r.status_code == 201, r.text
    assert r.json()["status"] == "queued"
    return wait_run(c, r.json()["id"])


def steps_of(c: httpx.Client, run_id: str) -> dict[str, dict[str, Any]]:
    return {s["stepId"]: s for s in c.get(f"/runs/{run_id}/steps").json()["items"]}


def test_a_chain_computes_and_its_events_are_gap_free(alice: httpx.Client) -> None:
    flow_id = publish_flow(alice, chain(5))
    run = run_of(alice, flow_id, {"v": 10})
    assert run["status"] == "succeeded" and run["output"] == {"v": 15}
    assert run["durationMs"] is not None and run["version"] == 1 and run["triggerType"] == "manual"
    events = alice.get(f"/runs/{run['id']}/events").json()
    seqs = [e["seq"] for e in events["items"]]
    assert seqs == list(range(1, len(seqs) + 1)) and events["total"] == len(seqs)
    assert events["items"][0]["type"] == "run.queued" and events["items"][-1]["type"] == "run.succeeded"
    later = alice.get(f"/runs/{run['id']}/events", params={"after": 3, "pageSize": 2}).json()
    assert [e["seq"] for e in later["items"]] == [4, 5] and later["hasMore"] is True
    steps = steps_of(alice, run["id"])
    assert steps["start"]["output"] == {"v": 10} and steps["s4"]["output"] == {"v": 15}


def test_branches_join_and_skips_propagate(alice: httpx.Client) -> None:
    d = {
        "nodes": [
            T,
            {"id": "big", "type": "condition", "data": {"expression": "input.v > 10"}},
            {"id": "yes", "type": "transform", "data": {"output": "big"}},
            {"id": "yes2", "type": "transform", "data": {"output": "{{ steps.yes.output }}"}},
            {"id": "no", "type": "transform", "data": {"output": "small"}},
            {"id": "p", "type": "transform", "data": {"output": 1}},
            {
                "id": "join",
                "type": "transform",
                "data": {"output": {"branch": "{{ steps.no.status }}", "p": "{{ steps.p.output }}"}},
            },
        ],
        "edges": [
            edge("start", "big"),
            edge("big", "yes", "true"),
            edge("yes", "yes2"),
            edge("big", "no", "false"),
            edge("start", "p"),
            edge("yes2", "join"),
            edge("no", "join"),
            edge("p", "join"),
        ],
    }
    flow_id = publish_flow(alice, d)
    run = run_of(alice, flow_id, {"v": 3})
    assert run["output"] == {"branch": "succeeded", "p": 1}
    steps = steps_of(alice, run["id"])
    assert steps["yes"]["status"] == "skipped" and steps["yes2"]["status"] == "skipped"


def test_http_step_retries_with_the_same_idempotency_key(alice: httpx.Client, upstream: Upstream) -> None:
    path = f"/flaky-{uuid.uuid4().hex[:6]}"
    upstream.failures[path] = 2
    d = {
        "nodes": [
            T,
            {
                "id": "call",
                "type": "http",
                "data": {
                    "method": "POST",
                    "url": upstream.base + path,
                    "body": {"n": "{{ input.n }}"},
                    "query": {"q": "1"},
                    "retry": {"maxAttempts": 3, "backoff": "fixed", "initialDelayMs": 50},
                },
            },
        ],
        "edges": [edge("start", "call")],
    }
    run = run_of(alice, publish_flow(alice, d), {"n": 5})
    assert run["status"] == "succeeded", run
    assert run["output"]["status"] == 200 and run["output"]["body"]["id"] == 7
    keys = [r["key"] for r in upstream.requests if r["path"].startswith(path)]
    assert keys == [f"{run['id']}:call"] * 3
    assert json.loads(upstream.requests[-1]["body"]) == {"n": 5}
    types = [e["type"] for e in alice.get(f"/runs/{run['id']}/events").json()["items"]]
    assert types.count("step.retrying") == 2
    assert steps_of(alice, run["id"])["call"]["attempt"] == 3


def test_http_step_failures(alice: httpx.Client, upstream: Upstream) -> None:
    nodes = [
        T,
        {
            "id": "c404",
            "type": "http",
            "data": {"url": upstream.base + "/status/404", "retry": {"maxAttempts": 3, "initialDelayMs": 10}},
        },
    ]
    run = run_of(alice, publish_flow(alice, {"nodes": nodes, "edges": [edge("start", "c404")]}))
    assert run["status"] == "failed" and run["error"]["type"] == "http-status" and run["error"]["stepId"] == "c404"
    assert steps_of(alice, run["id"])["c404"]["attempt"] == 1  # a 404 is not retried
    big = [T, {"id": "big", "type": "http", "data": {"url": upstream.base + "/big"}}]
    run = run_of(alice, publish_flow(alice, {"nodes": big, "edges": [edge("start", "big")]}))
    assert run["status"] == "failed" and run["error"]["type"] == "response-too-large"
    accepted = [T, {"id": "ok", "type": "http", "data": {"url": upstream.base + "/status/404", "acceptStatus": [404]}}]
    run = run_of(alice, publish_flow(alice, {"nodes": accepted, "edges": [edge("start", "ok")]}))
    assert run["status"] == "succeeded" and run["output"]["status"] == 404


def test_a_failed_step_with_on_error_continue_takes_its_error_edge(alice: httpx.Client, upstream: Upstream) -> None:
    d = {
        "nodes": [
            T,
            {"id": "call", "type": "http", "data": {"url": upstream.base + "/status/400", "onError": "continue"}},
            {"id": "recover", "type": "transform", "data": {"output": "{{ steps.call.output.error.type }}"}},
            {"id": "normal", "type": "transform", "data": {"output": "normal"}},
        ],
        "edges": [edge("start", "call"), edge("call", "recover", "error"), edge("call", "normal")],
    }
    run = run_of(alice, publish_flow(alice, d))
    assert run["status"] == "succeeded" and run["output"] == "http-status"
    steps = steps_of(alice, run["id"])
    assert steps["call"]["status"] == "failed" and steps["call"]["handled"] is True
    assert steps["normal"]["status"] == "skipped"


def test_switch_fail_and_expression_errors(alice: httpx.Client) -> None:
    d = {
        "nodes": [
            T,
            {"id": "s", "type": "switch", "data": {"expression": "input.kind", "cases": ["a", "b"]}},
            {"id": "A", "type": "transform", "data": {"output": "A"}},
            {"id": "stop", "type": "fail", "data": {"message": "no kind {{ input.kind }}"}},
        ],
        "edges": [edge("start", "s"), edge("s", "A", "a"), edge("s", "stop", "default")],
    }
    flow_id = publish_flow(alice, d)
    assert run_of(alice, flow_id, {"kind": "a"})["output"] == "A"
    failed = run_of(alice, flow_id, {"kind": "zz"})
    assert failed["status"] == "failed" and failed["output"] is None
    assert failed["error"] == {"message": "no kind zz", "stepId": "stop", "type": "fail"}
    broken = run_of(alice, flow_id, {})
    assert broken["status"] == "failed" and broken["error"]["type"] == "expression"
    assert "input.kind" in broken["error"]["message"]


def test_publish_step_puts_the_payload_on_the_out_stream(alice: httpx.Client, infra: Any) -> None:
    import asyncio

    import nats

    d = {
        "nodes": [
            T,
            {"id": "pub", "type": "publish", "data": {"name": "orders.done", "payload": {"v": "{{ input.v }}"}}},
        ],
        "edges": [edge("start", "pub")],
    }
    run = run_of(alice, publish_flow(alice, d), {"v": 42})
    assert run["status"] == "succeeded" and run["output"]["seq"] >= 1

    async def read() -> dict[str, Any]:
        nc = await nats.connect(infra.nats_url)
        try:
            msg = await nc.jetstream().get_msg("OUT", run["output"]["seq"])
            return {"subject": msg.subject, "data": json.loads(msg.data or b"{}")}
        finally:
            await nc.close()

    got = asyncio.run(read())
    assert got["data"] == {"v": 42} and got["subject"].endswith(".orders.done")


def test_starts_check_the_flow_state_and_input(alice: httpx.Client) -> None:
    draft = alice.post("/flows", json={"name": "draft", "definition": chain(1)}).json()["id"]
    assert start(alice, draft).status_code == 409
    schema = {"type": "object", "required": ["v"], "properties": {"v": {"type": "integer"}}}
    flow_id = publish_flow(alice, chain(1), inputSchema=schema)
    r = start(alice, flow_id, {"v": "one"})
    assert r.status_code == 422 and r.json()["errors"][0]["path"] == "/input/v"
    assert start(alice, flow_id, {}).status_code == 422
    assert alice.post(f"/flows/{flow_id}/runs", json={"input": {"v": 1}, "extra": 1}).status_code == 422
    assert alice.post(f"/flows/{flow_id}/runs", json={"input": {"v": 1}, "version": 9}).status_code == 404
    alice.post(f"/flows/{flow_id}/deactivate")
    assert start(alice, flow_id, {"v": 1}).status_code == 409
    alice.post(f"/flows/{flow_id}/activate")
    assert start(alice, flow_id, {"v": 1}).status_code == 201
    assert start(alice, str(uuid.uuid4()), {}).status_code == 404


def test_an_input_too_large_to_send_between_services_is_a_413(alice: httpx.Client) -> None:
    flow_id = publish_flow(alice, chain(1))
    before = alice.get("/runs", params={"flowId": flow_id}).json()["total"]
    # under the HTTP limit (1 MiB), over what one NATS message can carry with the run around it
    r = start(alice, flow_id, {"v": 1, "blob": "x" * 1_000_000})
    assert r.status_code == 413, r.text
    assert r.json()["type"] == "payload-too-large" and "smaller payload" in r.json()["detail"]
    assert alice.get("/runs", params={"flowId": flow_id}).json()["total"] == before
    assert start(alice, flow_id, {"v": 1, "blob": "x" * 500_000}).status_code == 201


def test_idempotent_starts(alice: httpx.Client) -> None:
    flow_id = publish_flow(alice, chain(1))
    key = uuid.uuid4().hex
    first = start(alice, flow_id, {"v": 1}, **{"Idempotency-Key": key})
    again = start(alice, flow_id, {"v": 1}, **{"Idempotency-Key": key})
    assert first.status_code == 201 and again.status_code == 200
    assert again.json()["id"] == first.json()["id"] and again.json()["idempotencyKey"] == key
    other = start(alice, flow_id, {"v": 2}, **{"Idempotency-Key": key})
    assert other.status_code == 422
    assert alice.get("/runs", params={"flowId": flow_id}).json()["total"] == 1


def test_numbers_too_large_for_64_bits_survive_storage(alice: httpx.Client) -> None:
    # PostgreSQL's jsonb gives 1e35 back as 36 digits; read as an integer it could not be encoded again
    d = {
        "nodes": [
            T,
            {"id": "ok", "type": "approval", "data": {}},
            {"id": "big", "type": "transform", "data": {"output": {"twice": "{{ input.big * 2.0 }}", "k": 3e40}}},
        ],
        "edges": [edge("start", "ok"), edge("ok", "big", "approved")],
    }
    schema = {"type": "object", "properties": {"big": {"type": "number", "maximum": 1e36}}}
    flow_id = publish_flow(alice, d, inputSchema=schema)
    assert alice.get(f"/flows/{flow_id}").json()["definition"]["nodes"][2]["data"]["output"]["k"] == 3e40
    exported = alice.get(f"/flows/{flow_id}/export")
    assert exported.status_code == 200 and exported.json()["flow"]["inputSchema"] == schema
    imported = alice.post("/flows/import", json=exported.json())
    assert imported.status_code == 201 and imported.json()["inputSchema"] == schema
    rid = start(alice, flow_id, {"big": 1.9788973885588875e35}).json()["id"]
    wait_run(alice, rid, until=("waiting",))  # the run is read back from the database to resume it
    assert alice.post(f"/runs/{rid}/resume", json={"stepId": "ok", "decision": "approved"}).status_code == 200
    run = wait_run(alice, rid)
    assert run["status"] == "succeeded", run
    assert run["input"] == {"big": 1.9788973885588875e35}
    assert run["output"] == {"twice": 3.957794777117775e35, "k": 3e40}


def test_approval_resume_and_reject(alice: httpx.Client) -> None:
    d = {
        "nodes": [
            T,
            {"id": "ok", "type": "approval", "data": {}},
            {"id": "yes", "type": "transform", "data": {"output": "{{ steps.ok.output }}"}},
            {"id": "no", "type": "transform", "data": {"output": "rejected"}},
        ],
        "edges": [edge("start", "ok"), edge("ok", "yes", "approved"), edge("ok", "no", "rejected")],
    }
    flow_id = publish_flow(alice, d)
    rid = start(alice, flow_id).json()["id"]
    wait_run(alice, rid, until=("waiting",))
    bad = alice.post(f"/runs/{rid}/resume", json={"stepId": "start", "decision": "approved"})
    assert bad.status_code == 409
    assert alice.post(f"/runs/{rid}/resume", json={"stepId": "ok", "decision": "maybe"}).status_code == 422
    r = alice.post(f"/runs/{rid}/resume", json={"stepId": "ok", "decision": "approved", "data": {"note": "fine"}})
    assert r.status_code == 200
    run = wait_run(alice, rid)
    assert run["output"]["decision"] == "approved" and run["output"]["note"] == "fine"
    assert alice.post(f"/runs/{rid}/resume", json={"stepId": "ok", "decision": "approved"}).status_code == 409
    rid = start(alice, flow_id).json()["id"]
    wait_run(alice, rid, until=("waiting",))
    alice.post(f"/runs/{rid}/resume", json={"stepId": "ok", "decision": "rejected"})
    assert wait_run(alice, rid)["output"] == "rejected"


def test_cancel_waiting_and_running_runs(alice: httpx.Client, upstream: Upstream) -> None:
    waiting = publish_flow(
        alice, {"nodes": [T, {"id": "ok", "type": "approval", "data": {}}], "edges": [edge("start", "ok")]}
    )
    rid = start(alice, waiting).json()["id"]
    wait_run(alice, rid, until=("waiting",))
    r = alice.post(f"/runs/{rid}/cancel")
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    assert steps_of(alice, rid)["ok"]["status"] == "cancelled"
    assert alice.post(f"/runs/{rid}/cancel").status_code == 409
    path = f"/down-{uuid.uuid4().hex[:6]}"
    upstream.failures[path] = 1000
    running = publish_flow(
        alice,
        {
            "nodes": [
                T,
                {
                    "id": "h",
                    "type": "http",
                    "data": {
                        "url": upstream.base + path,
                        "retry": {"maxAttempts": 50, "backoff": "fixed", "initialDelayMs": 200},
                    },
                },
            ],
            "edges": [edge("start", "h")],
        },
    )
    rid = start(alice, running).json()["id"]
    wait_run(alice, rid, until=("running",))
    assert alice.post(f"/runs/{rid}/cancel").json()["status"] == "cancelled"
    assert wait_run(alice, rid)["status"] == "cancelled"


def test_retry_from_failed_keeps_succeeded_outputs_and_from_start_makes_a_new_run(
    alice: httpx.Client, upstream: Upstream
) -> None:
    path = f"/later-{uuid.uuid4().hex[:6]}"
    upstream.failures[path] = 1
    d = {
        "nodes": [
            T,
            {"id": "first", "type": "transform", "data": {"output": "{{ run.id }}"}},
            {"id": "call", "type": "http", "data": {"url": upstream.base + path}},
        ],
        "edges": [edge("start", "first"), edge("first", "call")],
    }
    flow_id = publish_flow(alice, d)
    failed = run_of(alice, flow_id)
    assert failed["status"] == "failed"
    assert alice.post(f"/runs/{failed['id']}/retry", json={"mode": "sideways"}).status_code == 422
    r = alice.post(f"/runs/{failed['id']}/retry", json={})
    assert r.status_code == 200 and r.json()["status"] == "queued" and r.json()["retryCount"] == 1
    run = wait_run(alice, failed["id"])
    assert run["status"] == "succeeded" and run["retryCount"] == 1
    assert steps_of(alice, run["id"])["first"]["output"] == failed["id"]
    assert alice.post(f"/runs/{run['id']}/retry", json={}).status_code == 409

    # version 2 replaces the call; a run of version 1 fails, and is retried on version 1 or on the active 2
    alice.put(f"/flows/{flow_id}", json={"name": "f", "definition": chain(1)})
    assert alice.post(f"/flows/{flow_id}/publish").json()["version"] == 2
    alice.post(f"/flows/{flow_id}/rollback", json={"version": 1})
    upstream.failures[path] = 1
    failed = run_of(alice, flow_id)
    assert failed["status"] == "failed" and failed["version"] == 1
    alice.post(f"/flows/{flow_id}/rollback", json={"version": 2})
    same = alice.post(f"/runs/{failed['id']}/retry", json={"mode": "fromStart"})
    assert same.status_code == 201 and same.json()["retryOf"] == failed["id"]
    assert same.json()["triggerType"] == "retry" and same.json()["version"] == 1
    assert wait_run(alice, same.json()["id"])["status"] == "succeeded"
    active = alice.post(f"/runs/{failed['id']}/retry", json={"mode": "fromStart", "version": "active"})
    assert active.status_code == 201 and active.json()["version"] == 2


def test_runs_are_listed_filtered_and_hidden_from_other_tenants(alice: httpx.Client, mallory: httpx.Client) -> None:
    flow_id = publish_flow(alice, chain(1))
    ids = [run_of(alice, flow_id, {"v": i})["id"] for i in range(3)]
    page = alice.get("/runs", params={"flowId": flow_id, "pageSize": 2}).json()
    assert page["total"] == 3 and page["hasMore"] is True and [r["id"] for r in page["items"]] == ids[::-1][:2]
    assert alice.get("/runs", params={"flowId": flow_id, "status": "failed"}).json()["total"] == 0
    assert alice.get("/runs", params={"since": "2999-01-01T00:00:00Z"}).json()["total"] == 0
    assert alice.get("/runs", params={"since": "yesterday"}).status_code == 422
    # a time without a zone is read as UTC, not refused with a 500
    assert alice.get("/runs", params={"flowId": flow_id, "since": "2000-01-01T00:00:00"}).json()["total"] == 3
    assert alice.get("/runs", params={"status": "no-such-status"}).json()["total"] == 0
    rid = ids[0]
    for method, path, body in (
        ("GET", f"/runs/{rid}", None),
        ("GET", f"/runs/{rid}/steps", None),
        ("GET", f"/runs/{rid}/events", None),
        ("POST", f"/runs/{rid}/cancel", None),
        ("POST", f"/runs/{rid}/retry", {}),
        ("POST", f"/runs/{rid}/resume", {"stepId": "s0", "decision": "approved"}),
        ("POST", f"/flows/{flow_id}/runs", {"input": {}}),
    ):
        r = mallory.request(method, path, json=body)
        assert r.status_code == 404, (method, path, r.text)
    assert mallory.get("/runs", params={"flowId": flow_id}).json()["total"] == 0
    assert alice.get("/runs/not-a-uuid").status_code == 404


def test_durable_start_commands_make_exactly_one_run(alice: httpx.Client, infra: Any) -> None:
    import asyncio

    import nats

    from flowmesh.contracts import headers
    from flowmesh.contracts.subjects import RUN_START_CMD

    flow_id = publish_flow(alice, chain(2))
    tenant = alice.get("/flows", params={"pageSize": 1}).json()["items"][0]["tenantId"]
    key = f"sched:test:{uuid.uuid4().hex}"
    command = json.dumps(
        {"flowId": flow_id, "input": {"v": 1}, "idempotencyKey": key, "triggerType": "schedule"}
    ).encode()

    async def send() -> None:
        nc = await nats.connect(infra.nats_url)
        try:
            js = nc.jetstream()
            hdrs = {headers.TENANT: tenant, headers.SCHEMA: "1"}
            await js.publish(RUN_START_CMD, command, headers={**hdrs, headers.MSG_ID: key})
            # a second scheduler replica, or a retry after the dedupe window, sends it again
            await js.publish(RUN_START_CMD, command, headers={**hdrs, headers.MSG_ID: key + ":again"})
            # and a re-send long after carries a later firedAt: the key alone names the start
            later = json.loads(command) | {"input": {"v": 1, "firedAt": "later"}}
            await js.publish(RUN_START_CMD, json.dumps(later).encode(), headers={**hdrs, headers.MSG_ID: key + ":late"})
        finally:
            await nc.close()

    asyncio.run(send())
    deadline = time.monotonic() + 20
    while alice.get("/runs", params={"flowId": flow_id, "status": "succeeded"}).json()["total"] < 1:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    runs = alice.get("/runs", params={"flowId": flow_id}).json()
    assert runs["total"] == 1
    run = runs["items"][0]
    assert run["triggerType"] == "schedule" and run["idempotencyKey"] == key and run["output"] == {"v": 3}


def test_wait_event_resumes_on_a_matching_event_of_its_tenant_only(alice: httpx.Client, infra: Any) -> None:
    import asyncio

    import nats

    from flowmesh.contracts.subjects import external_event

    d = {
        "nodes": [
            T,
            {
                "id": "paid",
                "type": "waitEvent",
                "data": {"eventType": "order.paid", "match": "event.orderId == input.orderId"},
            },
            {"id": "done", "type": "transform", "data": {"output": {"total": "{{ steps.paid.output.total }}"}}},
        ],
        "edges": [edge("start", "paid"), edge("paid", "done")],
    }
    flow_id = publish_flow(alice, d)
    rid = start(alice, flow_id, {"orderId": "A-1"}).json()["id"]
    wait_run(alice, rid, until=("waiting",))
    alice_tenant = alice.get(f"/runs/{rid}").json()["tenantId"]

    async def send(tenant: str, payload: dict[str, Any]) -> None:
        nc = await nats.connect(infra.nats_url)
        try:
            await nc.jetstream().publish(external_event(tenant, "order.paid"), json.dumps(payload).encode())
        finally:
            await nc.close()

    asyncio.run(send(alice_tenant, {"orderId": "B-2", "total": 1}))  # another order
    asyncio.run(send("someone-else", {"orderId": "A-1", "total": 2}))  # another tenant
    asyncio.run(send(alice_tenant, {"orderId": "A-1", "total": 42}))
    # a wrong event taken first would have finished the step with its own total
    run = wait_run(alice, rid)
    assert run["status"] == "succeeded" and run["output"] == {"total": 42}
    assert steps_of(alice, rid)["paid"]["output"] == {"orderId": "A-1", "total": 42}


def child_flow(c: httpx.Client) -> str:
    """A published flow doubling input.n (or failing on n == 13)."""
    d = {
        "nodes": [
            T,
            {"id": "bad", "type": "condition", "data": {"expression": "input.n == 13"}},
            {"id": "boom", "type": "fail", "data": {"message": "unlucky {{ input.n }}"}},
            {"id": "double", "type": "transform", "data": {"output": {"n": "{{ input.n * 2 }}"}}},
        ],
        "edges": [edge("start", "bad"), edge("bad", "boom", "true"), edge("bad", "double", "false")],
    }
    return publish_flow(c, d)


def test_subflow_runs_the_child_and_takes_its_output(alice: httpx.Client) -> None:
    child = child_flow(alice)
    d = {
        "nodes": [
            T,
            {"id": "sub", "type": "subflow", "data": {"flowId": child, "input": {"n": "{{ input.n }}"}}},
            {"id": "after", "type": "transform", "data": {"output": "{{ steps.sub.output.n + 1 }}"}},
        ],
        "edges": [edge("start", "sub"), edge("sub", "after")],
    }
    parent = publish_flow(alice, d)
    run = run_of(alice, parent, {"n": 20})
    assert run["status"] == "succeeded" and run["output"] == 41
    kids = alice.get("/runs", params={"flowId": child}).json()["items"]
    assert len(kids) == 1 and kids[0]["parentRunId"] == run["id"] and kids[0]["triggerType"] == "subflow"
    failed = run_of(alice, parent, {"n": 13})
    assert failed["status"] == "failed" and failed["error"]["type"] == "child-failed"
    assert "unlucky 13" in failed["error"]["message"]


def test_foreach_runs_a_child_per_item_in_order_within_its_concurrency(alice: httpx.Client) -> None:
    child = child_flow(alice)
    d = {
        "nodes": [
            T,
            {
                "id": "each",
                "type": "foreach",
                "data": {"flowId": child, "items": "input.xs", "input": {"n": "{{ item + index }}"}, "concurrency": 2},
            },
        ],
        "edges": [edge("start", "each")],
    }
    parent = publish_flow(alice, d)
    run = run_of(alice, parent, {"xs": [1, 2, 3, 4, 5]})
    assert run["status"] == "succeeded", run
    assert run["output"] == [{"n": 2}, {"n": 6}, {"n": 10}, {"n": 14}, {"n": 18}]
    assert alice.get("/runs", params={"flowId": child, "pageSize": 100}).json()["total"] == 5
    assert run_of(alice, parent, {"xs": []})["output"] == []
    bad = run_of(alice, parent, {"xs": [13, 0]})  # 13 + 0 fails
    assert bad["status"] == "failed" and bad["error"]["type"] == "child-failed"
    assert run_of(alice, parent, {"xs": "nope"})["error"]["type"] == "expression"


def test_cancelling_a_parent_cancels_its_children(alice: httpx.Client) -> None:
    waiting = publish_flow(
        alice, {"nodes": [T, {"id": "ok", "type": "approval", "data": {}}], "edges": [edge("start", "ok")]}
    )
    d = {"nodes": [T, {"id": "sub", "type": "subflow", "data": {"flowId": waiting}}], "edges": [edge("start", "sub")]}
    rid = start(alice, publish_flow(alice, d)).json()["id"]
    wait_run(alice, rid, until=("waiting",))
    deadline = time.monotonic() + 20
    while not (kids := alice.get("/runs", params={"flowId": waiting}).json()["items"]):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    wait_run(alice, kids[0]["id"], until=("waiting",))
    assert alice.post(f"/runs/{rid}/cancel").json()["status"] == "cancelled"
    assert wait_run(alice, kids[0]["id"])["status"] == "cancelled"


def _registry_has(infra: Any, trigger_id: str, enabled: bool, timeout: float = 15) -> None:
    """Wait until the runner's event trigger registry shows the trigger in the given state."""
    import asyncio

    import asyncpg

    async def check() -> bool:
        conn = await asyncpg.connect(infra.database_url.replace("postgresql+asyncpg", "postgresql"))
        try:
            found = await conn.fetchval("SELECT enabled FROM runner.event_triggers WHERE trigger_id = $1", trigger_id)
        finally:
            await conn.close()
        return bool(found is enabled)

    deadline = time.monotonic() + timeout
    while not asyncio.run(check()):
        assert time.monotonic() < deadline, "the runner never learned of the trigger"
        time.sleep(0.1)


def _events_handled(infra: Any, timeout: float = 15) -> None:
    """Wait until the runner's consumer of EVENTS has acknowledged everything published so far."""
    import asyncio

    import nats

    async def pending() -> int:
        nc = await nats.connect(infra.nats_url)
        try:
            info = await nc.jetstream().consumer_info("EVENTS", "runner-events")
            return int(info.num_pending or 0) + int(info.num_ack_pending or 0)
        finally:
            await nc.close()

    deadline = time.monotonic() + timeout
    while asyncio.run(pending()):
        assert time.monotonic() < deadline, "the runner did not get through the events"
        time.sleep(0.05)


def test_event_triggers_start_runs_from_matching_events(alice: httpx.Client, infra: Any) -> None:
    import asyncio

    import nats

    from flowmesh.contracts.subjects import external_event

    flow_id = publish_flow(
        alice,
        {
            "nodes": [T, {"id": "hi", "type": "transform", "data": {"output": {"hello": "{{ input.name }}"}}}],
            "edges": [edge("start", "hi")],
        },
    )
    event_type = f"signup.{uuid.uuid4().hex[:6]}"
    trigger = alice.post(
        f"/flows/{flow_id}/triggers",
        json={"type": "event", "name": "signups", "config": {"eventType": event_type, "filter": "event.plan == 'pro'"}},
    ).json()
    _registry_has(infra, trigger["id"], True)
    tenant = alice.get(f"/flows/{flow_id}").json()["tenantId"]

    async def send(*payloads: dict[str, Any]) -> None:
        nc = await nats.connect(infra.nats_url)
        try:
            for p in payloads:
                await nc.jetstream().publish(external_event(tenant, event_type), json.dumps(p).encode())
        finally:
            await nc.close()

    asyncio.run(send({"name": "free-user", "plan": "free"}, {"name": "ada", "plan": "pro"}))
    deadline = time.monotonic() + 20
    while alice.get("/runs", params={"flowId": flow_id, "status": "succeeded"}).json()["total"] < 1:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    runs = alice.get("/runs", params={"flowId": flow_id}).json()["items"]
    assert len(runs) == 1
    assert runs[0]["triggerType"] == "event" and runs[0]["triggerId"] == trigger["id"]
    assert runs[0]["output"] == {"hello": "ada"}

    alice.patch(f"/triggers/{trigger['id']}", json={"enabled": False})
    _registry_has(infra, trigger["id"], False)
    asyncio.run(send({"name": "bob", "plan": "pro"}, {"name": "eve", "plan": "pro"}))
    _events_handled(infra)  # the runner has seen both while the trigger was off
    alice.patch(f"/triggers/{trigger['id']}", json={"enabled": True})
    _registry_has(infra, trigger["id"], True)
    asyncio.run(send({"name": "zed", "plan": "pro"}))
    while alice.get("/runs", params={"flowId": flow_id, "status": "succeeded"}).json()["total"] < 2:
        assert time.monotonic() < deadline + 20
        time.sleep(0.05)
    names = sorted(r["output"]["hello"] for r in alice.get("/runs", params={"flowId": flow_id}).json()["items"])
    assert names == ["ada", "zed"]
