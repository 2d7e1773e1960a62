"""The ``scale`` scenario: throughput on the cluster shape with 1, 2 and 3 runner replicas.

Each point starts ``make cluster``'s shape afresh (3 NATS nodes with R3 streams and
least-privilege users, PostgreSQL, two replicas of every other service, the front), in a session of
its own like the other scenarios' stack, and drives the throughput scenario through the front;
completion is observed as an integrator of the benchmark's tenant would, on its own NATS user.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import tempfile
import threading
import uuid
from pathlib import Path
from typing import Any

import nats

from flowmesh.cli.cluster import ClusterShape
from flowmesh.contracts.permissions import inbox_prefix, integrator_user

SERVICES = ("gateway", "flows", "runner", "scheduler", "usage")


def serve_cluster(runners: int, tenant: str) -> None:
    """Start the cluster shape, print how to reach it as one JSON line, keep it up until SIGTERM."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    replicas = {name: (runners if name == "runner" else 2) for name in SERVICES}
    with tempfile.TemporaryDirectory(prefix="flowmesh-scale-") as tmp:
        shape = ClusterShape(Path(tmp), replicas=replicas, integrators=(tenant,), env={"FLOWMESH_LOG_LEVEL": "WARNING"})
        with shape:
            user = integrator_user(tenant)
            print(
                json.dumps(
                    {
                        "base": shape.base_url,
                        "nats": shape.nats_url,
                        "user": user,
                        "password": shape.passwords[user],
                        "token": shape.token(tenant, role="admin", ttl=3 * 3600),
                    }
                ),
                flush=True,
            )
            stop.wait()


def scenario_scale(
    runners: list[int], *, runs: int, steps: int, in_flight: int, repeat: int, log: Any, throughput: Any, api: Any
) -> dict[str, Any]:
    """Throughput (median of ``repeat`` rounds) at each number of runner replicas."""
    points = []
    for n in runners:
        tenant = f"scale-{uuid.uuid4().hex[:6]}"
        log(f"scale: starting the cluster shape with {n} runner replica(s)")
        server = subprocess.Popen(
            [sys.executable, __file__, str(n), tenant], stdout=subprocess.PIPE, start_new_session=True
        )
        try:
            assert server.stdout is not None
            line = server.stdout.readline()
            if not line:
                raise SystemExit(f"the cluster shape did not start (exit {server.wait()})")
            where = json.loads(line)
            rounds = asyncio.run(_drive(where, tenant, runs, steps, in_flight, repeat, throughput, api))
        finally:
            server.terminate()
            server.wait(120)
        median = sorted(rounds, key=lambda r: r["steps_per_s"])[len(rounds) // 2]
        points.append(
            {
                "runner_replicas": n,
                "steps_per_s": median["steps_per_s"],
                "runs_per_s": median["runs_per_s"],
                "rounds_steps_per_s": [r["steps_per_s"] for r in rounds],
                "succeeded": median["succeeded"],
            }
        )
        log(f"  {n} runner replica(s): {median['steps_per_s']} steps/s (rounds {points[-1]['rounds_steps_per_s']})")
    return {
        "scenario": "scale",
        "shape": "3 NATS nodes (R3 streams), PostgreSQL, 2 replicas of gateway/flows/scheduler/usage, a front",
        "runs": runs,
        "steps_per_run": steps,
        "in_flight": in_flight,
        "points": points,
    }


async def _drive(
    where: dict[str, str], tenant: str, runs: int, steps: int, in_flight: int, repeat: int, throughput: Any, api: Any
) -> list[dict[str, Any]]:
    c = api(where["base"] + "/api/v1", {"Authorization": "Bearer " + where["token"]})
    try:
        nc = await nats.connect(
            where["nats"].split(","),
            user=where["user"],
            password=where["password"],
            inbox_prefix=inbox_prefix(where["user"]),
        )
        try:
            return [await throughput(c, nc, tenant, runs, in_flight, steps) for _ in range(repeat)]
        finally:
            await nc.close()
    finally:
        await c.close()


if __name__ == "__main__":
    serve_cluster(int(sys.argv[1]), sys.argv[2])
