"""Time, end to end: delays, approval and waitEvent timeouts, attempt timeouts, run time limits.

The runner arms the scheduler's durable timers (the scheduler owns all of time) and records every deadline in
its own rows, so the sweep enforces one whose timer was lost. These tests run on their own stack
(their own NATS) because they kill the scheduler and the runner.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import nats
import pytest

from flowmesh.cli.embedded import EmbeddedNats, start_nats
from flowmesh.contracts.ids import format_time
from flowmesh.contracts.subjects import timer_fired
from stack import ProcessStack, publish_flow, wait_run
from upstream import Upstream

T = {"id": "start", "type": "trigger", "data": {}}
STACK_ENV = {
    "FLOWMESH_RUNNER_SWEEP_INTERVAL_S": "1",
    # long enough that a deadline met on time was met by the scheduler's timer, not by the sweep
    "FLOWMESH_RUNNER_TIMER_FALLBACK_S": "30",
}

pytestmark = pytest.mark.timeout(120)


def edge(source: str, target: str, handle: str | None = None) -> dict[str, Any]:
    e: dict[str, Any] = {"id": f"{source}-{target}-{handle}", "source": source, "target": target}
    if handle:
        e["sourceHandle"] = handle
    return e


@pytest.fixture(scope="module")
def timer_nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedNats]:
    server = start_nats(tmp_path_factory.mktemp("timers-nats"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def tstack(infra: Any, timer_nats: EmbeddedNats, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProcessStack]:
    with ProcessStack(timer_nats.url, infra.database_url, tmp_path_factory.mktemp("timers"), env=STACK_ENV) as s:
        yield s


@pytest.fixture
def c(tstack: ProcessStack) -> Iterator[httpx.Client]:
    with tstack.client(f"timer-{uuid.uuid4().hex[:8]}") as client:
        yield client


def start(c: httpx.Client, flow_id: str, inp: Any = None) -> str:
    r = c.post(f"/flows/{flow_id}/runs", json={"input": inp if inp is not None else {}})
    assert r.status_code == 201, r.text
    run_id: str = r.json()["id"]
    return run_id


def steps_of(c: httpx.Client, run_id: str) -> dict[str, dict[str, Any]]:
    return {s["stepId"]: s for s in c.get(f"/runs/{run_id}/steps").json()["items"]}


def events_of(c: httpx.Client, run_id: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = c.get(f"/runs/{run_id}/events", params={"pageSize": 1000}).json()["items"]
    assert [e["seq"] for e in items] == list(range(1, len(items) + 1))
    return items


def seconds(run: dict[str, Any]) -> float:
    started = datetime.fromisoformat(run["createdAt"])
    return (datetime.fromisoformat(run["completedAt"]) - started).total_seconds()


def restart(s: ProcessStack, *names: str, env: dict[str, str] | None = None) -> None:
    """SIGKILL services and start them again (the runner with ``env`` if given)."""
    for name in names:
        s.kill(name, signal.SIGKILL)
    for name in names:
        s.start(name, env if name == "runner" else None)


def runner_answers(c: httpx.Client, timeout: float = 60) -> None:
    """Wait until the runner serves requests again (readiness needs every service; this needs one)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if c.get("/runs", params={"pageSize": 1}).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError("the runner did not come back")


def fire(nats_url: str, *timers: dict[str, Any]) -> None:
    """Publish fired timers on the runner's subject, as the scheduler would (for stale-timer tests)."""

    async def send() -> None:
        nc = await nats.connect(nats_url)
        try:
            js = nc.jetstream()
            for body in timers:
                await js.publish(timer_fired("runner"), json.dumps(body).encode())
        finally:
            await nc.close()

    asyncio.run(send())


# --- delay -----------------------------------------------------------------------------------------


def test_a_delay_survives_sigkill_of_the_scheduler_and_the_runner_and_fires_once(
    tstack: ProcessStack, c: httpx.Client
) -> None:
    d = {
        "nodes": [
            T,
            {"id": "wait", "type": "delay", "data": {"durationMs": 2000}},
            {"id": "after", "type": "transform", "data": {"output": {"firedAt": "{{ steps.wait.output.firedAt }}"}}},
        ],
        "edges": [edge("start", "wait"), edge("wait", "after")],
    }
    flow_id = publish_flow(c, d)
    began = time.monotonic()
    run_id = start(c, flow_id)
    assert wait_run(c, run_id, until=("waiting",))["status"] == "waiting"
    assert steps_of(c, run_id)["wait"]["status"] == "waiting"
    time.sleep(max(0.0, 0.8 - (time.monotonic() - began)))  # mid-delay: the timer is armed by now
    restart(tstack, "scheduler", "runner")
    tstack.wait_ready()
    run = wait_run(c, run_id, timeout=25)  # well before the sweep's fallback (30 s): the timer did it
    assert run["status"] == "succeeded", run
    assert seconds(run) >= 2.0
    wait = steps_of(c, run_id)["wait"]
    assert wait["durationMs"] >= 2000 and wait["output"]["firedAt"] == run["output"]["firedAt"]
    fired_at = datetime.fromisoformat(run["output"]["firedAt"])
    assert fired_at - datetime.fromisoformat(run["createdAt"]) >= timedelta(seconds=2)
    events = events_of(c, run_id)
    finished = Counter((e["type"], e.get("stepId")) for e in events if e["type"].startswith(("step.", "run.")))
    assert finished[("step.succeeded", "wait")] == 1 and finished[("run.succeeded", None)] == 1
    assert finished[("step.waiting", "wait")] == 1 and finished[("run.waiting", None)] == 1


def test_a_delay_until_a_past_time_goes_on_at_once(c: httpx.Client) -> None:
    d = {
        "nodes": [
            T,
            {"id": "fixed", "type": "delay", "data": {"until": "2020-01-01T00:00:00Z"}},
            {"id": "given", "type": "delay", "data": {"until": "{{ input.at }}"}},
        ],
        "edges": [edge("start", "fixed"), edge("fixed", "given")],
    }
    flow_id = publish_flow(c, d)
    run = wait_run(c, start(c, flow_id, {"at": format_time(datetime.now(UTC) - timedelta(hours=1))}), timeout=10)
    assert run["status"] == "succeeded", run
    assert seconds(run) < 1.0
    steps = steps_of(c, run["id"])
    assert steps["fixed"]["input"] == {"until": "2020-01-01T00:00:00.000Z"}
    assert set(steps["given"]["output"]) == {"firedAt"}
    assert not any(e["type"] in ("step.waiting", "run.waiting") for e in events_of(c, run["id"]))
    bad = wait_run(c, start(c, flow_id, {"at": "next tuesday"}), timeout=10)
    assert bad["status"] == "failed" and bad["error"]["type"] == "configuration" and bad["error"]["stepId"] == "given"


def test_a_delay_until_a_future_time_waits_for_it(c: httpx.Client) -> None:
    d = {"nodes": [T, {"id": "w", "type": "delay", "data": {"until": "{{ input.at }}"}}], "edges": [edge("start", "w")]}
    flow_id = publish_flow(c, d)
    at = datetime.now(UTC) + timedelta(seconds=1.5)
    run = wait_run(c, start(c, flow_id, {"at": format_time(at)}), timeout=15)
    assert run["status"] == "succeeded", run
    assert datetime.fromisoformat(run["completedAt"]) >= at.replace(microsecond=at.microsecond // 1000 * 1000)
    assert datetime.fromisoformat(run["output"]["firedAt"]) >= at - timedelta(milliseconds=1)


# --- approval and waitEvent timeouts ---------------------------------------------------------------


def test_an_approval_timeout_takes_the_timeout_handle_or_fails_the_run(c: httpx.Client) -> None:
    nodes = [
        T,
        {"id": "ok", "type": "approval", "data": {"timeoutMs": 1000}},
        {"id": "yes", "type": "transform", "data": {"output": "approved"}},
        {"id": "late", "type": "transform", "data": {"output": "{{ steps.ok.output.decision }}"}},
    ]
    edges = [edge("start", "ok"), edge("ok", "yes", "approved"), edge("ok", "late", "timeout")]
    handled = publish_flow(c, {"nodes": nodes, "edges": edges})
    unhandled = publish_flow(c, {"nodes": nodes[:3], "edges": [edge("start", "ok"), edge("ok", "yes", "approved")]})
    first, second = start(c, handled), start(c, unhandled)
    resumed = start(c, handled)
    wait_run(c, resumed, until=("waiting",))
    r = c.post(f"/runs/{resumed}/resume", json={"stepId": "ok", "decision": "approved"})
    assert r.status_code == 200, r.text

    run = wait_run(c, first, timeout=15)
    assert run["status"] == "succeeded" and run["output"] == "timeout", run
    assert 1.0 <= seconds(run) < 10
    steps = steps_of(c, first)
    assert steps["ok"]["output"] == {"decision": "timeout"} and steps["yes"]["status"] == "skipped"

    failed = wait_run(c, second, timeout=15)
    assert failed["status"] == "failed", failed
    assert failed["error"]["type"] == "timeout" and failed["error"]["stepId"] == "ok"
    assert "timed out after 1000 ms" in failed["error"]["message"] and "'timeout'" in failed["error"]["message"]
    # retried in place, the approval waits again with a timer of its own (the old one is stale)
    r = c.post(f"/runs/{second}/retry", json={})
    assert r.status_code == 200 and r.json()["retryCount"] == 1, r.text
    again = wait_run(c, second, timeout=15)
    assert again["status"] == "failed" and again["error"]["type"] == "timeout" and again["retryCount"] == 1
    assert sum(e["type"] == "run.failed" for e in events_of(c, second)) == 2

    # resumed before its timeout: approved, and the timer (cancelled, or stale if it fires) changes nothing
    assert wait_run(c, resumed, timeout=10)["output"] == "approved"
    time.sleep(1.2)
    assert wait_run(c, resumed)["status"] == "succeeded"
    assert events_of(c, resumed)[-1]["type"] == "run.succeeded"


def test_a_wait_event_timeout_takes_the_timeout_handle_or_fails_the_run(c: httpx.Client) -> None:
    wait = {"id": "paid", "type": "waitEvent", "data": {"eventType": "never.comes", "timeoutMs": 1000}}
    gave_up = {"id": "gaveUp", "type": "transform", "data": {"output": {"paid": False}}}
    handled = publish_flow(
        c, {"nodes": [T, wait, gave_up], "edges": [edge("start", "paid"), edge("paid", "gaveUp", "timeout")]}
    )
    unhandled = publish_flow(c, {"nodes": [T, wait], "edges": [edge("start", "paid")]})
    first, second = start(c, handled), start(c, unhandled)
    run = wait_run(c, first, timeout=15)
    assert run["status"] == "succeeded" and run["output"] == {"paid": False}, run
    assert seconds(run) >= 1.0
    failed = wait_run(c, second, timeout=15)
    assert failed["status"] == "failed" and failed["error"]["type"] == "timeout", failed
    assert failed["error"]["stepId"] == "paid" and "'timeout' handle" in failed["error"]["message"]


# --- run time limit --------------------------------------------------------------------------------


def test_a_run_past_its_time_limit_is_timed_out_and_its_children_cancelled(c: httpx.Client) -> None:
    child = publish_flow(
        c, {"nodes": [T, {"id": "hold", "type": "approval", "data": {}}], "edges": [edge("start", "hold")]}
    )
    parent = publish_flow(
        c,
        {
            "nodes": [
                T,
                {"id": "sub", "type": "subflow", "data": {"flowId": child}},
                {"id": "d", "type": "delay", "data": {"durationMs": 60_000}},
            ],
            "edges": [edge("start", "sub"), edge("start", "d")],
        },
        settings={"runTimeoutMs": 1500},
    )
    run_id = start(c, parent)
    run = wait_run(c, run_id, timeout=15)
    assert run["status"] == "timedOut", run
    assert run["output"] is None
    assert run["error"] == {"message": "the run did not finish within 1500 ms", "stepId": None, "type": "timeout"}
    assert 1.5 <= seconds(run) < 10
    steps = steps_of(c, run_id)
    assert steps["sub"]["status"] == "cancelled" and steps["d"]["status"] == "cancelled"
    events = events_of(c, run_id)
    assert events[-1]["type"] == "run.timedOut" and events[-1]["data"]["status"] == "timedOut"
    kids = c.get("/runs", params={"flowId": child}).json()["items"]
    assert len(kids) == 1 and kids[0]["parentRunId"] == run_id
    assert wait_run(c, kids[0]["id"], timeout=10)["status"] == "cancelled"
    assert c.post(f"/runs/{run_id}/cancel").status_code == 409  # final
    # a run that ends within its limit is not timed out later
    quick = publish_flow(
        c,
        {"nodes": [T, {"id": "w", "type": "delay", "data": {"durationMs": 300}}], "edges": [edge("start", "w")]},
        settings={"runTimeoutMs": 1200},
    )
    done = start(c, quick)
    assert wait_run(c, done, timeout=10)["status"] == "succeeded"
    time.sleep(1.5)
    assert wait_run(c, done)["status"] == "succeeded" and events_of(c, done)[-1]["type"] == "run.succeeded"


# --- attempt timeouts ------------------------------------------------------------------------------


def test_an_attempt_whose_worker_died_times_out_by_its_timer(
    tstack: ProcessStack, c: httpx.Client, upstream: Upstream
) -> None:
    path = f"/sleep/8000?n={uuid.uuid4().hex}"
    d = {
        "nodes": [T, {"id": "h", "type": "http", "data": {"url": upstream.base + path, "timeoutMs": 1000}}],
        "edges": [edge("start", "h")],
    }
    flow_id = publish_flow(c, d)
    run_id = start(c, flow_id)
    deadline = time.monotonic() + 10
    while not any(r["path"] == path for r in upstream.requests):  # the attempt is under way
        assert time.monotonic() < deadline
        time.sleep(0.05)
    began = time.monotonic()
    restart(tstack, "runner")
    runner_answers(c)
    run = wait_run(c, run_id, timeout=25)
    # the message would come back only after ack_wait (30 s); the attempt's timer ends it first
    assert time.monotonic() - began < 15
    assert run["status"] == "failed" and run["error"]["type"] == "timeout", run
    assert "did not finish within 1000 ms" in run["error"]["message"]
    assert steps_of(c, run_id)["h"]["status"] == "failed"


# --- stale timers and lost timers ------------------------------------------------------------------


def test_a_stale_or_foreign_fired_timer_is_ignored(c: httpx.Client, timer_nats: EmbeddedNats) -> None:
    d = {
        "nodes": [
            T,
            {"id": "ok", "type": "approval", "data": {"timeoutMs": 120_000}},
            {"id": "yes", "type": "transform", "data": {"output": "approved"}},
            {"id": "late", "type": "transform", "data": {"output": "timed out"}},
        ],
        "edges": [edge("start", "ok"), edge("ok", "yes", "approved"), edge("ok", "late", "timeout")],
    }
    flow_id = publish_flow(c, d)
    run_id = start(c, flow_id)
    wait_run(c, run_id, until=("waiting",))
    before = len(events_of(c, run_id))
    now = format_time(datetime.now(UTC))

    def fired(key: str, payload: dict[str, Any], due: str = now) -> dict[str, Any]:
        return {"owner": "runner", "key": key, "dueAt": due, "payload": payload, "firedAt": now}

    step = {"runId": run_id, "stepId": "ok", "retryCount": 0}
    fire(
        timer_nats.url,
        fired("a", {**step, "attempt": 2}),  # another attempt
        fired("b", {**step, "attempt": 1, "retryCount": 1}),  # another retry of the run
        fired("c", {**step, "attempt": 1}),  # the right attempt, but not its deadline
        fired("d", {"runId": run_id, "retryCount": 0}),  # the run has no timer of its own
        fired("e", {"runId": str(uuid.uuid4()), "retryCount": 0}),  # no such run
        fired("f", {"something": "else"}),  # not a runner payload
        {"owner": "runner", "garbage": True},  # not a fired timer at all
    )
    time.sleep(1.5)
    assert c.get(f"/runs/{run_id}").json()["status"] == "waiting"
    assert len(events_of(c, run_id)) == before and steps_of(c, run_id)["ok"]["status"] == "waiting"
    r = c.post(f"/runs/{run_id}/resume", json={"stepId": "ok", "decision": "approved"})
    assert r.status_code == 200, r.text
    run = wait_run(c, run_id, timeout=10)
    assert run["status"] == "succeeded" and run["output"] == "approved"
    # a timer of a finished run changes nothing either
    fire(timer_nats.url, fired("g", {**step, "attempt": 1}))
    time.sleep(1.0)
    assert events_of(c, run_id)[-1]["type"] == "run.succeeded"


def test_a_deadline_whose_timer_was_lost_is_enforced_by_the_sweep(tstack: ProcessStack, c: httpx.Client) -> None:
    d = {
        "nodes": [T, {"id": "w", "type": "delay", "data": {"durationMs": 1000}}],
        "edges": [edge("start", "w")],
    }
    flow_id = publish_flow(c, d)
    tstack.kill("scheduler", signal.SIGKILL)  # arming fails: no scheduler answers
    restart(tstack, "runner", env={"FLOWMESH_RUNNER_TIMER_FALLBACK_S": "1"})
    try:
        runner_answers(c)
        run = wait_run(c, start(c, flow_id), timeout=20)
        assert run["status"] == "succeeded", run
        assert seconds(run) >= 1.0
    finally:
        restart(tstack, "runner")
        tstack.start("scheduler")
        tstack.wait_ready()
