"""The ``memory`` scenario: each service process's RSS and PSS idle, after a load, and over a soak.

Runs on a stack of its own (started by ``bench/run.py``, which hands over the PIDs its
``ProcessStack`` started: no process is looked up by name). Memory is read from
``/proc/<pid>/smaps_rollup``: RSS, and PSS (shared pages divided among the processes sharing them).

1. idle: after the stack is ready and has settled;
2. after load: 1,000 webhook deliveries (50 in flight), 100 WebSocket watchers of their runs and
   1,000 reads of the API, every run finished;
3. soak, ``soak_s`` seconds of mixed load: webhook deliveries at ``rate``/s, schedules firing every
   second (6-field cron, seconds first), a WebSocket watcher on every fourth delivered run and a few
   watchers of the whole flow; sampled ten times. The soak is bounded: ``rate * soak_s`` deliveries
   at most, schedules disabled at its end, every task given a deadline. Then every run finished.

Growth is after the soak against after the load (a warm process, pools at their working size): what
a leak would add.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

TARGET = {"idle_rss_mb": 80.0, "growth_percent": 10.0}
SCHEDULES = 5
"""Every-second schedules during the soak."""
SETTLE_S = 5.0
"""Pause before each reading: the last requests' buffers freed, the scheduler's next tick past."""
FLOW = {
    "nodes": [
        {"id": "start", "type": "trigger", "data": {}},
        {"id": "add", "type": "transform", "data": {"output": {"v": "{{ input }}"}}},
    ],
    "edges": [{"id": "e", "source": "start", "target": "add"}],
}
FINAL = ("succeeded", "failed", "cancelled", "timedOut")


def parse_smaps_rollup(text: str) -> dict[str, int]:
    """The ``kB`` fields of ``/proc/<pid>/smaps_rollup`` (``{"Rss": 51200, "Pss": 40960, …}``)."""
    fields = {}
    for line in text.splitlines():
        name, sep, rest = line.partition(":")
        parts = rest.split()
        if sep and len(parts) == 2 and parts[1] == "kB" and parts[0].isdigit():
            fields[name.strip()] = int(parts[0])
    return fields


def read_memory(pid: int, proc: Path = Path("/proc")) -> dict[str, float]:
    """RSS and PSS of process ``pid`` in MB (MiB)."""
    fields = parse_smaps_rollup((proc / str(pid) / "smaps_rollup").read_text())
    return {"rss_mb": round(fields["Rss"] / 1024, 1), "pss_mb": round(fields["Pss"] / 1024, 1)}


def snapshot(pids: dict[str, int]) -> dict[str, dict[str, float]]:
    """RSS and PSS of every service process, by its name in the stack (``runner#2`` a replica)."""
    return {name: read_memory(pid) for name, pid in sorted(pids.items())}


def growth_percent(before: float, after: float) -> float:
    """``after`` against ``before``, in percent."""
    return round((after - before) / before * 100, 1) if before else 0.0


def memory_figures(
    idle: dict[str, dict[str, float]], loaded: dict[str, dict[str, float]], soaked: dict[str, dict[str, float]]
) -> dict[str, dict[str, Any]]:
    """Per service: the three readings, growth over the soak, and whether each target is met."""
    figures = {}
    for name in idle:
        growth = growth_percent(loaded[name]["rss_mb"], soaked[name]["rss_mb"])
        figures[name] = {
            "idle_rss_mb": idle[name]["rss_mb"],
            "idle_pss_mb": idle[name]["pss_mb"],
            "after_load_rss_mb": loaded[name]["rss_mb"],
            "after_load_pss_mb": loaded[name]["pss_mb"],
            "after_soak_rss_mb": soaked[name]["rss_mb"],
            "after_soak_pss_mb": soaked[name]["pss_mb"],
            "growth_rss_percent": growth,
            "growth_pss_percent": growth_percent(loaded[name]["pss_mb"], soaked[name]["pss_mb"]),
            "idle_target_met": idle[name]["rss_mb"] <= TARGET["idle_rss_mb"],
            "growth_target_met": growth <= TARGET["growth_percent"],
        }
    return figures


class Load:
    """The client side of the scenario: one tenant's flows, webhooks, watchers and reads."""

    def __init__(self, base: str, headers: dict[str, str]) -> None:
        self.base = base
        self.api = base + "/api/v1"
        self.token = headers["Authorization"].removeprefix("Bearer ")
        self.http = aiohttp.ClientSession(headers=headers, connector=aiohttp.TCPConnector(limit=200))
        self.watched = 0
        self.watch_errors: list[str] = []

    async def close(self) -> None:
        await self.http.close()

    async def call(self, method: str, path: str, body: Any = None) -> Any:
        async with self.http.request(method, self.api + path, json=body) as r:
            if r.status >= 400:
                raise RuntimeError(f"{method} {path} -> {r.status}: {await r.text()}")
            return await r.json() if r.status != 204 else None

    async def flow(self) -> str:
        flow = await self.call("POST", "/flows", {"name": "bench-memory", "definition": FLOW})
        await self.call("POST", f"/flows/{flow['id']}/publish")
        return str(flow["id"])

    async def deliver(self, url: str, i: int) -> str | None:
        """One webhook delivery; the run's id (None when refused)."""
        async with self.http.post(url, json={"v": i}) as r:
            body = await r.json(content_type=None)
            return str(body["runId"]) if r.status == 202 else None

    async def watch_run(self, run_id: str, timeout: float = 30) -> None:
        """Follow one run on ``/ws/runs/{id}`` until it ends (or ``timeout``)."""
        url = self.base.replace("http", "ws", 1) + f"/ws/runs/{run_id}"
        try:
            async with asyncio.timeout(timeout):
                async with self.http.ws_connect(url, protocols=("flowmesh.v1", f"bearer.{self.token}")) as ws:
                    async for msg in ws:
                        data = msg.json()
                        status = data["run"]["status"] if data["type"] == "snapshot" else None
                        event = data.get("event", {}).get("type", "")
                        if status in FINAL or event in ("run.succeeded", "run.failed"):
                            break
            self.watched += 1
        except (TimeoutError, aiohttp.ClientError) as exc:
            self.watch_errors.append(f"{type(exc).__name__}: {exc}")

    async def watch_flow(self, flow_id: str, stop: asyncio.Event) -> int:
        """Follow every run of a flow on ``/ws/flows/{id}`` until ``stop``; the messages received."""
        url = self.base.replace("http", "ws", 1) + f"/ws/flows/{flow_id}"
        received = 0
        async with self.http.ws_connect(url, protocols=("flowmesh.v1", f"bearer.{self.token}")) as ws:
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await ws.receive(timeout=1)
                    received += 1
        return received

    async def finished(self, flow_id: str, timeout: float = 180) -> int:
        """Wait (bounded) until no run of the flow is queued, running or waiting; how many runs it has."""
        deadline = time.monotonic() + timeout
        while True:
            open_runs = 0
            for status in ("queued", "running", "waiting"):
                open_runs += (await self.call("GET", f"/runs?flowId={flow_id}&status={status}&pageSize=1"))["total"]
            if open_runs == 0 or time.monotonic() > deadline:
                return int((await self.call("GET", f"/runs?flowId={flow_id}&pageSize=1"))["total"])
            await asyncio.sleep(1)


async def load_phase(load: Load, flow_id: str, hook_url: str) -> dict[str, int]:
    """1,000 deliveries (50 in flight), 100 run watchers, 1,000 reads; every run finished."""
    slots = asyncio.Semaphore(50)
    run_ids: list[str] = []

    async def one(i: int) -> None:
        async with slots:
            if (run_id := await load.deliver(hook_url, i)) is not None:
                run_ids.append(run_id)

    await asyncio.gather(*(one(i) for i in range(1000)))
    await asyncio.gather(*(bounded(slots, load.watch_run(r)) for r in run_ids[-100:]))
    paths = ("/flows", f"/runs?flowId={flow_id}", f"/runs/{run_ids[-1]}")
    await asyncio.gather(*(bounded(slots, load.call("GET", paths[i % 3])) for i in range(1000)))
    return {"deliveries": 1000, "accepted": len(run_ids), "runs": await load.finished(flow_id)}


async def bounded(slots: asyncio.Semaphore, work: Any) -> Any:
    async with slots:
        return await work


async def soak_phase(
    load: Load,
    pids: dict[str, int],
    hook_flow: str,
    hook_url: str,
    *,
    soak_s: float,
    rate: float,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """``soak_s`` seconds of webhooks at ``rate``/s, every-second schedules and watchers; samples of memory."""
    cron_flow = await load.flow()
    triggers = [
        await load.call(
            "POST",
            f"/flows/{cron_flow}/triggers",
            {"type": "schedule", "name": f"s{i}", "config": {"cron": "* * * * * *"}},
        )
        for i in range(SCHEDULES)
    ]
    stop = asyncio.Event()
    flow_watchers = [asyncio.create_task(load.watch_flow(f, stop)) for f in (hook_flow, cron_flow, hook_flow)]
    watchers: set[asyncio.Task[None]] = set()
    watch_slots = asyncio.Semaphore(20)
    samples = []
    accepted = 0
    watched_before = load.watched
    total = int(rate * soak_s)
    t0 = time.monotonic()
    next_sample = 0.0
    for i in range(total):
        await asyncio.sleep(max(0.0, t0 + i / rate - time.monotonic()))
        if time.monotonic() - t0 > soak_s + 30:  # deliveries fell behind their pace: the soak still ends
            break
        if (elapsed := time.monotonic() - t0) >= next_sample:
            samples.append({"t_s": round(elapsed), **{n: m["rss_mb"] for n, m in snapshot(pids).items()}})
            log(f"  soak {elapsed:.0f}s: " + ", ".join(f"{n} {v}" for n, v in samples[-1].items() if n != "t_s"))
            next_sample += soak_s / 10
        run_id = await load.deliver(hook_url, i)
        if run_id is not None:
            accepted += 1
            if i % 4 == 0 and not watch_slots.locked():
                task = asyncio.create_task(bounded(watch_slots, load.watch_run(run_id)))
                watchers.add(task)
                task.add_done_callback(watchers.discard)
    for trigger in triggers:
        await load.call("PATCH", f"/triggers/{trigger['id']}", {"enabled": False})
    stop.set()
    flow_messages = sum(await asyncio.gather(*flow_watchers))
    await asyncio.gather(*watchers)
    return {
        "deliveries": total,
        "accepted": accepted,
        # the webhook flow's runs include the load phase's
        "runs_total": {"webhook_flow": await load.finished(hook_flow), "schedules": await load.finished(cron_flow)},
        "run_watchers": load.watched - watched_before,
        "flow_watcher_messages": flow_messages,
        "samples_rss_mb": samples,
    }


async def scenario_memory(
    base: str,
    headers: dict[str, str],
    tenant: str,
    pids: dict[str, int],
    *,
    soak_s: float,
    rate: float,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Idle, after-load and after-soak memory of every service process of a stack started for this."""
    await asyncio.sleep(SETTLE_S)
    idle = snapshot(pids)
    log("memory idle: " + ", ".join(f"{n} {m['rss_mb']}/{m['pss_mb']}" for n, m in idle.items()) + " (RSS/PSS MB)")
    load = Load(base, headers)
    try:
        # the plan with the caps the load reaches; set after the idle reading, as everything else
        await load.call("PUT", f"/admin/tenants/{tenant}/plan", {"plan": "high_frequency"})
        hook_flow = await load.flow()
        hook_url = (await load.call("POST", f"/flows/{hook_flow}/triggers", {"type": "webhook", "name": "m"}))["url"]
        loaded_work = await load_phase(load, hook_flow, hook_url)
        await asyncio.sleep(SETTLE_S)
        loaded = snapshot(pids)
        log("memory after load: " + ", ".join(f"{n} {m['rss_mb']}/{m['pss_mb']}" for n, m in loaded.items()))
        log(f"memory: soak of {soak_s:.0f}s, webhooks at {rate}/s, {SCHEDULES} every-second schedules, watchers")
        soak_work = await soak_phase(load, pids, hook_flow, hook_url, soak_s=soak_s, rate=rate, log=log)
        await asyncio.sleep(SETTLE_S)
        soaked = snapshot(pids)
        watch_errors = load.watch_errors[:5]
    finally:
        await load.close()
    services = memory_figures(idle, loaded, soaked)
    for name, f in services.items():
        log(
            f"  {name}: RSS {f['idle_rss_mb']} -> {f['after_load_rss_mb']} -> {f['after_soak_rss_mb']} MB "
            f"({f['growth_rss_percent']:+}%), PSS {f['idle_pss_mb']} -> {f['after_load_pss_mb']} -> "
            f"{f['after_soak_pss_mb']} MB ({f['growth_pss_percent']:+}%)"
        )
    return {
        "scenario": "memory",
        "soak_s": soak_s,
        "soak_webhooks_per_s": rate,
        "soak_schedules_every_second": SCHEDULES,
        "load": loaded_work,
        "soak": soak_work,
        "watch_errors": watch_errors,
        "services": services,
        "max_idle_rss_mb": max(s["idle_rss_mb"] for s in services.values()),
        "max_growth_rss_percent": max(s["growth_rss_percent"] for s in services.values()),
        "target_met": all(s["idle_target_met"] and s["growth_target_met"] for s in services.values()),
    }
