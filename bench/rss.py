"""Idle memory of each service: RSS and PSS of every process once the stack is ready and again after a quiet spell.

Starts the five services as ``make run`` does (``python -m flowmesh.<name>``, one process each) on an
embedded NATS and PostgreSQL, waits until every one answers ``/readyz``, then reads
``/proc/<pid>/smaps_rollup``. The second reading, ``--idle`` seconds later, shows growth while
nothing happens (periodic jobs, metrics, lag polling). PSS counts shared pages (the interpreter,
libraries mapped by every process) once across the processes; RSS is what each one is charged for
alone, and what a container's memory limit sees.

    .venv/bin/python bench/rss.py                          # the table
    .venv/bin/python bench/rss.py --env MALLOC_ARENA_MAX=8  # a setting compared
    .venv/bin/python bench/rss.py --json                   # one JSON object
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from flowmesh.cli.embedded import start_nats, start_postgres
from stack import SERVICES, ProcessStack

TARGET_MB = 80
"""Idle RSS a service process should stay under (issue P11)."""


def memory(pid: int) -> dict[str, float]:
    """RSS, PSS and anonymous memory of a process, in MB (from ``/proc/<pid>/smaps_rollup``)."""
    fields: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[-1] == "kB":
            fields[key] = int(parts[0]) / 1024
    return {"rss": fields["Rss"], "pss": fields["Pss"], "anon": fields["Anonymous"]}


def wait_all_ready(stack: ProcessStack, timeout: float = 90) -> None:
    """Every service's ``/readyz`` answers 200 (the gateway's on its API port, the others' on their health port)."""
    stack.wait_ready(timeout)
    deadline = time.monotonic() + timeout
    for name in stack.health_ports:
        url = f"http://127.0.0.1:{stack.health_ports[name]}/readyz"
        while True:
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} not ready: {stack.logs(name)}")
            time.sleep(0.2)


def readings(stack: ProcessStack, settle: float, idle: float) -> dict[str, dict[str, float]]:
    """Each service's memory ``settle`` s after all are ready, and its RSS growth over ``idle`` s more."""
    wait_all_ready(stack)
    # the first readiness probes, the first metrics tick and lag poll: part of being idle
    time.sleep(settle)
    ready = {name: memory(stack.procs[name].pid) for name in SERVICES}
    time.sleep(idle)
    later = {name: memory(stack.procs[name].pid) for name in SERVICES}
    return {name: {**ready[name], "growth": later[name]["rss"] - ready[name]["rss"]} for name in SERVICES}


def measure(env: dict[str, str], settle: float, idle: float) -> dict[str, dict[str, dict[str, float]]]:
    """Start the stack with ``env`` added on empty servers (each service migrates its schema), read it; restart it
    on the now migrated database (every later start), read it again."""
    with tempfile.TemporaryDirectory(prefix="flowmesh-rss-") as tmp:
        work = Path(tmp)
        nats_server = start_nats(work / "nats")
        pg = start_postgres(work / "postgres")
        stack = ProcessStack(nats_server.url, pg.url, work, env={"FLOWMESH_LOG_LEVEL": "WARNING", **env})
        try:
            stack.start_all()
            first = readings(stack, settle, idle)
            stack.stop_all()
            stack.start_all()
            restart = readings(stack, settle, idle)
        finally:
            stack.stop_all()
            pg.stop()
            nats_server.stop()
    return {"firstStart": first, "restart": restart}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="added to every service")
    parser.add_argument("--settle", type=float, default=5.0, help="seconds after readiness before the first reading")
    parser.add_argument("--idle", type=float, default=30.0, help="seconds between the two readings")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = parser.parse_args()
    env = dict(item.split("=", 1) for item in args.env)
    results = measure(env, args.settle, args.idle)
    if args.json:
        print(json.dumps({"env": env, "targetMb": TARGET_MB, **results}, indent=2))
        return
    for label, result in (("first start (migrates)", results["firstStart"]), ("restart", results["restart"])):
        print(f"{label}: idle RSS growth over {args.idle:g} s")
        print(f"  {'service':<10} {'RSS MB':>7} {'PSS MB':>7} {'anon MB':>8} {'growth':>7}")
        for name, m in result.items():
            flag = "" if m["rss"] <= TARGET_MB else f"  > {TARGET_MB}"
            print(f"  {name:<10} {m['rss']:7.1f} {m['pss']:7.1f} {m['anon']:8.1f} {m['growth']:+7.1f}{flag}")


if __name__ == "__main__":
    main()
