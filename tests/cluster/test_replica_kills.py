"""An accepted run is never lost (guarantee 1 of docs/architecture.md#guarantees) with replicas: SIGKILL one
replica of each service in turn, under load.

While a replica is down the other one carries the service: a batch of runs started after the kill
all finish before it comes back. A WebSocket watcher whose gateway dies reconnects through the front
with ``?after=<last seq>`` and misses nothing, and sees nothing twice.
"""

from __future__ import annotations

import itertools
import json
import logging
import signal
import uuid
from typing import Any

import httpx
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from cluster.harness import Load, api, check_runs, check_usage, patiently, publish, slow_flow, wait_until
from flowmesh.cli.cluster import ClusterShape
from flowmesh.cli.main import SERVICES
from upstream import Upstream

log = logging.getLogger(__name__)
BATCH = 15


@pytest.mark.timeout(240)
def test_each_service_carries_on_when_one_of_its_replicas_is_killed(
    shape: ClusterShape, upstream: Upstream, tenant: str
) -> None:
    with api(shape, tenant) as c:
        flow_id = publish(c, slow_flow(upstream))
        load = Load(shape, tenant, flow_id)
        try:
            with load.steady(workers=3, pause=0.3):
                for service in SERVICES:
                    victim = f"{service}-1"
                    shape.kill(victim, signal.SIGKILL)
                    # runs started with only the other replica up must finish before the victim is back
                    batch = load.start_many(BATCH, workers=BATCH)
                    assert len(batch) == BATCH, load.unexpected
                    wait_until(
                        lambda batch=batch: _succeeded(c, batch),  # type: ignore[misc]
                        timeout=60,
                        what=f"runs started while {victim} was down to succeed",
                        interval=0.25,
                    )
                    assert shape.pids()[victim] is None, f"{victim} came back by itself"
                    shape.start(victim)
                shape.wait_ready(timeout=120)
            check_runs(c, load)
            check_usage(c, len(load.accepted))
        finally:
            load.close()
        log.info("replica kills: %d runs accepted; retryable answers seen: %s", len(load.accepted), load.summary())


def _succeeded(c: httpx.Client, run_ids: list[str]) -> bool:
    return all(patiently(c, "GET", f"/runs/{run_id}").json()["status"] == "succeeded" for run_id in run_ids)


def _hold_flow(upstream: Upstream, tag: str) -> dict[str, Any]:
    """trigger → http held at ``<tag>-1`` → transform → http held at ``<tag>-2`` → transform."""
    nodes = [
        {"id": "start", "type": "trigger", "data": {}},
        {"id": "h1", "type": "http", "data": {"url": f"{upstream.base}/hold/{tag}-1"}},
        {"id": "mid", "type": "transform", "data": {"output": {"half": True}}},
        {"id": "h2", "type": "http", "data": {"url": f"{upstream.base}/hold/{tag}-2"}},
        {"id": "end", "type": "transform", "data": {"output": {"done": "{{ steps.h2.output.body.held }}"}}},
    ]
    order = [n["id"] for n in nodes]
    return {
        "nodes": nodes,
        "edges": [{"id": f"e{i}", "source": s, "target": t} for i, (s, t) in enumerate(itertools.pairwise(order))],
    }


def _watch(url: str, token: str) -> ClientConnection:
    return connect(url, subprotocols=["flowmesh.v1", "bearer." + token], open_timeout=10)  # type: ignore[list-item]


def _events_until(ws: ClientConnection, seen: list[dict[str, Any]], done: Any) -> None:
    """Receive event messages into ``seen`` until ``done(event)``."""
    while True:
        msg = json.loads(ws.recv(timeout=30))
        assert msg["type"] == "event" and msg["seq"] == msg["event"]["seq"], msg
        seen.append(msg["event"])
        if done(msg["event"]):
            return


@pytest.mark.timeout(120)
def test_a_watcher_whose_gateway_dies_resumes_through_the_front_with_no_gap_or_duplicate(
    shape: ClusterShape, upstream: Upstream, tenant: str
) -> None:
    tag = f"ws-{uuid.uuid4().hex[:8]}"
    token = shape.token(tenant)
    gateway = shape.replicas["gateway-1"]
    with api(shape, tenant) as c:
        flow_id = publish(c, _hold_flow(upstream, tag))
        r = c.post(f"/flows/{flow_id}/runs", json={"input": {}})
        assert r.status_code == 201, r.text
        run_id = r.json()["id"]
        seen: list[dict[str, Any]] = []
        # straight to one gateway replica, every event from the first (no snapshot)
        with _watch(f"ws://127.0.0.1:{gateway.port}/ws/runs/{run_id}?after=0", token) as ws:
            _events_until(ws, seen, lambda e: e["type"] == "step.started" and e["stepId"] == "h1")
            shape.kill("gateway-1", signal.SIGKILL)
            with pytest.raises(ConnectionClosed):
                _events_until(ws, seen, lambda _: False)  # whatever was in flight, then the end
        last = seen[-1]["seq"]
        # the run moves on while nobody watches
        upstream.release(f"{tag}-1")
        wait_until(
            lambda: any(
                s["stepId"] == "h2" and s["status"] == "running"
                for s in patiently(c, "GET", f"/runs/{run_id}/steps").json()["items"]
            ),
            timeout=30,
            what="the run to reach h2",
        )
        front = shape.base_url.replace("http://", "ws://")
        with _watch(f"{front}/ws/runs/{run_id}?after={last}", token) as again:
            _events_until(again, seen, lambda e: e["type"] == "step.started" and e["stepId"] == "h2")
            upstream.release(f"{tag}-2")
            _events_until(again, seen, lambda e: e["type"] == "run.succeeded")
        history = patiently(c, "GET", f"/runs/{run_id}/events", params={"pageSize": 1000}).json()["items"]
    seqs = [e["seq"] for e in seen]
    assert seqs == list(range(1, len(history) + 1)), f"gap or duplicate around {last}: {seqs}"
    assert seen == history
    shape.start("gateway-1")
    shape.wait_ready(timeout=60)
