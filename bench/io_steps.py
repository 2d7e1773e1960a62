"""Scenarios of steps that do I/O: ``io-chain``, ``io-throughput``, ``publish-chain``, ``publish-throughput``.

``http`` steps call an upstream of the benchmark's own (another process, so that it shares no event
loop with the load generator) that answers at once; ``publish`` steps publish on ``fm.out``. The
overhead of a step is the run's latency minus the upstream's time, divided by the steps: the
upstream's time is the median round trip of the same request made directly, measured in the same
scenario. Runs are started over HTTP and their ends observed on NATS, as in :mod:`run`.

Both kinds also count PostgreSQL backends before and after the measured rounds: in steady state no
connection is opened per step or per request, so the count must not grow.
"""

from __future__ import annotations

import asyncio
import itertools
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import asyncpg

STEPS = 10
"""Steps per run of every scenario here."""


def io_flow(kind: str, url: str, steps: int = STEPS) -> dict[str, Any]:
    """``start`` then ``steps`` steps of ``kind`` (``http``: a GET of ``url``; ``publish``: on ``fm.out``)."""
    nodes: list[dict[str, Any]] = [{"id": "start", "type": "trigger", "data": {}}]
    for i in range(steps):
        if kind == "http":
            data: dict[str, Any] = {"method": "GET", "url": url}
        else:
            data = {"name": "bench", "payload": {"i": i, "run": "{{ run.id }}"}}
        nodes.append({"id": f"s{i}", "type": kind, "data": data})
    ids = [n["id"] for n in nodes]
    edges = [{"id": f"{a}>{b}", "source": a, "target": b} for a, b in itertools.pairwise(ids)]
    return {"nodes": nodes, "edges": edges}


UPSTREAM = r"""
import asyncio, sys

BODY = b'{"ok":true}'
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(BODY) + BODY
)


class Ok(asyncio.Protocol):
    # answers every request (GETs: no body) with the same 200, keeping the connection
    def connection_made(self, transport):
        self.transport, self.buffer = transport, b""

    def data_received(self, data):
        self.buffer += data
        answers = self.buffer.count(b"\r\n\r\n")
        if answers:
            self.buffer = self.buffer[self.buffer.rindex(b"\r\n\r\n") + 4 :]
            self.transport.write(RESPONSE * answers)


async def main(port):
    server = await asyncio.get_running_loop().create_server(Ok, "127.0.0.1", port, backlog=1024)
    await server.serve_forever()


try:
    import uvloop
    uvloop.run(main(int(sys.argv[1])))
except ImportError:
    asyncio.run(main(int(sys.argv[1])))
"""
"""The upstream of ``http`` steps: a bare asyncio protocol answering each request with the same 200
at once, so that its own CPU (an ``aiohttp`` server's was a tenth of the machine at 1,500 steps/s)
is not taken from the system being measured on the same cores."""


class Upstream:
    """An HTTP server in a process of its own that answers ``GET /ok`` at once."""

    def __init__(self) -> None:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/ok"
        self.proc = subprocess.Popen([sys.executable, "-c", UPSTREAM, str(self.port)])

    async def ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as http:
            while True:
                try:
                    async with http.get(self.url) as r:
                        if r.status == 200:
                            return
                except aiohttp.ClientError:
                    if time.monotonic() > deadline:
                        raise
                await asyncio.sleep(0.05)

    async def round_trip_ms(self, n: int = 200) -> float:
        """The median time of a direct GET (one connection kept, as the runner's client keeps them)."""
        times = []
        async with aiohttp.ClientSession() as http:
            for i in range(n + 20):
                t = time.perf_counter()
                async with http.get(self.url) as r:
                    await r.read()
                if i >= 20:
                    times.append((time.perf_counter() - t) * 1000)
        return statistics.median(times)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


async def backends(database_url: str | None) -> int | None:
    """Client backends of PostgreSQL now (the benchmark's own connection left out)."""
    if not database_url:
        return None
    conn = await asyncpg.connect(database_url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        return int(
            await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
            )
        )
    finally:
        await conn.close()


async def scenario_io_chain(
    kind: str,
    publish: Callable[[dict[str, Any]], Awaitable[str]],
    start_and_wait: Callable[[str, int], Awaitable[tuple[float, str]]],
    runs: int,
    upstream: Upstream | None,
    database_url: str | None,
) -> dict[str, Any]:
    """One run at a time of ``STEPS`` I/O steps: the latency and the overhead of each step."""
    flow_id = await publish(io_flow(kind, upstream.url if upstream else ""))
    server_ms = await upstream.round_trip_ms() if upstream else 0.0
    latencies = []
    before = None
    for i in range(runs + 5):
        if i == 5:  # warm-up done: caches, connections
            before = await backends(database_url)
        elapsed, status = await start_and_wait(flow_id, i)
        if status != "succeeded":
            raise RuntimeError(f"a run of the {kind} chain {status}")
        if i >= 5:
            latencies.append(elapsed * 1000)
    after = await backends(database_url)
    latencies.sort()
    p50 = statistics.median(latencies)
    return {
        "scenario": f"{'io' if kind == 'http' else 'publish'}-chain",
        "runs": runs,
        "steps_per_run": STEPS,
        "step_type": kind,
        "p50_ms": round(p50, 2),
        "p99_ms": round(latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))], 2),
        "upstream_round_trip_ms": round(server_ms, 3),
        "overhead_per_step_ms": round((p50 - STEPS * server_ms) / STEPS, 2),
        "pg_backends_before": before,
        "pg_backends_after": after,
    }


def io_throughput_result(
    kind: str, runs: int, in_flight: int, elapsed: float, ok: int, before: int | None, after: int | None
) -> dict[str, Any]:
    """The figures of one round of ``io-throughput`` / ``publish-throughput``."""
    return {
        "scenario": f"{'io' if kind == 'http' else 'publish'}-throughput",
        "runs": runs,
        "steps_per_run": STEPS,
        "step_type": kind,
        "in_flight": in_flight,
        "elapsed_s": round(elapsed, 3),
        "succeeded": ok,
        "steps_per_s": round(runs * STEPS / elapsed, 1),
        "pg_backends_before": before,
        "pg_backends_after": after,
    }
