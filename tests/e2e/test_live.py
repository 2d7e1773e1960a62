"""Live runs over WebSocket (snapshot then events, no gap and no duplicate), through the gateway, as a client would
use them."""

from __future__ import annotations

import json
import socket
import time
from typing import Any

import httpx
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection

from stack import ProcessStack, bearer, chain, open_ws, publish_flow, refused, wait_run

T = {"id": "start", "type": "trigger", "data": {}}
APPROVAL = {
    "nodes": [
        T,
        {"id": "ok", "type": "approval", "data": {}},
        {"id": "a", "type": "transform", "data": {"output": 1}},
        {"id": "b", "type": "transform", "data": {"output": 2}},
    ],
    "edges": [
        {"id": "e1", "source": "start", "target": "ok"},
        {"id": "e2", "source": "ok", "target": "a", "sourceHandle": "approved"},
        {"id": "e3", "source": "a", "target": "b"},
    ],
}


def receive(ws: ClientConnection, timeout: float = 15) -> dict[str, Any]:
    msg: dict[str, Any] = json.loads(ws.recv(timeout=timeout))
    return msg


def events_until_final(ws: ClientConnection) -> list[dict[str, Any]]:
    got = []
    while True:
        msg = receive(ws)
        assert msg["type"] == "event" and msg["seq"] == msg["event"]["seq"]
        got.append(msg["event"])
        if msg["event"]["type"] in ("run.succeeded", "run.failed", "run.cancelled"):
            return got


def history(c: httpx.Client, run_id: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = c.get(f"/runs/{run_id}/events", params={"pageSize": 1000}).json()["items"]
    return items


def test_snapshot_then_live_events_with_no_gap_or_duplicate(stack: ProcessStack, alice: httpx.Client) -> None:
    flow_id = publish_flow(alice, APPROVAL)
    rid = alice.post(f"/flows/{flow_id}/runs", json={"input": {}}).json()["id"]
    wait_run(alice, rid, until=("waiting",))
    with open_ws(stack, f"/ws/runs/{rid}", alice) as ws:
        assert ws.subprotocol == "flowmesh.v1"
        snap = receive(ws)
        assert snap["type"] == "snapshot" and snap["run"]["id"] == rid and snap["run"]["status"] == "waiting"
        assert snap["steps"]["ok"]["status"] == "waiting" and snap["steps"]["start"]["status"] == "succeeded"
        n = snap["seq"]
        assert n == len(history(alice, rid))
        alice.post(f"/runs/{rid}/resume", json={"stepId": "ok", "decision": "approved"}).raise_for_status()
        live = events_until_final(ws)
    assert [e["seq"] for e in live] == list(range(n + 1, n + 1 + len(live)))
    assert live == history(alice, rid)[n:]


def test_after_resumes_with_exactly_the_missing_events(stack: ProcessStack, alice: httpx.Client) -> None:
    flow_id = publish_flow(alice, APPROVAL)
    rid = alice.post(f"/flows/{flow_id}/runs", json={"input": {}}).json()["id"]
    wait_run(alice, rid, until=("waiting",))
    with open_ws(stack, f"/ws/runs/{rid}?after=2", alice) as ws:
        first = [receive(ws) for _ in range(len(history(alice, rid)) - 2)]
    assert [m["seq"] for m in first] == list(range(3, 3 + len(first)))
    last_seen = first[-1]["seq"]
    alice.post(f"/runs/{rid}/resume", json={"stepId": "ok", "decision": "approved"}).raise_for_status()
    wait_run(alice, rid)
    # reconnect after the run moved on while nobody watched: history, then the stream stays open
    with open_ws(stack, f"/ws/runs/{rid}?after={last_seen}", alice) as ws:
        missed = events_until_final(ws)
        with pytest.raises(TimeoutError):
            ws.recv(timeout=0.5)  # nothing more, and no duplicate
    assert missed == history(alice, rid)[last_seen:]


def test_a_flow_stream_carries_every_run_and_since_replays(stack: ProcessStack, alice: httpx.Client) -> None:
    flow_id = publish_flow(alice, chain(3))
    before = alice.post(f"/flows/{flow_id}/runs", json={"input": {"v": 0}}).json()
    wait_run(alice, before["id"])
    with open_ws(stack, f"/ws/flows/{flow_id}", alice) as ws:
        ids = [alice.post(f"/flows/{flow_id}/runs", json={"input": {"v": i}}).json()["id"] for i in range(3)]
        for rid in ids:
            wait_run(alice, rid)
        expected = {rid: len(history(alice, rid)) for rid in ids}
        seen: dict[str, list[int]] = {rid: [] for rid in ids}
        for _ in range(sum(expected.values())):
            msg = receive(ws)
            assert msg["event"]["runId"] in seen, "only runs started after connecting"
            seen[msg["event"]["runId"]].append(msg["seq"])
    for rid, seqs in seen.items():
        assert seqs == [e["seq"] for e in history(alice, rid)]
    with open_ws(stack, f"/ws/flows/{flow_id}?since={before['createdAt']}", alice) as ws:
        replayed: dict[str, list[int]] = {}
        total = sum(len(history(alice, r)) for r in [before["id"], *ids])
        for _ in range(total):
            msg = receive(ws)
            replayed.setdefault(msg["event"]["runId"], []).append(msg["seq"])
    assert set(replayed) == {before["id"], *ids}
    assert all(seqs == list(range(1, len(seqs) + 1)) for seqs in replayed.values())


def test_a_since_still_to_come_replays_nothing(stack: ProcessStack, alice: httpx.Client) -> None:
    flow_id = publish_flow(alice, chain(1))
    wait_run(alice, alice.post(f"/flows/{flow_id}/runs", json={"input": {"v": 0}}).json()["id"])
    with open_ws(stack, f"/ws/flows/{flow_id}?since=2365-05-02T21:47:16%2B12:10", alice) as ws:
        rid = alice.post(f"/flows/{flow_id}/runs", json={"input": {"v": 1}}).json()["id"]
        wait_run(alice, rid)
        seen = [receive(ws) for _ in history(alice, rid)]
    assert {m["event"]["runId"] for m in seen} == {rid}, "only the run started after connecting"


def test_handshakes_without_credentials_or_for_another_tenant_are_refused(
    stack: ProcessStack, alice: httpx.Client, mallory: httpx.Client
) -> None:
    flow_id = publish_flow(alice, chain(1))
    rid = alice.post(f"/flows/{flow_id}/runs", json={"input": {"v": 1}}).json()["id"]
    assert refused(stack, f"/ws/runs/{rid}", ["flowmesh.v1"]) == 401
    assert refused(stack, f"/ws/runs/{rid}", ["flowmesh.v1", "bearer.not-a-jwt"]) == 401
    assert refused(stack, f"/ws/runs/{rid}", ["flowmesh.v1", "bearer." + bearer(mallory)]) == 404
    assert refused(stack, f"/ws/flows/{flow_id}", ["flowmesh.v1", "bearer." + bearer(mallory)]) == 404
    good = ["flowmesh.v1", "bearer." + bearer(alice)]
    assert refused(stack, f"/ws/runs/{rid}", good, origin="https://evil.example") == 403
    assert refused(stack, f"/ws/runs/{rid}?after=x", good) == 400
    assert refused(stack, f"/ws/flows/{flow_id}?since=yesterday", good) == 400
    assert refused(stack, f"/ws/flows/{flow_id}", ["chat", "bearer." + bearer(alice)]) == 400
    with open_ws(stack, f"/ws/runs/{rid}", alice, origin="http://localhost:5173") as ws:
        assert receive(ws)["type"] == "snapshot"


def test_tickets_are_single_use(stack: ProcessStack, alice: httpx.Client) -> None:
    flow_id = publish_flow(alice, chain(1))
    rid = alice.post(f"/flows/{flow_id}/runs", json={"input": {"v": 1}}).json()["id"]
    r = alice.post("/ws-tickets")
    assert r.status_code == 201 and set(r.json()) == {"ticket", "expiresAt"}
    ticket = r.json()["ticket"]
    with open_ws(stack, f"/ws/runs/{rid}?ticket={ticket}", None) as ws:
        assert receive(ws)["run"]["id"] == rid
    assert refused(stack, f"/ws/runs/{rid}?ticket={ticket}", ["flowmesh.v1"]) == 401
    assert refused(stack, f"/ws/runs/{rid}?ticket=wst_forged", ["flowmesh.v1"]) == 401
    assert httpx.post(stack.base + "/api/v1/ws-tickets").status_code == 401


def read_until_closed(ws: ClientConnection, limit: float = 60) -> tuple[int, int | None]:
    """Messages read before the server closed the stream, and its close code."""
    received = 0
    deadline = time.monotonic() + limit
    try:
        while time.monotonic() < deadline:
            ws.recv(timeout=10)
            received += 1
    except TimeoutError as exc:
        raise AssertionError(f"the stream went quiet after {received} messages, not closed") from exc
    except ConnectionClosed as closed:
        return received, closed.rcvd.code if closed.rcvd is not None else None
    raise AssertionError(f"the stream was not closed in {limit}s ({received} messages)")


def test_a_client_that_falls_far_behind_is_closed_with_1013(stack: ProcessStack, alice: httpx.Client) -> None:
    flow_id = publish_flow(alice, chain(40))  # 84 events a run
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the kernel buffers little for us
    sock.connect(("127.0.0.1", stack.port))
    with open_ws(stack, f"/ws/flows/{flow_id}", alice, sock=sock) as ws:
        ids = [alice.post(f"/flows/{flow_id}/runs", json={"input": {"v": i}}).json()["id"] for i in range(40)]
        for rid in ids:
            wait_run(alice, rid, timeout=60)
        # only now read: what was queued before the cut, then the close
        received, code = read_until_closed(ws)
    assert code == 1013, f"closed with {code} after {received} messages"
    assert received < 40 * 84
