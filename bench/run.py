"""``make bench``: Flowmesh's speed on this machine, against the targets each result records (``targets``).

Starts the whole stack on embedded NATS and PostgreSQL (or uses ``--base``/``--nats`` for a running
one), then runs each scenario, prints its figures and writes ``bench/results/<scenario>.json``.
Completion is observed from the run events on NATS (one subscription), not by polling every run:
the load generator shares the machine's cores with the stack.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import nats
from nats.aio.msg import Msg

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import api_reads
import io_steps
import memory_soak
from cron import scenario_cron
from io_steps import Upstream, backends, io_throughput_result, scenario_io_chain
from lean_http import LeanClient
from live import scenario_live
from scale import scenario_scale

from flowmesh.cli.embedded import start_nats, start_postgres
from flowmesh.contracts.subjects import tenant_token
from otlp import OtlpReceiver
from stack import ProcessStack, chain, token

RESULTS = Path(__file__).parent / "results"
SETUP: dict[str, Any] = {}
SEEN: dict[str, dict[str, Any]] = {}
"""Results of this invocation by scenario (for ``--tracing``'s side-by-side figures)."""
TRACED = ("chain", "throughput")
"""The scenarios ``--tracing`` measures twice: without tracing, then exporting every span."""
TARGETS = {
    "chain": {"p50_ms": 50.0},
    "throughput": {"steps_per_s": 1500.0},
    "webhooks": {"runs_per_s": 500.0},
    "live": {"p99_ms": 100.0},
    "cron": {"p99_ms": 100.0, "duplicates": 0},
    "io-chain": {"overhead_per_step_ms": 2.0},
    "io-throughput": {"steps_per_s": 2000.0},
    "publish-chain": {"overhead_per_step_ms": 2.0},
    "publish-throughput": {"steps_per_s": 2000.0},
    "api": api_reads.TARGET,
    "memory": memory_soak.TARGET,
}
IO = {"io-chain": "http", "io-throughput": "http", "publish-chain": "publish", "publish-throughput": "publish"}
"""The scenarios of steps that do I/O (:mod:`io_steps`), and their step type."""
NAMED_ONLY = ("api", "memory", "publish-chain", "publish-throughput")
"""Scenarios run only when named: the api one takes over a minute, the memory one a stack and ten minutes."""
REFERENCE = {
    "chain": {"temporal_dev_p50_ms": 2056, "dbos_p50_ms": 219},
    "throughput": {"temporal_dev_steps_per_s": 39, "dbos_steps_per_s": 161},
    "webhooks": {"n8n_docs_runs_per_s": 220},
    "live": {},
    "cron": {},
    "io-throughput": {"restate_durable_steps_per_s_same_machine": 1886},
}
HOOK_FLOW = {
    "nodes": [
        {"id": "start", "type": "trigger", "data": {}},
        {"id": "add", "type": "transform", "data": {"output": {"v": "{{ input.body.v + 1 }}"}}},
    ],
    "edges": [{"id": "e", "source": "start", "target": "add"}],
}


def log(msg: str) -> None:
    print(f"[bench] {msg}", flush=True)


FINAL_EVENTS = ("run.succeeded", "run.failed", "run.cancelled", "run.timedOut")


class Finished:
    """Final run events of one tenant, seen on NATS as they are published."""

    def __init__(self) -> None:
        self.times: dict[str, float] = {}
        self.status: dict[str, str] = {}
        self.waiters: dict[str, asyncio.Future[float]] = {}
        self.on_finish: Callable[[str], None] | None = None

    @contextlib.asynccontextmanager
    async def watching(self, nc: nats.NATS, tenant: str, flow_id: str) -> AsyncIterator[Finished]:
        """Hear the final events of ``flow_id``'s runs for the life of the block (only those: the
        others are messages the load generator would decode for nothing, on the stack's cores)."""
        prefix = f"fm.runs.{tenant_token(tenant)}.{flow_id}.*."
        subs = [await nc.subscribe(prefix + final, cb=self.handler) for final in FINAL_EVENTS]
        try:
            yield self
        finally:
            for sub in subs:
                await sub.unsubscribe()

    async def handler(self, msg: Msg) -> None:
        event = json.loads(msg.data)
        if event["type"] not in FINAL_EVENTS:
            return
        run_id = event["runId"]
        if run_id in self.times:
            return
        self.times[run_id] = time.perf_counter()
        self.status[run_id] = event["type"].removeprefix("run.")
        waiter = self.waiters.pop(run_id, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(self.times[run_id])
        if self.on_finish is not None:
            self.on_finish(run_id)

    async def wait(self, run_id: str, timeout: float = 60) -> float:
        if run_id in self.times:
            return self.times[run_id]
        fut = self.waiters[run_id] = asyncio.get_running_loop().create_future()
        return await asyncio.wait_for(fut, timeout)


class Api:
    """A thin JSON client on aiohttp (sets TCP_NODELAY, and costs the shared CPU little)."""

    def __init__(self, base: str, headers: dict[str, str]) -> None:
        self.base = base
        self.session = aiohttp.ClientSession(headers=headers, connector=aiohttp.TCPConnector(limit=200))

    async def post(self, path: str, body: Any = None) -> Any:
        async with self.session.post(self.base + path, json=body) as r:
            if r.status >= 400:
                raise RuntimeError(f"POST {path} -> {r.status}: {await r.text()}")
            return await r.json()

    async def put(self, path: str, body: Any = None) -> Any:
        async with self.session.put(self.base + path, json=body) as r:
            if r.status >= 400:
                raise RuntimeError(f"PUT {path} -> {r.status}: {await r.text()}")
            return await r.json()

    async def close(self) -> None:
        await self.session.close()


async def publish(c: Api, definition: dict[str, Any]) -> str:
    flow = await c.post("/flows", {"name": f"bench-{uuid.uuid4().hex[:6]}", "definition": definition})
    await c.post(f"/flows/{flow['id']}/publish")
    return str(flow["id"])


async def scenario_chain(c: Api, nc: nats.NATS, tenant: str, runs: int) -> dict[str, Any]:
    """One run at a time of 40 sequential transforms: HTTP start to final state."""
    flow_id = await publish(c, chain(40))
    latencies = []
    async with Finished().watching(nc, tenant, flow_id) as finished:
        for i in range(runs + 5):
            t0 = time.perf_counter()
            run = await c.post(f"/flows/{flow_id}/runs", {"input": {"v": i}})
            done = await finished.wait(run["id"])
            if i >= 5:  # warm-up: caches, connections
                latencies.append((done - t0) * 1000)
            if finished.status[run["id"]] != "succeeded":
                raise RuntimeError(f"run {run['id']} {finished.status[run['id']]}")
    latencies.sort()
    return {
        "scenario": "chain",
        "runs": runs,
        "steps_per_run": 40,
        "p50_ms": round(statistics.median(latencies), 2),
        "p99_ms": round(latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))], 2),
        "mean_ms": round(statistics.fmean(latencies), 2),
        "max_ms": round(latencies[-1], 2),
    }


async def scenario_throughput(
    c: Api, nc: nats.NATS, tenant: str, runs: int, in_flight: int, steps: int
) -> dict[str, Any]:
    """``runs`` runs of ``steps`` transforms, ``in_flight`` at once."""
    flow_id = await publish(c, chain(steps))
    # warm-up at the measured concurrency, not measured: connection pools at their working size,
    # caches and the flow's version, as in a running system
    await drive(c, nc, tenant, flow_id, 2 * in_flight, in_flight)
    elapsed, finished = await drive(c, nc, tenant, flow_id, runs, in_flight)
    ok = sum(1 for s in finished.status.values() if s == "succeeded")
    return {
        "scenario": "throughput",
        "runs": runs,
        "steps_per_run": steps,
        "in_flight": in_flight,
        "elapsed_s": round(elapsed, 3),
        "succeeded": ok,
        "steps_per_s": round(runs * steps / elapsed, 1),
        "runs_per_s": round(runs / elapsed, 1),
    }


async def drive(c: Api, nc: nats.NATS, tenant: str, flow_id: str, runs: int, in_flight: int) -> tuple[float, Finished]:
    """Start ``runs`` runs, ``in_flight`` at a time; the seconds until the last one finished."""
    finished = Finished()
    slots = asyncio.Semaphore(in_flight)
    done_all = asyncio.Event()

    def on_finish(_: str) -> None:
        slots.release()
        if len(finished.times) >= runs:
            done_all.set()

    finished.on_finish = on_finish

    async def one(i: int) -> None:
        await c.post(f"/flows/{flow_id}/runs", {"input": {"v": i}})

    async with finished.watching(nc, tenant, flow_id):
        t0 = time.perf_counter()
        tasks = []
        for i in range(runs):
            await slots.acquire()
            tasks.append(asyncio.create_task(one(i)))
        await asyncio.gather(*tasks)
        await asyncio.wait_for(done_all.wait(), 300)
        return time.perf_counter() - t0, finished


async def scenario_webhooks(c: Api, nc: nats.NATS, tenant: str, deliveries: int, in_flight: int) -> dict[str, Any]:
    """``deliveries`` POSTs to an unsigned webhook of a 2-step flow, ``in_flight`` at once."""
    flow_id = await publish(c, HOOK_FLOW)
    trigger = await c.post(f"/flows/{flow_id}/triggers", {"type": "webhook", "name": "bench"})
    url = trigger["url"]
    # warm-up, not measured: connections at their working size, the token lookup cached
    await hammer(c, nc, tenant, flow_id, url, 2 * in_flight, in_flight)
    r = await hammer(c, nc, tenant, flow_id, url, deliveries, in_flight)
    return {
        "scenario": "webhooks",
        "deliveries": deliveries,
        "in_flight": in_flight,
        "accepted": r["accepted"],
        "refused": r["refused"],
        "succeeded": r["succeeded"],
        "failed": r["failed"],
        "lost": r["accepted"] - r["succeeded"] - r["failed"],
        "accept_elapsed_s": round(r["accept_s"], 3),
        "complete_elapsed_s": round(r["complete_s"], 3),
        "accepted_runs_per_s": round(r["accepted"] / r["accept_s"], 1),
        "runs_per_s": round(r["succeeded"] / r["complete_s"], 1),
        "accept_p50_ms": r["p50_ms"],
        "accept_p99_ms": r["p99_ms"],
        "first_refusal": r["first_refusal"],
    }


async def hammer(
    c: Api, nc: nats.NATS, tenant: str, flow_id: str, url: str, deliveries: int, in_flight: int
) -> dict[str, Any]:
    """POST ``deliveries`` webhooks, ``in_flight`` at a time; count them accepted and their runs finished."""
    finished = Finished()
    slots = asyncio.Semaphore(in_flight)
    accepted: set[str] = set()
    refused: list[str] = []
    latencies: list[float] = []
    done_all = asyncio.Event()

    def on_finish(_: str) -> None:
        if accepted_all.is_set() and accepted <= finished.times.keys():
            done_all.set()

    accepted_all = asyncio.Event()
    finished.on_finish = on_finish

    sender = LeanClient(url, size=in_flight)
    path = urlsplit(url).path

    async def one(i: int) -> None:
        try:
            t = time.perf_counter()
            status, raw = await sender.post(path, json.dumps({"v": i, "source": "bench"}).encode())
            body = json.loads(raw)
            if status == 202:
                accepted.add(body["runId"])
                latencies.append((time.perf_counter() - t) * 1000)
            else:
                refused.append(f"{status}: {body}")
        finally:
            slots.release()

    async with finished.watching(nc, tenant, flow_id):
        t0 = time.perf_counter()
        try:
            tasks = []
            for i in range(deliveries):
                await slots.acquire()
                tasks.append(asyncio.create_task(one(i)))
            await asyncio.gather(*tasks)
            accept_s = time.perf_counter() - t0
            accepted_all.set()
            on_finish("")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done_all.wait(), 120)
        finally:
            await sender.close()
    return _delivered(finished, accepted, refused, latencies, started=t0, accept_s=accept_s)


def _delivered(
    finished: Finished,
    accepted: set[str],
    refused: list[str],
    latencies: list[float],
    *,
    started: float,
    accept_s: float,
) -> dict[str, Any]:
    """:func:`hammer`'s figures: deliveries accepted and refused, their runs' outcomes, the times."""
    ours = [finished.times[r] for r in accepted if r in finished.times]
    latencies.sort()
    return {
        "accepted": len(accepted),
        "refused": len(refused),
        "first_refusal": refused[0] if refused else None,
        "succeeded": sum(1 for r in accepted if finished.status.get(r) == "succeeded"),
        "failed": sum(1 for r in accepted if finished.status.get(r) in ("failed", "cancelled", "timedOut")),
        "accept_s": accept_s,
        "complete_s": (max(ours) if ours else time.perf_counter()) - started,
        "p50_ms": round(statistics.median(latencies), 2) if latencies else None,
        "p99_ms": round(latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))], 2) if latencies else None,
    }


def report(result: dict[str, Any]) -> None:
    name = result["scenario"]
    result["targets"] = TARGETS.get(name, {})
    result["reference"] = REFERENCE.get(name, {})
    result["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version()}
    result["setup"] = SETUP
    result["when"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    RESULTS.mkdir(parents=True, exist_ok=True)
    suffix = "-tracing" if SETUP.get("tracing") else ""
    (RESULTS / f"{name}{suffix}.json").write_text(json.dumps(result, indent=2) + "\n")
    SEEN[name] = result
    shown = ("succeeded", "accepted", "lost", "refused", "fired", "missing", "duplicates")
    figures = ", ".join(f"{k}={v}" for k, v in result.items() if k.endswith(("_ms", "_s")) or k in shown)
    log(f"{name}: {figures}  (target {result['targets']})")


async def main_async(args: argparse.Namespace) -> None:
    tenant = f"bench-{uuid.uuid4().hex[:6]}"
    headers = {"Authorization": "Bearer " + token(tenant, secret=args.secret, role="admin")}
    c = Api(args.base + "/api/v1", headers)
    try:
        # the plan with the caps a benchmark reaches (1,000 watchers on one token, unlimited webhooks)
        await c.put(f"/admin/tenants/{tenant}/plan", {"plan": "high_frequency"})
        nc = await nats.connect(args.nats)
        try:
            if "chain" in args.scenarios:
                log("chain: 40 sequential transforms, one run at a time")
                report(await scenario_chain(c, nc, tenant, args.chain_runs))
            if "throughput" in args.scenarios:
                log(
                    f"throughput: {args.runs} runs x {args.steps} steps, {args.in_flight} in flight, "
                    f"{args.repeat} rounds"
                )
                rounds = []
                for i in range(args.repeat):
                    rounds.append(await scenario_throughput(c, nc, tenant, args.runs, args.in_flight, args.steps))
                    log(f"  round {i + 1}: {rounds[-1]['steps_per_s']} steps/s")
                # the median round: one noisy round on a shared machine neither makes nor breaks the figure
                result = sorted(rounds, key=lambda r: r["steps_per_s"])[len(rounds) // 2]
                result["rounds_steps_per_s"] = [r["steps_per_s"] for r in rounds]
                report(result)
            if "webhooks" in args.scenarios:
                log(
                    f"webhooks: {args.hooks} webhook deliveries (2-step flow), {args.in_flight} in flight, "
                    f"{args.rounds} rounds"
                )
                rounds = []
                for i in range(args.rounds):
                    rounds.append(await scenario_webhooks(c, nc, tenant, args.hooks, args.in_flight))
                    log(f"  round {i + 1}: {rounds[-1]['runs_per_s']} runs/s, lost {rounds[-1]['lost']}")
                result = sorted(rounds, key=lambda r: r["runs_per_s"])[len(rounds) // 2]
                result["rounds_runs_per_s"] = [r["runs_per_s"] for r in rounds]
                result["lost_total"] = sum(r["lost"] for r in rounds)
                report(result)
            if "live" in args.scenarios:
                log(f"live: {args.watchers} WebSocket watchers of one run, {args.rounds} rounds")
                rounds = []
                for i in range(args.rounds):
                    rounds.append(await scenario_live(args.base, headers, args.watchers))
                    log(f"  round {i + 1}: p50 {rounds[-1]['p50_ms']} ms, p99 {rounds[-1]['p99_ms']} ms")
                result = sorted(rounds, key=lambda r: r["p99_ms"] or 0.0)[len(rounds) // 2]
                result["rounds_p99_ms"] = [r["p99_ms"] for r in rounds]
                report(result)
            if set(args.scenarios) & IO.keys():
                await io_scenarios(c, nc, tenant, args)
            if "api" in args.scenarios:
                await api_scenario(c, nc, tenant, headers, args)
        finally:
            await nc.close()
    finally:
        await c.close()


async def api_scenario(c: Api, nc: nats.NATS, tenant: str, headers: dict[str, str], args: argparse.Namespace) -> None:
    """The api scenario: reads at a fixed rate from an outside load generator, after seeding the tenant."""
    log(f"api: 3 read endpoints at {args.api_rate} req/s, {args.api_duration:.0f}s each (loadtest, open model)")

    async def start_and_wait(flow_id: str, i: int) -> tuple[str, str]:
        async with Finished().watching(nc, tenant, flow_id) as finished:
            run = await c.post(f"/flows/{flow_id}/runs", {"input": {"v": i}})
            await finished.wait(run["id"])
            return run["id"], finished.status[run["id"]]

    report(
        await api_reads.scenario_api(
            args.base,
            headers,
            lambda d: publish(c, d),
            start_and_wait,
            rate=args.api_rate,
            duration_s=args.api_duration,
            warmup_s=args.api_warmup,
            log=log,
        )
    )


async def settle(nc: nats.NATS, timeout: float = 180) -> float:
    """Wait (bounded) until every durable consumer of every stream has caught up; the seconds it took.

    A scenario that loads the stack leaves work behind it (the usage service metering thousands of
    run events, the outbox relay): a latency measured meanwhile shares the CPUs with that backlog.
    """
    js = nc.jetstream()
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        behind = 0
        for stream in await js.streams_info():
            for consumer in await js.consumers_info(stream.config.name):
                behind += (consumer.num_pending or 0) + (consumer.num_ack_pending or 0)
        if not behind:
            break
        await asyncio.sleep(0.2)
    return time.monotonic() - t0


async def io_scenarios(c: Api, nc: nats.NATS, tenant: str, args: argparse.Namespace) -> None:
    """The scenarios of ``http`` and ``publish`` steps, against an upstream of their own."""
    upstream = Upstream()
    try:
        await upstream.ready()
        for name, kind in IO.items():
            if name not in args.scenarios:
                continue
            target = upstream if kind == "http" else None
            if name.endswith("-chain"):
                log(f"{name}: {io_steps.STEPS} {kind} steps in a chain, one run at a time")
                waited = await settle(nc)
                log(f"{name}: every durable consumer caught up ({waited:.1f}s)")

                async def start_and_wait(flow_id: str, i: int) -> tuple[float, str]:
                    async with Finished().watching(nc, tenant, flow_id) as finished:
                        t0 = time.perf_counter()
                        run = await c.post(f"/flows/{flow_id}/runs", {"input": {"v": i}})
                        done = await finished.wait(run["id"])
                        return done - t0, finished.status[run["id"]]

                report(
                    await scenario_io_chain(
                        kind, lambda d: publish(c, d), start_and_wait, args.chain_runs, target, args.database
                    )
                )
            else:
                log(f"{name}: {args.io_runs} runs x {io_steps.STEPS} {kind} steps, {args.in_flight} in flight")
                flow_id = await publish(c, io_steps.io_flow(kind, upstream.url))
                await drive(c, nc, tenant, flow_id, 2 * args.in_flight, args.in_flight)  # warm-up
                rounds = []
                for i in range(args.rounds):
                    before = await backends(args.database)
                    elapsed, finished = await drive(c, nc, tenant, flow_id, args.io_runs, args.in_flight)
                    ok = sum(1 for st in finished.status.values() if st == "succeeded")
                    after = await backends(args.database)
                    rounds.append(io_throughput_result(kind, args.io_runs, args.in_flight, elapsed, ok, before, after))
                    log(f"  round {i + 1}: {rounds[-1]['steps_per_s']} steps/s, backends {before} -> {after}")
                result = sorted(rounds, key=lambda r: r["steps_per_s"])[len(rounds) // 2]
                result["rounds_steps_per_s"] = [r["steps_per_s"] for r in rounds]
                report(result)
    finally:
        upstream.close()


def main() -> None:
    parser = _parser()
    args = parser.parse_args()
    args.scenarios = args.scenarios or [s for s in TARGETS if s not in NAMED_ONLY]
    SETUP.update({"runner_replicas": args.runners if not args.base else "external", "client": "aiohttp"})
    if unknown := set(args.scenarios) - set(TARGETS) - {"scale"}:
        parser.error(f"unknown scenario(s) {', '.join(sorted(unknown))}; choose from {', '.join(TARGETS)}, scale")
    if args.serve:
        serve(args)
        return
    if args.base and not args.nats:
        parser.error("--nats is needed with --base (completion is observed on NATS)")
    if args.tracing:
        run_traced(args)
        return
    if "memory" in args.scenarios and args.base:
        parser.error("the memory scenario reads the processes of a stack it starts: leave out --base")
    if set(args.scenarios) - {"cron", "scale", "memory"}:
        run_on_stack(args)
    if "memory" in args.scenarios:
        run_memory(args)
    if "cron" in args.scenarios:
        run_cron(args)
    if "scale" in args.scenarios:
        run_scale(args)


def _parser() -> argparse.ArgumentParser:
    """The command line: which scenarios, against what, and how much of each."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "scenarios",
        nargs="*",
        metavar="SCENARIO",
        help="chain, throughput, webhooks, live, cron, io-chain, io-throughput (the default: these), "
        "publish-chain, publish-throughput, api, memory; scale (on make cluster's shape) only when named",
    )
    parser.add_argument("--base", help="gateway URL of a running stack (default: start one)")
    parser.add_argument("--nats", help="NATS URL of that stack (needed with --base)")
    parser.add_argument("--database", help="PostgreSQL URL of that stack (to count its backends; optional)")
    parser.add_argument(
        "--secret",
        default=os.environ.get("FLOWMESH_JWT_SECRET", "bench-secret-" + "x" * 40),
        help="HS256 secret of that stack's gateway",
    )
    parser.add_argument("--chain-runs", type=int, default=100, help="measured runs of the chain scenario")
    parser.add_argument("--runs", type=int, default=200, help="runs of the throughput scenario")
    parser.add_argument("--steps", type=int, default=10, help="steps per run of the throughput scenario")
    parser.add_argument(
        "--in-flight", type=int, default=50, help="runs (deliveries) in flight in the throughput (webhooks) scenario"
    )
    parser.add_argument("--io-runs", type=int, default=1000, help="runs per round of io-throughput, publish-throughput")
    parser.add_argument("--hooks", type=int, default=1000, help="deliveries of the webhooks scenario")
    parser.add_argument("--watchers", type=int, default=1000, help="WebSocket watchers of the live scenario")
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="rounds of the webhooks and live scenarios (the median is reported)",
    )
    parser.add_argument(
        "--repeat", type=int, default=5, help="rounds of the throughput scenario (the median is reported)"
    )
    parser.add_argument("--schedules", type=int, default=10_000, help="once-a-minute schedules of the cron scenario")
    parser.add_argument("--cron-duration", type=float, default=180.0, help="seconds the cron scenario measures")
    _named_only_options(parser)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--tracing",
        action="store_true",
        help="chain and throughput twice, on fresh stacks: without tracing, then exporting every span over "
        "OTLP/HTTP to a local sink; prints both figures side by side",
    )
    parser.add_argument("--otlp", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--runners",
        type=int,
        default=2,
        help="runner replicas of the started stack (the runner scales out; default 2 for 2 cores)",
    )
    parser.add_argument("--scale-runs", type=int, default=1000, help="runs per round of the scale scenario")
    parser.add_argument(
        "--scale-runners", default="1,2,3", help="runner replicas of each point of the scale scenario (comma-separated)"
    )
    return parser


def _named_only_options(parser: argparse.ArgumentParser) -> None:
    """The options of the api and memory scenarios."""
    parser.add_argument("--api-rate", type=int, default=1000, help="requests/s of the api scenario, per endpoint")
    parser.add_argument(
        "--api-duration", type=float, default=20.0, help="seconds the api scenario measures per endpoint"
    )
    parser.add_argument("--api-warmup", type=float, default=3.0, help="seconds at that rate before each measurement")
    parser.add_argument("--soak-s", type=float, default=600.0, help="seconds of mixed load of the memory scenario")
    parser.add_argument("--soak-rate", type=float, default=20.0, help="webhook deliveries/s during the memory soak")


def run_cron(args: argparse.Namespace) -> None:
    """The cron scenario, on servers of its own."""
    # schedulers of their own, on a NATS and a PostgreSQL of their own, after the stack above
    # has stopped: another stack's scheduler would be one more replica of the scenario
    log(f"cron: {args.schedules} once-a-minute schedules, 2 scheduler replicas, {args.cron_duration:.0f}s")
    result = asyncio.run(scenario_cron(schedules=args.schedules, duration_s=args.cron_duration))
    SETUP.clear()
    SETUP.update({"scheduler_replicas": result["scheduler_replicas"], "services": "flows, scheduler"})
    report(result)


def run_scale(args: argparse.Namespace) -> None:
    """The scale scenario, on the cluster shape with each number of runner replicas asked for."""
    runners = [int(n) for n in args.scale_runners.split(",") if n.strip()]
    log(f"scale: throughput on the cluster shape with {runners} runner replicas")
    result = scenario_scale(
        runners,
        runs=args.scale_runs,
        steps=args.steps,
        in_flight=args.in_flight,
        repeat=3,
        log=log,
        throughput=scenario_throughput,
        api=Api,
    )
    SETUP.clear()
    SETUP.update({"client": "aiohttp", "through": "the front, as integrator-<tenant> on NATS"})
    report(result)


def run_on_stack(args: argparse.Namespace) -> None:
    """The scenarios driven through a gateway: of ``--base``, else of a stack started here."""
    if args.base:
        asyncio.run(main_async(args))
        return
    with stack_process(args) as started:
        args.base, args.nats, args.database = started["base"], started["nats"], started["database"]
        asyncio.run(main_async(args))


@contextlib.contextmanager
def stack_process(args: argparse.Namespace) -> Iterator[dict[str, Any]]:
    """A stack of its own in another process; its addresses and its service processes' PIDs."""
    # the stack runs in a session of its own, as `make run` in one terminal and a load tool in
    # another would: the kernel then shares the CPUs between the two, not among every process alike
    log("starting embedded NATS and PostgreSQL, and the services")
    command = [sys.executable, __file__, "--serve", "--runners", str(args.runners), "--secret", args.secret]
    server = subprocess.Popen(
        [*command, "--otlp"] if args.otlp else command,
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        assert server.stdout is not None
        line = server.stdout.readline()
        if not line:
            raise SystemExit(f"the benchmark stack did not start (exit {server.wait()})")
        yield json.loads(line)
    finally:
        server.terminate()
        server.wait(60)


def run_memory(args: argparse.Namespace) -> None:
    """The memory scenario, on a stack started for it alone (idle means nothing has run on it yet)."""
    with stack_process(args) as started:
        pids = {name: int(pid) for name, pid in started["pids"].items()}
        log(f"memory: {len(pids)} service processes ({', '.join(pids)})")
        asyncio.run(memory_async(args, started["base"], pids))


async def memory_async(args: argparse.Namespace, base: str, pids: dict[str, int]) -> None:
    tenant = f"bench-{uuid.uuid4().hex[:6]}"
    headers = {"Authorization": "Bearer " + token(tenant, secret=args.secret, role="admin")}
    report(
        await memory_soak.scenario_memory(base, headers, tenant, pids, soak_s=args.soak_s, rate=args.soak_rate, log=log)
    )


def run_traced(args: argparse.Namespace) -> None:
    """Chain and throughput without tracing and with every span exported, each on a fresh stack, in the
    order off, on, on, off (so a drift of the machine's load weighs on both alike); the means side by side."""
    args.scenarios = [s for s in args.scenarios if s in TRACED] or list(TRACED)
    passes: dict[bool, list[dict[str, dict[str, Any]]]] = {False: [], True: []}
    for on in (False, True, True, False):
        SETUP["tracing"] = "OTLP/HTTP to a local sink, every span" if on else None
        args.otlp, args.base, args.nats = on, None, None
        log(f"tracing {'on' if on else 'off'} (pass {len(passes[False]) + len(passes[True]) + 1} of 4)")
        SEEN.clear()
        run_on_stack(args)
        passes[on].append(dict(SEEN))
    log("tracing off -> on (mean of two passes each):")
    for name, key, better in (
        ("chain", "p50_ms", "lower"),
        ("chain", "p99_ms", "lower"),
        ("throughput", "steps_per_s", "higher"),
    ):
        if all(name in p for p in passes[False] + passes[True]):
            off, on_ = (round(statistics.fmean(p[name][key] for p in passes[o]), 2) for o in (False, True))
            cost = (on_ - off) / off * 100 if better == "lower" else (off - on_) / off * 100
            each = ", ".join(f"{p[name][key]}" for p in passes[False] + passes[True])
            log(f"  {name} {key}: {off} -> {on_}  (tracing costs {cost:+.1f}%; off, off, on, on: {each})")


def serve(args: argparse.Namespace) -> None:
    """Start the stack, print its addresses as one JSON line, and keep it up until SIGTERM."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    # a collector's stand-in: it takes the exports and counts them (decoding them would steal CPU)
    sink = OtlpReceiver(keep=False) if args.otlp else None
    otel = {"OTEL_EXPORTER_OTLP_ENDPOINT": sink.url} if sink is not None else {}
    with tempfile.TemporaryDirectory(prefix="flowmesh-bench-") as tmp:
        work = Path(tmp)
        nats_server = start_nats(work / "nats")
        pg = start_postgres(work / "postgres")
        stack = ProcessStack(
            nats_server.url,
            pg.url,
            work,
            env={"FLOWMESH_JWT_SECRET": args.secret, "FLOWMESH_LOG_LEVEL": "WARNING", **otel},
            replicas={"runner": args.runners},
        )
        try:
            print(f"[bench] five services, {args.runners} runner replicas", file=sys.stderr, flush=True)
            stack.start_all()
            stack.wait_ready()
            pids = {name: proc.pid for name, proc in stack.procs.items()}
            print(
                json.dumps({"base": stack.base, "nats": nats_server.url, "database": pg.url, "pids": pids}), flush=True
            )
            stop.wait()
        finally:
            stack.stop_all()
            pg.stop()
            nats_server.stop()
            if sink is not None:
                print(f"[bench] OTLP sink: {sink.requests} exports, {sink.bytes} bytes", file=sys.stderr, flush=True)
                sink.close()


if __name__ == "__main__":
    main()
