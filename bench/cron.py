"""The ``cron`` scenario: 10,000 schedules, each once a minute, fired by two scheduler replicas.

Starts the flows service and the scheduler replicas (real processes, tests/stack.py's
``ProcessStack``) on a NATS and a database of their own — a scheduler of another stack on the
same ``schedules`` table, or consuming the same ``fm.flows.>`` announcements, would be one more
replica. Creates the schedules through the flows service's real API (``fm.rpc.flows.*``: flows,
publish, triggers) and waits until the schedulers hold them all. Schedule ``i`` is
``"{i % 60} * * * * *"`` (6 fields, seconds first): every second of the minute has its share
(~167 fires per second), in four time zones.

Then it listens to ``fm.cmd.runs.start`` for ``duration_s`` and reads each fire's due time from
its idempotency key (``sched:{triggerId}:{dueTime}``): duplicates = a key published more than once,
missing = a due time of the window never published. Lateness = publish time - due time (p50, p99,
max), the publish time being when JetStream stored the start in ``RUN_CMDS`` (its own clock, read
back from the stream afterwards); with the runner consuming the stream, when the subscriber
received it (``subscriber_*`` figures are always given: they add the load generator's own delay).
With ``runner=True`` the runner (and usage) run too, turning every fire into a run on the same
cores; by default the stack is only what fires (the runner's work is measured by the other
scenarios).

Run it alone: ``.venv/bin/python bench/cron.py --duration 180`` (``--help`` for the options).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
import nats
import psutil
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from sqlalchemy.engine import make_url

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from flowmesh.cli.embedded import start_nats, start_postgres
from flowmesh.contracts import headers
from flowmesh.contracts.models.schedules import parse_schedule_key
from flowmesh.contracts.streams import RUN_CMDS
from flowmesh.contracts.subjects import RUN_START_CMD, FlowsOp, SchedulerOp
from stack import ProcessStack, create_database, drop_database

TARGET = {"p99_ms": 100.0, "duplicates": 0}
ZONES = ("UTC", "Europe/Paris", "America/New_York", "Asia/Tokyo")
FLOW = {
    "nodes": [
        {"id": "start", "type": "trigger", "data": {}},
        {"id": "echo", "type": "transform", "data": {"output": "{{ input }}"}},
    ],
    "edges": [{"id": "e", "source": "start", "target": "echo"}],
}


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


class Fires:
    """Every run start published, as (trigger id, due time, arrival), read from the message id only."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, float]] = []

    async def handler(self, msg: Msg) -> None:
        arrived = time.time()
        parsed = parse_schedule_key((msg.headers or {}).get(headers.MSG_ID, ""))
        if parsed is not None:
            self.seen.append((parsed[0], parsed[1], arrived))


async def _call(nc: nats.NATS, subject: str, body: dict[str, Any], tenant: str) -> Any:
    hdrs = {headers.TENANT: tenant, headers.SCHEMA: headers.SCHEMA_VERSION}
    for attempt in range(5):
        try:
            reply = json.loads((await nc.request(subject, json.dumps(body).encode(), timeout=10, headers=hdrs)).data)
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError):
            if attempt == 4:
                raise
            await asyncio.sleep(1)
            continue
        if reply.get("error"):
            raise RuntimeError(f"{subject}: {reply['error']}")
        return reply.get("data")
    raise AssertionError("unreachable")


async def _wait_answering(nc: nats.NATS, subjects: list[str], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    for subject in subjects:
        while True:
            try:
                await nc.request(subject, b"{}", timeout=0.5)
                break
            except (nats.errors.TimeoutError, nats.errors.NoRespondersError):
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)


async def _create_schedules(nc: nats.NATS, count: int, flows: int, tenants: int, in_flight: int) -> list[str]:
    """``flows`` published flows over ``tenants`` tenants, ``count`` schedule triggers spread over them."""
    run_id = uuid.uuid4().hex[:6]
    flow_ids: list[tuple[str, str]] = []
    for f in range(flows):
        tenant = f"cron-{run_id}-{f % tenants}"
        flow = await _call(nc, FlowsOp.CREATE, {"name": f"cron-{f}", "definition": FLOW}, tenant)
        await _call(nc, FlowsOp.PUBLISH, {"flowId": flow["id"]}, tenant)
        flow_ids.append((tenant, flow["id"]))
    slots = asyncio.Semaphore(in_flight)
    created: list[str] = []

    async def one(i: int) -> None:
        tenant, flow_id = flow_ids[i % flows]
        config = {"cron": f"{i % 60} * * * * *", "timezone": ZONES[i % len(ZONES)]}
        body = {"flowId": flow_id, "trigger": {"type": "schedule", "name": f"s{i}", "config": config}}
        async with slots:
            trigger = await _call(nc, FlowsOp.TRIGGER_CREATE, body, tenant)
        created.append(trigger["id"])

    await asyncio.gather(*(one(i) for i in range(count)))
    return created


async def _armed(database_url: str) -> int:
    url = make_url(database_url).set(drivername="postgresql").render_as_string(hide_password=False)
    conn = await asyncpg.connect(url)
    try:
        found = await conn.fetchval("SELECT count(*) FROM scheduler.schedules WHERE next_due_at IS NOT NULL")
        return int(found)
    except asyncpg.UndefinedTableError:
        return 0
    finally:
        await conn.close()


async def _stored_lateness(nc: nats.NATS, start: int, end: int) -> list[float]:
    """Lateness by JetStream's own clock: when ``RUN_CMDS`` stored each fire of the window.

    Only when nothing consumes the work-queue stream (no runner): its messages are still there
    (read here, they are acknowledged, so the stream is left empty).
    """
    js = nc.jetstream()
    last = (await js.stream_info(RUN_CMDS.name)).state.last_seq
    sub = await js.pull_subscribe(
        RUN_START_CMD,
        stream=RUN_CMDS.name,
        config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, deliver_policy=DeliverPolicy.ALL, inactive_threshold=30),
    )
    found: list[float] = []
    idle = 0
    try:
        while idle < 3:
            try:
                msgs = await sub.fetch(256, timeout=2)
            except TimeoutError:
                idle += 1
                continue
            idle = 0
            for m in msgs:
                parsed = parse_schedule_key((m.headers or {}).get(headers.MSG_ID, ""))
                if parsed is not None:
                    due = datetime.fromisoformat(parsed[1]).timestamp()
                    if start <= due < end:
                        found.append((m.metadata.timestamp.timestamp() - due) * 1000)
            await asyncio.gather(*(m.ack() for m in msgs))
            if msgs[-1].metadata.sequence.stream >= last:
                break
        return found
    finally:
        await sub.unsubscribe()


async def _runs_made(database_url: str, start: int, end: int, expected: int) -> dict[str, int]:
    """With the runner: runs created for the window's due times, and how many due times have more than one.

    Waits (bounded) for the runner to work through the window's starts.
    """
    url = make_url(database_url).set(drivername="postgresql").render_as_string(hide_password=False)
    conn = await asyncpg.connect(url)
    query = (
        "SELECT count(*) AS runs, count(DISTINCT idempotency_key) AS keys FROM runner.runs "
        "WHERE trigger_type = 'schedule' AND (input->>'scheduledAt')::timestamptz >= to_timestamp($1) "
        "AND (input->>'scheduledAt')::timestamptz < to_timestamp($2)"
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            row = await conn.fetchrow(query, float(start), float(end))
            if row["keys"] >= expected or time.monotonic() > deadline:
                runs, keys = int(row["runs"]), int(row["keys"])
                return {"runs": runs, "due_times_with_runs": keys, "extra_runs": runs - keys}
            await asyncio.sleep(1)
    finally:
        await conn.close()


def _figure(values: list[float], q: float) -> float | None:
    """The ``q`` quantile of sorted ``values`` in ms, rounded (None: no values)."""
    if not values:
        return None
    return round(values[min(len(values) - 1, int(len(values) * q))], 2)


async def scenario_cron(
    nats_url: str | None = None,
    database_url: str | None = None,
    *,
    schedules: int = 10_000,
    duration_s: float = 180.0,
    replicas: int = 2,
    flows: int = 100,
    tenants: int = 10,
    runner: bool = False,
    workdir: Path | None = None,
) -> dict[str, Any]:
    """Fire lateness and duplicates of ``schedules`` once-a-minute schedules over ``duration_s``.

    Args:
        nats_url: a NATS with JetStream no other Flowmesh stack uses (None: start an embedded one).
        database_url: a PostgreSQL server; the scenario creates a database of its own on it (None:
            start an embedded server).
        schedules: how many schedule triggers (each fires once a minute).
        duration_s: how long fires are measured (after setup).
        replicas: scheduler processes.
        flows: flows the triggers are spread over (across ``tenants`` tenants).
        tenants: tenants the flows belong to.
        runner: also run the runner and usage services, so every fire becomes a run.
        workdir: where the processes' logs go (None: a temporary directory).
    """
    async with contextlib.AsyncExitStack() as cleanup:
        work = workdir or Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="flowmesh-cron-")))
        nats_url, own_db = await _servers(cleanup, work, nats_url, database_url)
        stack = _start_stack(cleanup, nats_url, own_db, work, replicas=replicas, runner=runner)
        nc = await nats.connect(nats_url)
        try:
            await _wait_answering(nc, [FlowsOp.PING, SchedulerOp.PING])
            log(f"cron: creating {schedules} schedules over {flows} flows ({replicas} scheduler replicas)")
            setup_s = await _set_up(nc, own_db, schedules, flows, tenants, duration_s)
            window = await _measure(nc, stack, duration_s)
            stored = sorted(await _stored_lateness(nc, window.start, window.end)) if not runner else []
            expected = _expected_fires(schedules, window)
            made = await _runs_made(own_db, window.start, window.end, expected) if runner else None
        finally:
            await nc.close()
    return {
        "scenario": "cron",
        "schedules": schedules,
        "scheduler_replicas": replicas,
        "runner": runner,
        "duration_s": window.end - window.start,
        "setup_s": round(setup_s, 1),
        **_fire_figures(window, expected, stored),
        **({"runner_runs": made} if made is not None else {}),
        "scheduler_cpu_percent": window.cpu_percent,
    }


async def _servers(
    cleanup: contextlib.AsyncExitStack, work: Path, nats_url: str | None, database_url: str | None
) -> tuple[str, str]:
    """The NATS URL (an embedded server when None) and a database of the scenario's own, dropped on cleanup."""
    if nats_url is None:
        server = start_nats(work / "nats")
        cleanup.callback(server.stop)
        nats_url = server.url
    if database_url is None:
        pg = start_postgres(work / "postgres")
        cleanup.callback(pg.stop)
        database_url = pg.url
    db_name = f"cron_{uuid.uuid4().hex[:8]}"
    own_db = await create_database(database_url, db_name)
    cleanup.push_async_callback(drop_database, database_url, db_name)
    return nats_url, own_db


def _start_stack(
    cleanup: contextlib.AsyncExitStack, nats_url: str, own_db: str, work: Path, *, replicas: int, runner: bool
) -> ProcessStack:
    """The flows service and ``replicas`` schedulers (with ``runner``, the runner and usage too), stopped on cleanup."""
    services = ("flows", "scheduler", *(("usage", "runner") if runner else ()))
    stack = ProcessStack(
        nats_url,
        own_db,
        work,
        env={"FLOWMESH_LOG_LEVEL": "WARNING"},
        services=services,
        replicas={"scheduler": replicas},
    )
    stack.start_all()
    cleanup.callback(stack.stop_all)
    return stack


async def _set_up(nc: nats.NATS, own_db: str, schedules: int, flows: int, tenants: int, duration_s: float) -> float:
    """Create the schedules and wait until the schedulers hold them all; the seconds it took."""
    t0 = time.perf_counter()
    await _create_schedules(nc, schedules, flows, tenants, in_flight=32)
    created_s = time.perf_counter() - t0
    while (armed := await _armed(own_db)) < schedules:
        if time.perf_counter() - t0 > 600:
            raise TimeoutError(f"only {armed} of {schedules} schedules armed after 600 s")
        await asyncio.sleep(0.5)
    setup_s = time.perf_counter() - t0
    log(f"cron: created in {created_s:.1f}s, all armed after {setup_s:.1f}s; measuring {duration_s:.0f}s")
    return setup_s


@dataclass(frozen=True)
class Window:
    """What was measured: the fires seen for due times from ``start`` to ``end`` (epoch seconds, end excluded)."""

    start: int
    end: int
    fires: Fires
    cpu_percent: dict[str, float]
    """CPU use of each scheduler replica over the window, in percent of one core."""


async def _measure(nc: nats.NATS, stack: ProcessStack, duration_s: float) -> Window:
    """Listen to run starts over ``duration_s`` whole seconds from 2 s from now, and the schedulers' CPU."""
    fires = Fires()
    sub = await nc.subscribe(RUN_START_CMD, cb=fires.handler)
    start = math.ceil(time.time()) + 2
    end = start + int(duration_s)
    procs = {name: psutil.Process(p.pid) for name, p in stack.procs.items() if name.startswith("scheduler")}
    await asyncio.sleep(max(0.0, start - time.time()))
    cpu0 = {name: p.cpu_times() for name, p in procs.items()}
    await asyncio.sleep(max(0.0, end - time.time()))
    cpu1 = {name: p.cpu_times() for name, p in procs.items()}
    await asyncio.sleep(2.0)  # stragglers of the window's last second
    await sub.unsubscribe()
    cpu = {name: round((sum(cpu1[name][:2]) - sum(cpu0[name][:2])) / (end - start) * 100, 1) for name in cpu0}
    return Window(start=start, end=end, fires=fires, cpu_percent=cpu)


def _expected_fires(schedules: int, window: Window) -> int:
    """How many fires are due in the window: schedule ``i`` fires at second ``i % 60`` of each minute."""
    per_second = Counter(i % 60 for i in range(schedules))
    return sum(per_second[t % 60] for t in range(window.start, window.end))


def _fire_figures(window: Window, expected: int, stored: list[float]) -> dict[str, Any]:
    """Fires, misses, duplicates and lateness of the window's due times."""
    start, end = window.start, window.end
    in_window = [
        (trigger, due, arrived)
        for trigger, due, arrived in window.fires.seen
        if start <= (at := datetime.fromisoformat(due).timestamp()) < end and at == int(at)
    ]
    keys = Counter((trigger, due) for trigger, due, _ in in_window)
    first: dict[tuple[str, str], float] = {}
    for trigger, due, arrived in in_window:
        first.setdefault((trigger, due), arrived)
    lateness = sorted((arrived - datetime.fromisoformat(due).timestamp()) * 1000 for (_, due), arrived in first.items())
    return {
        "expected_fires": expected,
        "fired": len(keys),
        "missing": expected - len(keys),
        "duplicates": sum(n - 1 for n in keys.values()),
        # publish time as JetStream stored it (without a runner), else as a subscriber received it
        "p50_ms": _figure(stored or lateness, 0.5),
        "p99_ms": _figure(stored or lateness, 0.99),
        "max_ms": _figure(stored or lateness, 1.0),
        "measured_at": "stream" if stored else "subscriber",
        "subscriber_p50_ms": _figure(lateness, 0.5),
        "subscriber_p99_ms": _figure(lateness, 0.99),
        "fires_per_s": round(len(keys) / (end - start), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nats", help="NATS URL no other stack uses (default: start an embedded server)")
    parser.add_argument("--database", help="PostgreSQL URL (default: start an embedded server)")
    parser.add_argument("--schedules", type=int, default=10_000)
    parser.add_argument("--duration", type=float, default=180.0, help="seconds measured")
    parser.add_argument("--replicas", type=int, default=2, help="scheduler processes")
    parser.add_argument("--flows", type=int, default=100)
    parser.add_argument("--runner", action="store_true", help="also run the runner: every fire becomes a run")
    parser.add_argument("--out", type=Path, help="write the result as JSON here")
    args = parser.parse_args()
    result = asyncio.run(
        scenario_cron(
            args.nats,
            args.database,
            schedules=args.schedules,
            duration_s=args.duration,
            replicas=args.replicas,
            flows=args.flows,
            runner=args.runner,
        )
    )
    result["targets"] = TARGET
    result["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version()}
    result["when"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
