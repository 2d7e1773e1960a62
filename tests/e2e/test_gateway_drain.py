"""A gateway told to stop drains first: not ready, still answering, each answer closing its connection.

A load balancer (the front of ``make cluster``, a Kubernetes Service) then moves clients to another
replica before this one stops listening, so a rolling restart fails no request.
"""

from __future__ import annotations

import signal
import time

import httpx

from stack import ProcessStack, token


def test_a_stopping_gateway_drains_before_it_stops(stack: ProcessStack) -> None:
    base = stack.start_gateway("drain", {"FLOWMESH_GATEWAY_DRAIN_S": "2"})
    stack.wait_ready(base=base)
    proc = stack.procs["gateway#drain"]
    headers = {"Authorization": "Bearer " + token("drainer")}
    with httpx.Client(base_url=base, timeout=5) as client:
        own = client.get("/readyz", params={"scope": "self"})  # this replica only: what a load balancer asks
        assert own.status_code == 200 and own.json()["checks"] == {"nats": True}
        bad = client.get("/readyz", params={"scope": "everything"})
        assert bad.status_code == 422 and bad.headers["content-type"].startswith("application/problem+json")
        first = client.get("/api/v1/flows", headers=headers)
        assert first.status_code == 200 and first.headers.get("connection", "").lower() != "close"
        proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5
        while (ready := client.get("/readyz")).status_code == 200:
            assert time.monotonic() < deadline, "still ready after SIGTERM"
            time.sleep(0.05)
        assert ready.status_code == 503 and ready.json()["status"] == "draining"
        during = client.get("/api/v1/flows", headers=headers)
        assert during.status_code == 200, during.text  # still serving
        assert during.headers["connection"].lower() == "close"  # the client's next request goes elsewhere
    assert proc.wait(15) == 0
    del stack.procs["gateway#drain"]
