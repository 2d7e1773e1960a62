"""A cron trigger fires once per due time (guarantee 4 of docs/architecture.md#guarantees), with real processes:
two scheduler replicas, SIGKILL, downtime, timers.

The stack runs on a NATS and a database of its own: a scheduler of another stack on the same
``schedules`` table would be a third replica. Its schedulers use a 3 s misfire threshold and a
1 s claim lease (a killed replica's claims are taken over after at most 1 s: late, not missed).
Every assertion is on what lasts — runs the runner created, messages JetStream stored — not on
publishes, which JetStream may drop as duplicates.
"""

from __future__ import annotations

import asyncio
import itertools
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
from nats.js.api import ConsumerConfig, DeliverPolicy

from flowmesh.contracts import headers
from flowmesh.contracts.ids import format_time
from flowmesh.contracts.streams import TIMERS
from flowmesh.contracts.subjects import SchedulerOp, timer_fired
from stack import ProcessStack, isolated_stack, publish_flow

THRESHOLD_S = 3
SCHEDULERS = ("scheduler", "scheduler#2")
S = timedelta(seconds=1)
FLOW = {
    "nodes": [
        {"id": "start", "type": "trigger", "data": {}},
        {"id": "echo", "type": "transform", "data": {"output": "{{ input }}"}},
    ],
    "edges": [{"id": "e", "source": "start", "target": "echo"}],
}


@pytest.fixture(scope="module")
def sched_stack(infra: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProcessStack]:
    env = {"FLOWMESH_SCHEDULER_MISFIRE_THRESHOLD_S": str(THRESHOLD_S), "FLOWMESH_SCHEDULER_LEASE_S": "1"}
    with isolated_stack(
        infra.database_url, tmp_path_factory.mktemp("schedules"), env=env, replicas={"scheduler": 2}
    ) as s:
        yield s


@pytest.fixture
def client(sched_stack: ProcessStack) -> Iterator[httpx.Client]:
    with sched_stack.client(f"cron-{uuid.uuid4().hex[:8]}") as c:
        yield c


def schedule(c: httpx.Client, flow_id: str, cron: str = "* * * * * *", **config: Any) -> str:
    r = c.post(
        f"/flows/{flow_id}/triggers",
        json={"type": "schedule", "name": "tick", "config": {"cron": cron, **config}},
    )
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def runs(c: httpx.Client, flow_id: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    for page in itertools.count(1):
        r = c.get("/runs", params={"flowId": flow_id, "pageSize": 100, "page": page})
        assert r.status_code == 200, r.text
        found += r.json()["items"]
        if not r.json()["hasMore"]:
            return found


def dues(c: httpx.Client, flow_id: str, trigger_id: str) -> list[datetime]:
    """The due times the runs of one trigger are for, in order (duplicates kept, to be caught)."""
    return sorted(
        datetime.fromisoformat(r["input"]["scheduledAt"]) for r in runs(c, flow_id) if r["triggerId"] == trigger_id
    )


def lateness(c: httpx.Client, flow_id: str, trigger_id: str) -> dict[datetime, float]:
    return {
        datetime.fromisoformat(r["input"]["scheduledAt"]): (
            datetime.fromisoformat(r["input"]["firedAt"]) - datetime.fromisoformat(r["input"]["scheduledAt"])
        ).total_seconds()
        for r in runs(c, flow_id)
        if r["triggerId"] == trigger_id
    }


def wait_for(check: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.2)


def gaps(values: list[datetime]) -> list[tuple[datetime, datetime]]:
    return [(a, b) for a, b in itertools.pairwise(values) if b - a != S]


async def _ping_scheduler(nats_url: str, timeout: float) -> None:
    nc = await nats.connect(nats_url)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                await nc.request(SchedulerOp.PING, b"{}", timeout=0.5)
                return
            except (nats.errors.TimeoutError, nats.errors.NoRespondersError):
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)
    finally:
        await nc.close()


def restart(stack: ProcessStack, name: str) -> None:
    stack.start(name)
    asyncio.run(_ping_scheduler(stack.env["NATS_URL"], 30))


def test_two_replicas_fire_each_due_time_once_even_when_one_is_killed(
    sched_stack: ProcessStack, client: httpx.Client
) -> None:
    flow_id = publish_flow(client, FLOW)
    trigger_id = schedule(client, flow_id)
    wait_for(lambda: len(dues(client, flow_id, trigger_id)) >= 4)
    sched_stack.kill("scheduler", signal.SIGKILL)
    killed = datetime.now(UTC)
    wait_for(lambda: dues(client, flow_id, trigger_id)[-1] >= killed + 4 * S)
    restart(sched_stack, "scheduler")
    restarted = datetime.now(UTC)
    wait_for(lambda: dues(client, flow_id, trigger_id)[-1] >= restarted + 2 * S)
    got = dues(client, flow_id, trigger_id)
    assert [d for d, n in Counter(got).items() if n > 1] == [], "a due time started two runs"
    assert gaps(got) == [], "due times were skipped although no misfire happened"
    assert [r for r in runs(client, flow_id) if r["status"] == "failed"] == []


def test_each_misfire_policy_after_every_replica_was_down(sched_stack: ProcessStack, client: httpx.Client) -> None:
    flow_id = publish_flow(client, FLOW)
    triggers = {p: schedule(client, flow_id, misfire=p) for p in ("skip", "fireOnce", "fireAll")}
    wait_for(lambda: all(len(dues(client, flow_id, t)) >= 2 for t in triggers.values()))
    for name in SCHEDULERS:
        sched_stack.kill(name, signal.SIGTERM)
    stopped = datetime.now(UTC)
    time.sleep(THRESHOLD_S + 4)  # the downtime: several due times pass beyond the misfire threshold
    # read at the end of the downtime: the runner has turned every fire sent before it into a run
    before = {p: dues(client, flow_id, t)[-1] for p, t in triggers.items()}
    # one replica first: its first claim takes the three schedules together, at one instant
    restart(sched_stack, "scheduler")
    up = datetime.now(UTC)
    wait_for(lambda: all(dues(client, flow_id, t)[-1] >= up + 2 * S for t in triggers.values()))
    restart(sched_stack, "scheduler#2")

    after = {p: [d for d in dues(client, flow_id, t) if d > before[p]] for p, t in triggers.items()}
    late = {p: lateness(client, flow_id, t) for p, t in triggers.items()}
    for p, got in after.items():
        assert gaps(got) == [], f"{p}: a due time was skipped after the restart"
        assert len(got) == len(set(got)), f"{p}: a due time started two runs"
    # fireAll: every missed due time, no gap at all
    assert after["fireAll"][0] == before["fireAll"] + S
    assert sum(late["fireAll"][d] >= THRESHOLD_S for d in after["fireAll"]) >= 3
    # skip: none of the missed ones; it resumes with the first due time not yet missed
    assert after["skip"][0] - before["skip"] >= 3 * S
    assert all(late["skip"][d] < THRESHOLD_S + 0.5 for d in after["skip"])
    assert after["skip"][0] > stopped + 2 * S
    # fireOnce: the latest missed due time, once, just before where skip resumed
    assert after["fireOnce"][0] == after["skip"][0] - S
    assert late["fireOnce"][after["fireOnce"][0]] >= THRESHOLD_S
    # from there on it fires as skip does: late by at most the threshold (a due time just inside it,
    # fired at once after the restart, can cross it by the time it is sent: hence the same margin)
    assert all(late["fireOnce"][d] < THRESHOLD_S + 0.5 for d in after["fireOnce"][1:]), late["fireOnce"]


async def _set_timers(nats_url: str, owner: str, due: dict[str, datetime]) -> None:
    nc = await nats.connect(nats_url)
    try:
        for key, at in due.items():
            body = {"owner": owner, "key": key, "dueAt": format_time(at), "payload": {"k": key}}
            reply = await nc.request(
                SchedulerOp.TIMER_SET, json.dumps(body).encode(), timeout=5, headers={headers.SCHEMA: "1"}
            )
            assert "error" not in json.loads(reply.data), reply.data
    finally:
        await nc.close()


async def _stored_timers(nats_url: str, owner: str) -> list[dict[str, Any]]:
    """Every fired-timer message JetStream stored for ``owner``."""
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        sub = await js.pull_subscribe(
            timer_fired(owner),
            stream=TIMERS.name,
            config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL, inactive_threshold=10),
        )
        found: list[dict[str, Any]] = []
        while True:
            try:
                msgs = await sub.fetch(100, timeout=0.5)
            except TimeoutError:  # nats-py raises asyncio's or its own, both TimeoutError
                return found
            found += [json.loads(m.data) for m in msgs]
    finally:
        await nc.close()


def test_timers_survive_every_scheduler_killed_between_set_and_due(sched_stack: ProcessStack) -> None:
    owner = f"e2e{uuid.uuid4().hex[:8]}"
    nats_url = sched_stack.env["NATS_URL"]
    now = datetime.now(UTC)
    due = {
        "claimed": now + timedelta(milliseconds=700),  # likely claimed by a replica when it dies
        "while-down": now + timedelta(seconds=2),  # comes due while no scheduler runs
        "after-restart": now + timedelta(seconds=8),
    }
    asyncio.run(_set_timers(nats_url, owner, due))
    time.sleep(0.4)
    for name in SCHEDULERS:
        sched_stack.kill(name, signal.SIGKILL)
    time.sleep(2.5)
    restart(sched_stack, "scheduler")
    up = datetime.now(UTC)
    restart(sched_stack, "scheduler#2")

    def fired() -> list[dict[str, Any]]:
        return asyncio.run(_stored_timers(nats_url, owner))

    wait_for(lambda: len(fired()) >= 3)
    time.sleep(0.5)
    stored = fired()
    assert Counter(m["key"] for m in stored) == dict.fromkeys(due, 1)
    for m in stored:
        assert datetime.fromisoformat(m["firedAt"]) >= datetime.fromisoformat(format_time(due[m["key"]]))
        assert m["payload"] == {"k": m["key"]}
    after = next(m for m in stored if m["key"] == "after-restart")
    if up < due["after-restart"] - S:  # (a slow restart on a busy machine makes it late, not lost)
        assert datetime.fromisoformat(after["firedAt"]) - due["after-restart"] < timedelta(milliseconds=500)
