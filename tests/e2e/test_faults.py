"""An accepted run is never lost, a step's result is recorded once (guarantees 1 and 2 of
docs/architecture.md#guarantees): SIGKILL the runner, or restart NATS, with 60 runs in flight.

Every accepted run still reaches the right final state, and no step's result is recorded twice.
"""

from __future__ import annotations

import asyncio
import itertools
import signal
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from flowmesh.cli.embedded import EmbeddedNats, start_nats
from stack import ProcessStack, publish_flow, wait_run
from upstream import Upstream

RUNS = 60
FAST_RECOVERY = {
    "FLOWMESH_RUNNER_ACK_WAIT_S": "3",
    "FLOWMESH_RUNNER_SWEEP_INTERVAL_S": "1",
    "FLOWMESH_RUNNER_STALLED_STEP_S": "4",
    "FLOWMESH_RUNNER_STALLED_RUN_S": "2",
}


def definition(upstream: Upstream) -> dict[str, Any]:
    """trigger → transform → slow http → transform → slow http → transform: runs stay in flight a while."""
    slow = {"url": upstream.base + "/sleep/150", "retry": {"maxAttempts": 5, "backoff": "fixed", "initialDelayMs": 200}}
    nodes = [
        {"id": "start", "type": "trigger", "data": {}},
        {"id": "a", "type": "transform", "data": {"output": {"v": "{{ input.v * 2 }}"}}},
        {"id": "h1", "type": "http", "data": slow},
        {"id": "b", "type": "transform", "data": {"output": {"v": "{{ steps.a.output.v + 1 }}"}}},
        {"id": "h2", "type": "http", "data": slow},
        {
            "id": "c",
            "type": "transform",
            "data": {"output": {"v": "{{ steps.b.output.v }}", "ok": "{{ steps.h2.output.body.slept }}"}},
        },
    ]
    order = ["start", "a", "h1", "b", "h2", "c"]
    return {
        "nodes": nodes,
        "edges": [{"id": f"e{i}", "source": s, "target": t} for i, (s, t) in enumerate(itertools.pairwise(order))],
    }


@pytest.fixture
def own_nats(tmp_path: Path) -> Iterator[EmbeddedNats]:
    nats = start_nats(tmp_path / "nats")
    yield nats
    nats.stop()


@pytest.fixture
def fault_stack(infra: Any, own_nats: EmbeddedNats, tmp_path: Path) -> Iterator[ProcessStack]:
    with ProcessStack(own_nats.url, infra.database_url, tmp_path, env=FAST_RECOVERY) as s:
        yield s


def start_many(c: httpx.Client, flow_id: str) -> list[tuple[str, int]]:
    started = []
    for v in range(RUNS):
        r = c.post(f"/flows/{flow_id}/runs", json={"input": {"v": v}})
        assert r.status_code == 201, r.text
        started.append((r.json()["id"], v))
    return started


def in_flight(c: httpx.Client, flow_id: str, timeout: float = 30) -> None:
    """Wait until some runs are mid-way (running) and none has finished yet, if possible."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if c.get("/runs", params={"flowId": flow_id, "status": "running", "pageSize": 1}).json()["total"] >= 5:
            return
        time.sleep(0.02)
    raise TimeoutError("runs never got going")


def metered_exactly(c: httpx.Client, run_ids: list[str], timeout: float = 60) -> None:
    """The usage service counted each run and finished step once, whatever the runner re-published."""
    steps = 0
    for run_id in run_ids:
        events = c.get(f"/runs/{run_id}/events", params={"pageSize": 1000}).json()["items"]
        steps += sum(
            1
            for e in events
            if e["type"] in ("step.succeeded", "step.failed") and e["data"].get("stepType") != "trigger"
        )
    assert steps == 5 * len(run_ids)  # a, h1, b, h2, c: each once
    day = {
        "from": (datetime.now(UTC) - timedelta(days=1)).date().isoformat(),
        "to": datetime.now(UTC).date().isoformat(),
    }
    deadline = time.monotonic() + timeout
    while True:
        days = c.get("/usage/export", params=day).json()["items"]
        found = {k: sum(d[k] for d in days) for k in ("runs", "runsSucceeded", "steps")}
        if found == {"runs": len(run_ids), "runsSucceeded": len(run_ids), "steps": steps}:
            return
        assert time.monotonic() < deadline, found
        time.sleep(0.2)


def check_all(c: httpx.Client, started: list[tuple[str, int]], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    for run_id, v in started:
        run = wait_run(c, run_id, timeout=max(1.0, deadline - time.monotonic()))
        assert run["status"] == "succeeded", run
        assert run["output"] == {"v": v * 2 + 1, "ok": True}
        events = c.get(f"/runs/{run_id}/events", params={"pageSize": 1000}).json()["items"]
        assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
        finished = Counter(e["stepId"] for e in events if e["type"] in ("step.succeeded", "step.failed"))
        assert finished == dict.fromkeys(["start", "a", "h1", "b", "h2", "c"], 1), finished
        steps = c.get(f"/runs/{run_id}/steps").json()
        assert steps["total"] == 6 and {s["status"] for s in steps["items"]} == {"succeeded"}


@pytest.mark.timeout(300)
def test_sigkill_of_the_runner_loses_no_run_and_records_no_step_twice(
    fault_stack: ProcessStack, upstream: Upstream
) -> None:
    with fault_stack.client(f"fault-{uuid.uuid4().hex[:6]}") as c:
        flow_id = publish_flow(c, definition(upstream))
        started = start_many(c, flow_id)
        in_flight(c, flow_id)  # the kill must land while runs are moving
        fault_stack.kill("runner", signal.SIGKILL)
        fault_stack.start("runner")
        check_all(c, started)
        metered_exactly(c, [run_id for run_id, _ in started])


def lease_of(database_url: str, run_id: str, step_id: str) -> datetime | None:
    """The step's lease: set when the runner that made it ready executes it itself, with no work message."""

    async def read() -> datetime | None:
        conn = await asyncpg.connect(database_url.replace("postgresql+asyncpg://", "postgresql://"))
        try:
            return await conn.fetchval(  # type: ignore[no-any-return]
                "SELECT lease_until FROM runner.step_runs WHERE run_id = $1 AND step_id = $2", run_id, step_id
            )
        finally:
            await conn.close()

    return asyncio.run(read())


@pytest.mark.timeout(120)
def test_a_step_its_runner_took_on_itself_runs_again_when_that_runner_dies(
    fault_stack: ProcessStack, upstream: Upstream
) -> None:
    hold = f"lease-{uuid.uuid4().hex[:8]}"
    nodes = [
        {"id": "start", "type": "trigger", "data": {}},
        {"id": "ok", "type": "approval", "data": {}},
        {"id": "call", "type": "http", "data": {"url": f"{upstream.base}/hold/{hold}"}},
    ]
    edges = [{"id": "e1", "source": "start", "target": "ok"}, {"id": "e2", "source": "ok", "target": "call"}]
    with fault_stack.client(f"fault-{uuid.uuid4().hex[:6]}") as c:
        flow_id = publish_flow(c, {"nodes": nodes, "edges": edges})
        run_id = c.post(f"/flows/{flow_id}/runs", json={"input": {}}).json()["id"]
        wait_run(c, run_id, until=("waiting",))
        # the approval's change makes `call` ready: the runner that commits it executes it there and then
        assert c.post(f"/runs/{run_id}/resume", json={"stepId": "ok", "decision": "approved"}).status_code == 200
        runs_again_once(fault_stack, upstream, c, run_id, hold)


@pytest.mark.timeout(120)
def test_a_first_step_its_starting_runner_took_on_itself_runs_again_when_that_runner_dies(
    fault_stack: ProcessStack, upstream: Upstream
) -> None:
    hold = f"first-{uuid.uuid4().hex[:8]}"
    nodes = [
        {"id": "start", "type": "trigger", "data": {}},
        {"id": "call", "type": "http", "data": {"url": f"{upstream.base}/hold/{hold}"}},
    ]
    with fault_stack.client(f"fault-{uuid.uuid4().hex[:6]}") as c:
        flow_id = publish_flow(c, {"nodes": nodes, "edges": [{"id": "e1", "source": "start", "target": "call"}]})
        # the replica that creates the run leases its first step in the same statement and executes it
        run_id = c.post(f"/flows/{flow_id}/runs", json={"input": {}}).json()["id"]
        runs_again_once(fault_stack, upstream, c, run_id, hold)


def runs_again_once(fault_stack: ProcessStack, upstream: Upstream, c: Any, run_id: str, hold: str) -> None:
    """Once the runner executes its leased step ``call`` (waiting on ``hold``), SIGKILL it: the run still
    succeeds, the step ran again elsewhere and its result was recorded once."""
    deadline = time.monotonic() + 20
    while not any(r["path"] == f"/hold/{hold}" for r in upstream.requests):
        assert time.monotonic() < deadline, "the step was never executed"
        time.sleep(0.02)
    assert lease_of(fault_stack.env["DATABASE_URL"], run_id, "call") is not None
    fault_stack.kill("runner", signal.SIGKILL)  # mid-attempt: nobody will finish it or send its work
    upstream.release(hold)
    fault_stack.start("runner")
    # the lease (3 s: the ack wait) runs out, the sweep sends the step's work, a runner executes it again
    run = wait_run(c, run_id, timeout=60)
    assert run["status"] == "succeeded", run
    assert sum(r["path"] == f"/hold/{hold}" for r in upstream.requests) == 2  # at least once: twice here
    events = c.get(f"/runs/{run_id}/events", params={"pageSize": 1000}).json()["items"]
    assert [e["type"] for e in events if e.get("stepId") == "call" and e["type"].startswith("step.")] == [
        "step.started",
        "step.succeeded",
    ]  # and recorded once
    assert lease_of(fault_stack.env["DATABASE_URL"], run_id, "call") is None


@pytest.mark.timeout(300)
def test_a_nats_restart_loses_no_run(
    fault_stack: ProcessStack, own_nats: EmbeddedNats, upstream: Upstream, tmp_path: Path
) -> None:
    with fault_stack.client(f"fault-{uuid.uuid4().hex[:6]}") as c:
        flow_id = publish_flow(c, definition(upstream))
        started = start_many(c, flow_id)
        in_flight(c, flow_id)
        own_nats.process.send_signal(signal.SIGKILL)
        own_nats.process.wait(10)
        restarted = start_nats(own_nats.store_dir, port=own_nats.port)
        try:
            check_all(c, started)
        finally:
            restarted.stop()


@pytest.mark.timeout(120)
def test_services_stop_on_sigterm_even_when_nats_is_gone(infra: Any, own_nats: EmbeddedNats, tmp_path: Path) -> None:
    s = ProcessStack(own_nats.url, infra.database_url, tmp_path, services=("gateway", "flows"))
    s.start_all()
    try:
        deadline = time.monotonic() + 60
        while not _up(s):
            assert time.monotonic() < deadline, s.logs("gateway")
            time.sleep(0.1)
        own_nats.process.send_signal(signal.SIGKILL)
        own_nats.process.wait(10)
        procs = list(s.procs.values())
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            assert proc.wait(30) is not None  # bounded: no endless drain towards a dead server
    finally:
        s.stop_all()


def _up(s: ProcessStack) -> bool:
    try:
        return httpx.get(s.base + "/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
