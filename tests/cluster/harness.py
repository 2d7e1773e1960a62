"""What the cluster fault tests share: a load client that retries only what is retryable, and the checks.

The load goes through the shape's front, as a client behind a load balancer would: keep-alive
``httpx`` clients (one per worker thread), an ``Idempotency-Key`` on every start, and a retry with
the same key only for answers documented as retryable. Every other answer is kept in
``Load.unexpected`` and fails the test.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import threading
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx
import nats
from nats.js.api import DeliverPolicy

from flowmesh.cli.cluster import ClusterShape
from flowmesh.contracts.permissions import inbox_prefix
from flowmesh.contracts.streams import RUN_EVENTS
from flowmesh.contracts.subjects import tenant_token
from upstream import Upstream

FINAL = ("succeeded", "failed", "cancelled", "timedOut")
STEPS = ("start", "a", "h1", "b", "h2", "c")
METERED_PER_RUN = 5
"""Steps metered per run of :func:`slow_flow`: every one but the trigger."""
RETRYABLE_STATUSES = (502, 503, 504)


def wait_until(check: Callable[[], object], *, timeout: float, what: str, interval: float = 0.1) -> None:
    """Poll ``check`` until it is true (bounded); the assertion names ``what``."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out after {timeout:g} s waiting for {what}"
        time.sleep(interval)


def slow_flow(upstream: Upstream, sleep_ms: int = 150) -> dict[str, Any]:
    """trigger → transform → slow http → transform → slow http → transform: runs stay in flight a while.

    Output ``{"v": 2v + 1, "ok": true}`` for input ``{"v": v}``.
    """
    slow = {
        "url": f"{upstream.base}/sleep/{sleep_ms}",
        "retry": {"maxAttempts": 5, "backoff": "fixed", "initialDelayMs": 200},
    }
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
    return {
        "nodes": nodes,
        "edges": [{"id": f"e{i}", "source": s, "target": t} for i, (s, t) in enumerate(itertools.pairwise(STEPS))],
    }


def api(shape: ClusterShape, tenant: str, base: str | None = None) -> httpx.Client:
    """A keep-alive client of the API (through the front unless ``base`` says otherwise)."""
    return httpx.Client(
        base_url=(base or shape.base_url) + "/api/v1",
        timeout=20,
        headers={"Authorization": "Bearer " + shape.token(tenant)},
    )


def patiently(c: httpx.Client, method: str, url: str, *, timeout: float = 60, **kw: Any) -> httpx.Response:
    """A read (or an idempotent call) retried over retryable answers and dropped connections (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            r = c.request(method, url, **kw)
            if r.status_code not in (*RETRYABLE_STATUSES, 429):
                return r
            last: object = f"{r.status_code} {r.text[:300]}"
        except httpx.TransportError as exc:
            last = repr(exc)
        assert time.monotonic() < deadline, f"{method} {url} kept failing: {last}"
        time.sleep(0.2)


def publish(c: httpx.Client, definition: dict[str, Any]) -> str:
    """Create and publish a flow; its id."""
    r = patiently(c, "POST", "/flows", json={"name": "cluster", "definition": definition})
    assert r.status_code == 201, r.text
    flow_id: str = r.json()["id"]
    r = patiently(c, "POST", f"/flows/{flow_id}/publish")
    assert r.status_code == 201, r.text
    return flow_id


def count_runs(c: httpx.Client, flow_id: str, status: str | None = None) -> int:
    """How many runs of a flow there are (with that status)."""
    params = {"flowId": flow_id, "pageSize": 1, **({"status": status} if status else {})}
    r = patiently(c, "GET", "/runs", params=params)
    assert r.status_code == 200, r.text
    total: int = r.json()["total"]
    return total


def all_runs(c: httpx.Client, flow_id: str) -> list[dict[str, Any]]:
    """Every run of a flow (all pages)."""
    found: list[dict[str, Any]] = []
    for page in itertools.count(1):
        r = patiently(c, "GET", "/runs", params={"flowId": flow_id, "pageSize": 100, "page": page})
        assert r.status_code == 200, r.text
        found += r.json()["items"]
        if not r.json()["hasMore"]:
            return found


@dataclass
class Answer:
    """One answer the load client saw that was not a success: what, to which attempt, when."""

    what: str
    retry: bool
    at: float = field(default_factory=time.monotonic)


class Load:
    """Starts runs of one flow through the front from worker threads, each with its own keep-alive client.

    A start is retried with the same ``Idempotency-Key`` after an answer documented as retryable —
    502/503/504 with a problem body, 429 with ``Retry-After``, 409 "still in progress" for a key whose
    first attempt's fate is unknown, or a dropped connection — until it gets 201 (or 200, a repeat of
    an earlier attempt that had succeeded). Anything else is recorded in ``unexpected``.
    """

    def __init__(self, shape: ClusterShape, tenant: str, flow_id: str, *, give_up_s: float = 90) -> None:
        self.shape = shape
        self.tenant = tenant
        self.flow_id = flow_id
        self.give_up_s = give_up_s
        self.accepted: dict[str, int] = {}
        """Run id → its input ``v``, for every start answered 201/200."""
        self.keys: dict[str, str] = {}
        """Idempotency key → run id."""
        self.answers: list[Answer] = []
        """Every retryable answer seen."""
        self.unexpected: list[str] = []
        self._lock = threading.Lock()
        self._local = threading.local()
        self._clients: list[httpx.Client] = []
        self._next_v = itertools.count()
        self._stop = threading.Event()
        self._workers: list[threading.Thread] = []

    # -- one start ------------------------------------------------------------------------------

    def _client(self) -> httpx.Client:
        client: httpx.Client | None = getattr(self._local, "client", None)
        if client is None:
            client = self._local.client = api(self.shape, self.tenant)
            with self._lock:
                self._clients.append(client)
        return client

    def _note(self, what: str, *, retry: bool) -> None:
        with self._lock:
            self.answers.append(Answer(what, retry))

    def start_one(self) -> str | None:
        """Start one run (retrying what is retryable, with the same key); its id, or None if it failed."""
        v = next(self._next_v)
        key = f"load-{uuid.uuid4().hex}"
        c = self._client()
        deadline = time.monotonic() + self.give_up_s
        attempts = 0
        while True:
            attempts += 1
            pause = 0.2
            try:
                r = c.post(f"/flows/{self.flow_id}/runs", json={"input": {"v": v}}, headers={"Idempotency-Key": key})
            except httpx.TransportError as exc:
                self._note(type(exc).__name__, retry=attempts > 1)
            else:
                if r.status_code == 201 or (r.status_code == 200 and attempts > 1):
                    run_id: str = r.json()["id"]
                    with self._lock:
                        self.accepted[run_id] = v
                        self.keys[key] = run_id
                    return run_id
                problem = r.headers.get("content-type", "").startswith("application/problem+json")
                if r.status_code in RETRYABLE_STATUSES and problem:
                    self._note(f"{r.status_code} {r.json().get('detail', '')[:70]}", retry=attempts > 1)
                elif r.status_code == 429 and problem and r.headers.get("Retry-After"):
                    self._note("429", retry=attempts > 1)
                    pause = min(float(r.headers["Retry-After"]), 2.0)
                elif r.status_code == 409 and problem and attempts > 1 and "in progress" in r.text:
                    # the first attempt's connection dropped; its gateway may have died holding the key
                    self._note("409 key still in progress (a retry)", retry=True)
                    pause = 1.0
                else:
                    with self._lock:
                        self.unexpected.append(f"{r.status_code} {r.headers.get('content-type')} {r.text[:500]}")
                    return None
            if time.monotonic() > deadline:
                with self._lock:
                    self.unexpected.append(f"gave up on key {key} after {attempts} attempts")
                return None
            time.sleep(pause)

    def start_many(self, n: int, workers: int = 12) -> list[str]:
        """Start ``n`` runs at once from ``workers`` threads; the ids of those accepted."""
        with ThreadPoolExecutor(workers, thread_name_prefix="load-batch") as pool:
            ids = list(pool.map(lambda _: self.start_one(), range(n)))
        assert not self.unexpected, self.unexpected
        return [i for i in ids if i is not None]

    # -- steady load ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def steady(self, workers: int = 4, pause: float = 0.3) -> Iterator[Load]:
        """Workers keep starting runs (one at a time each, ``pause`` s apart) until the block ends."""
        self._stop.clear()

        def work() -> None:
            while not self._stop.is_set():
                self.start_one()
                self._stop.wait(pause)

        self._workers = [threading.Thread(target=work, name=f"load-{i}", daemon=True) for i in range(workers)]
        for t in self._workers:
            t.start()
        try:
            yield self
        finally:
            self._stop.set()
            for t in self._workers:
                t.join(self.give_up_s + 30)
            assert not any(t.is_alive() for t in self._workers), "a load worker is stuck"

    def close(self) -> None:
        """Close every worker's client."""
        for client in self._clients:
            client.close()

    def summary(self) -> dict[str, int]:
        """How often each retryable answer was seen."""
        return dict(Counter(a.what for a in self.answers))


# --- checks -----------------------------------------------------------------------------------------


def check_runs(c: httpx.Client, load: Load, *, timeout: float = 120) -> None:
    """Every accepted run succeeded with the right output; no run more; no step recorded twice; every
    recorded event is in ``RUN_EVENTS`` exactly once.

    Waits (bounded) until every run of the flow is final, then reads each run's events and steps.
    """
    assert not load.unexpected, load.unexpected
    expected = dict(load.accepted)
    assert expected, "no run was accepted"
    assert len(set(load.keys.values())) == len(load.keys), "two keys got the same run"
    wait_until(
        lambda: sum(count_runs(c, load.flow_id, s) for s in FINAL) >= len(expected),
        timeout=timeout,
        what=f"{len(expected)} runs to finish",
        interval=0.25,
    )
    runs = {r["id"]: r for r in all_runs(c, load.flow_id)}
    extra, missing = sorted(set(runs) - set(expected)), sorted(set(expected) - set(runs))
    assert not extra and not missing, f"runs never accepted: {extra}; accepted but missing: {missing}"
    bad = {i: (r["status"], r["output"], r["error"]) for i, r in runs.items() if r["status"] != "succeeded"}
    assert not bad, bad
    wrong = {i: r["output"] for i, r in runs.items() if r["output"] != {"v": expected[i] * 2 + 1, "ok": True}}
    assert not wrong, wrong

    def recorded_once(run_id: str) -> list[str]:
        with api(load.shape, load.tenant) as own:
            events = patiently(own, "GET", f"/runs/{run_id}/events", params={"pageSize": 1000}).json()["items"]
            seqs = [e["seq"] for e in events]
            assert seqs == list(range(1, len(events) + 1)), (run_id, seqs)
            assert len({e["id"] for e in events}) == len(events), (run_id, "an event id twice")
            finished = Counter(e["stepId"] for e in events if e["type"] in ("step.succeeded", "step.failed"))
            assert finished == dict.fromkeys(STEPS, 1), (run_id, finished)
            assert [e["type"] for e in events if e["type"].startswith("run.")][-1] == "run.succeeded"
            steps = patiently(own, "GET", f"/runs/{run_id}/steps", params={"pageSize": 100}).json()
            assert steps["total"] == len(STEPS), (run_id, steps)
            assert sorted(s["stepId"] for s in steps["items"]) == sorted(STEPS), (run_id, steps)
            assert {s["status"] for s in steps["items"]} == {"succeeded"}, (run_id, steps)
            return [e["id"] for e in events]

    with ThreadPoolExecutor(6, thread_name_prefix="check") as pool:
        recorded = {i for ids in pool.map(recorded_once, sorted(expected)) for i in ids}
    check_stream(load.shape, load.tenant, recorded)


def check_stream(shape: ClusterShape, tenant: str, recorded: set[str], *, timeout: float = 30) -> None:
    """``RUN_EVENTS`` holds each recorded event of the tenant once, and nothing else (bounded wait: the
    runner's sweep re-publishes what a failed publish kept from the stream, a few seconds later)."""
    deadline = time.monotonic() + timeout
    while True:
        stored = stream_events(shape, tenant)
        twice = {i: n for i, n in stored.items() if n > 1}
        assert not twice, f"events stored more than once: {twice}"
        assert set(stored) <= recorded, f"events in the stream never recorded: {set(stored) - recorded}"
        if set(stored) == recorded:
            return
        missing = recorded - set(stored)
        assert time.monotonic() < deadline, f"{len(missing)} recorded events never reached the stream: {missing}"
        time.sleep(0.5)


def check_usage(c: httpx.Client, runs: int, *, timeout: float = 60) -> None:
    """The tenant's usage counters equal what the run events say: each run once, each non-trigger step once."""
    want = {"runsUsed": runs, "stepsUsed": runs * METERED_PER_RUN}
    deadline = time.monotonic() + timeout
    while True:
        body = patiently(c, "GET", "/usage", params={"period": "current"}).json()
        seen = {k: body[k] for k in want}
        assert all(seen[k] <= want[k] for k in want), f"metered more than happened: {seen} > {want}"
        if seen == want:
            return
        assert time.monotonic() < deadline, f"usage still {seen} after {timeout:g} s, expected {want}"
        time.sleep(0.25)


# --- NATS ---------------------------------------------------------------------------------------------


def stream_leader(shape: ClusterShape, stream: str, *, timeout: float = 30) -> int:
    """Index of the NATS node leading ``stream`` now, as a running node's ``/jsz`` reports it (bounded wait)."""
    nats = shape.nats
    assert nats is not None
    found: list[int] = []

    def leader() -> bool:
        for node, monitor in zip(nats.nodes, nats.monitor_urls, strict=True):
            if not node.running:
                continue
            try:
                with urllib.request.urlopen(f"{monitor}/jsz?streams=true", timeout=2) as response:
                    jsz = json.load(response)
            except OSError:
                continue
            for account in jsz.get("account_details") or []:
                for detail in account.get("stream_detail") or []:
                    name = (detail.get("cluster") or {}).get("leader")
                    if detail.get("name") == stream and name:
                        index = nats.index_of(name)
                        if nats.nodes[index].running:
                            found.append(index)
                            return True
        return False

    wait_until(leader, timeout=timeout, what=f"a running leader of {stream}")
    return found[-1]


def stream_events(shape: ClusterShape, tenant: str, *, timeout: float = 30) -> Counter[str]:
    """How often each event id of ``tenant``'s runs is stored in ``RUN_EVENTS`` (read as the gateway reads it)."""
    return asyncio.run(_stream_events(shape, tenant, timeout))


async def _stream_events(shape: ClusterShape, tenant: str, timeout: float) -> Counter[str]:
    nc = await nats.connect(
        shape.nats_urls,
        user="gateway",
        password=shape.passwords["gateway"],
        inbox_prefix=inbox_prefix("gateway"),
        connect_timeout=5,
    )
    try:
        js = nc.jetstream()
        sub = await js.subscribe(
            f"fm.runs.{tenant_token(tenant)}.>",
            stream=RUN_EVENTS.name,
            ordered_consumer=True,
            deliver_policy=DeliverPolicy.ALL,
        )
        seen: Counter[str] = Counter()
        deadline = time.monotonic() + timeout
        while True:
            msg = await sub.next_msg(timeout=max(0.1, deadline - time.monotonic()))
            seen[json.loads(msg.data)["id"]] += 1
            if msg.metadata.num_pending == 0:
                return seen
    finally:
        await nc.close()
