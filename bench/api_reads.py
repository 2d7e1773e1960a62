"""The ``api`` scenario: reads of the API at a fixed request rate, from a load tool that is not Flowmesh's.

Seeds the tenant over the API (flows published, runs finished), then, one endpoint after the
other, ``GET /api/v1/flows``, ``GET /api/v1/runs/{id}`` and ``GET /api/v1/runs?flowId=<id>`` at
``rate`` requests per second for ``duration_s`` (after a warm-up at the same rate, not measured).
The requests come from ``loadtest`` (npm) driven by ``bench/loadgen.mjs`` in a Node process of its
own: an open model (a request leaves every 1/rate s whether or not the earlier ones have answered),
so a server that cannot keep up shows as latency and errors, not as a quietly lower rate. Latencies
are whole milliseconds (loadtest truncates them): a quantile ``v`` means a time in ``[v, v + 1)``,
so the target is judged on ``v + 1``.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
LOADGEN = ROOT / "bench" / "loadgen.mjs"
TARGET = {"rate_per_s": 1000.0, "p99_ms": 10.0}
FLOW = {
    "nodes": [
        {"id": "start", "type": "trigger", "data": {}},
        {"id": "add", "type": "transform", "data": {"output": {"v": "{{ input.v + 1 }}"}}},
    ],
    "edges": [{"id": "e", "source": "start", "target": "add"}],
}


def endpoints(flow_id: str, run_id: str) -> dict[str, str]:
    """The measured reads, by the route's name as in the API, to their path under ``/api/v1``."""
    return {
        "GET /api/v1/flows": "/flows",
        "GET /api/v1/runs/{id}": f"/runs/{run_id}",
        "GET /api/v1/runs?flowId=": f"/runs?flowId={flow_id}",
    }


def quantile(histogram: dict[int, int], q: float) -> int | None:
    """The ``q`` quantile of a histogram of whole-ms latencies (``{ms: count}``); None when empty."""
    total = sum(histogram.values())
    if total == 0:
        return None
    rank = min(total - 1, int(total * q))
    seen = 0
    for ms in sorted(histogram):
        seen += histogram[ms]
        if seen > rank:
            return ms
    raise AssertionError("unreachable: the rank is below the total")


def endpoint_figures(raw: dict[str, Any]) -> dict[str, Any]:
    """The figures of one endpoint from the load generator's JSON (``bench/loadgen.mjs``)."""
    histogram = {int(ms): int(n) for ms, n in raw["latencyMs"].items()}
    statuses = {str(code): int(n) for code, n in raw["statuses"].items()}
    answered = sum(statuses.values())
    non_2xx = sum(n for code, n in statuses.items() if not code.startswith("2"))
    elapsed = float(raw["elapsedS"])
    p50, p99 = quantile(histogram, 0.5), quantile(histogram, 0.99)
    rate = float(raw["requestedRate"])
    achieved = round(answered / elapsed, 1) if elapsed > 0 else 0.0
    return {
        "requested_rate_per_s": rate,
        "achieved_rate_per_s": achieved,
        "duration_s": round(elapsed, 2),
        "answered": answered,
        "non_2xx": non_2xx,
        "connection_errors": int(raw["connectionErrors"]),
        "statuses": statuses,
        "p50_ms": p50,
        "p99_ms": p99,
        "max_ms": max(histogram) if histogram else None,
        "connections": raw.get("connections"),
        "loadgen_cpu_percent": round(float(raw["cpuS"]) / elapsed * 100, 1) if elapsed > 0 else None,
        # whole ms, truncated: the true p99 is below p99_ms + 1; the rate within 2% of the one asked for
        "target_met": p99 is not None
        and p99 + 1 <= TARGET["p99_ms"]
        and achieved >= 0.98 * max(rate, TARGET["rate_per_s"])
        and non_2xx == 0
        and int(raw["connectionErrors"]) == 0,
    }


def run_loadgen(url: str, headers: dict[str, str], rate: int, duration_s: float, warmup_s: float) -> dict[str, Any]:
    """One fixed-rate run of the load generator against ``url``; its JSON."""
    spec = {"url": url, "rate": rate, "seconds": duration_s, "warmupS": warmup_s, "headers": headers}
    done = subprocess.run(
        ["node", str(LOADGEN), json.dumps(spec)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=duration_s + warmup_s + 120,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"the load generator failed ({done.returncode}): {done.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


async def quiet(url: str, headers: dict[str, str], timeout: float = 180) -> float:
    """Wait (bounded) until ``url`` answers 200 within 50 ms three times in a row; the seconds it took.

    An open-model load leaves requests the server has not answered when it stops: the next endpoint
    must not be measured while the gateway still works through them.
    """
    t0 = time.monotonic()
    fast = 0
    async with aiohttp.ClientSession(headers=headers) as http:
        while fast < 3 and time.monotonic() - t0 < timeout:
            t = time.monotonic()
            try:
                async with http.get(url, timeout=aiohttp.ClientTimeout(total=30)) as r:
                    await r.read()
                    ok = r.status == 200
            except (aiohttp.ClientError, TimeoutError):
                ok = False
            fast = fast + 1 if ok and time.monotonic() - t < 0.05 else 0
            await asyncio.sleep(0.2)
    return round(time.monotonic() - t0, 1)


async def seed(
    publish: Callable[[dict[str, Any]], Awaitable[str]],
    start_and_wait: Callable[[str, int], Awaitable[tuple[str, str]]],
    *,
    flows: int,
    runs: int,
) -> tuple[str, str]:
    """``flows`` published flows and ``runs`` finished runs of the last one; that flow's id and a run's."""
    flow_ids = [await publish(FLOW) for _ in range(flows)]
    run_id = ""
    for i in range(runs):
        run_id, status = await start_and_wait(flow_ids[-1], i)
        if status != "succeeded":
            raise RuntimeError(f"a seed run {status}")
    return flow_ids[-1], run_id


async def scenario_api(
    base: str,
    headers: dict[str, str],
    publish: Callable[[dict[str, Any]], Awaitable[str]],
    start_and_wait: Callable[[str, int], Awaitable[tuple[str, str]]],
    *,
    rate: int,
    duration_s: float,
    warmup_s: float,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Each read endpoint at ``rate`` requests/s for ``duration_s``, one after the other."""
    flow_id, run_id = await seed(publish, start_and_wait, flows=20, runs=50)
    results = {}
    for name, path in endpoints(flow_id, run_id).items():
        url = f"{base}/api/v1{path}"
        quiet_s = await quiet(url, headers)
        raw = await asyncio.to_thread(run_loadgen, url, headers, rate, duration_s, warmup_s)
        results[name] = {**endpoint_figures(raw), "quiet_before_s": quiet_s}
        r = results[name]
        log(
            f"  {name}: {r['achieved_rate_per_s']}/{r['requested_rate_per_s']} req/s, p50 {r['p50_ms']} ms, "
            f"p99 {r['p99_ms']} ms, non-2xx {r['non_2xx']}, connection errors {r['connection_errors']}"
        )
    return {
        "scenario": "api",
        "load_generator": "loadtest 8.2.1 (npm), open model at a fixed rate, latencies in whole ms",
        "requested_rate_per_s": rate,
        "duration_s": duration_s,
        "warmup_s": warmup_s,
        "seeded": {"flows": 20, "finished_runs": 50},
        "endpoints": results,
        "worst_p99_ms": max((r["p99_ms"] for r in results.values() if r["p99_ms"] is not None), default=None),
        "target_met": all(r["target_met"] for r in results.values()),
    }
