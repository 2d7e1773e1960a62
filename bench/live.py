"""The ``live`` scenario: many WebSocket watchers of one run, event delivery latency after commit.

A run of consecutive approval steps waits; ``watchers`` clients connect to ``/ws/runs/{id}`` (each
gets its snapshot), then the load generator approves one step at a time. Every watcher checks its
stream is gap-free and duplicate-free, and records, for every event, the time it arrived minus the
event's ``ts`` (stamped by the runner in the transaction that commits it, so the figure includes
commit, publish, the gateway and the socket).
"""

from __future__ import annotations

import asyncio
import base64
import gc
import json
import os
import resource
import statistics
import struct
import time
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

import aiohttp

APPROVALS = 8


def approval_flow() -> dict[str, Any]:
    """trigger -> ok1 -> ... -> okN -> done: each approval a moment where the run moves on."""
    nodes: list[dict[str, Any]] = [{"id": "start", "type": "trigger", "data": {}}]
    edges = []
    prev = "start"
    for i in range(1, APPROVALS + 1):
        nodes.append({"id": f"ok{i}", "type": "approval", "data": {}})
        edges.append({"id": f"e{i}", "source": prev, "target": f"ok{i}"})
        prev = f"ok{i}"
    nodes.append({"id": "done", "type": "transform", "data": {"output": "done"}})
    edges.append({"id": "e-done", "source": prev, "target": "done", "sourceHandle": "approved"})
    return {"nodes": nodes, "edges": edges}


class Watch(asyncio.Protocol):
    """One watcher on a minimal WebSocket client: the load generator shares the two cores with the
    stack, so it reads frames itself and takes only ``seq`` and ``ts`` from each event, where a
    general client would cost several times the gateway's own work per message."""

    def __init__(self, host: str, path: str, token: str) -> None:
        self.request = (
            f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}\r\nSec-WebSocket-Version: 13\r\n"
            f"Sec-WebSocket-Protocol: flowmesh.v1, bearer.{token}\r\n\r\n"
        ).encode()
        self.buf = b""
        self.upgraded = False
        self.latencies: list[float] = []
        self.received: list[tuple[float, bytes]] = []
        self.last_seq = -1
        self.errors: list[str] = []
        self.done = asyncio.Event()
        self.ready = asyncio.Event()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(self.request)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.is_set():
            self.errors.append(f"connection lost: {exc}")
        self.ready.set()
        self.done.set()

    def data_received(self, data: bytes) -> None:
        now = time.time()
        self.buf += data
        if not self.upgraded:
            head, sep, rest = self.buf.partition(b"\r\n\r\n")
            if not sep:
                return
            if b" 101 " not in head.split(b"\r\n", 1)[0]:
                self.errors.append(head.split(b"\r\n", 1)[0].decode())
                self._finish()
                return
            self.upgraded, self.buf = True, rest
        while len(self.buf) >= 2:
            opcode, n = self.buf[0] & 0x0F, self.buf[1] & 0x7F
            start = 2
            if n == 126:
                if len(self.buf) < 4:
                    return
                n, start = struct.unpack("!H", self.buf[2:4])[0], 4
            elif n == 127:
                if len(self.buf) < 10:
                    return
                n, start = struct.unpack("!Q", self.buf[2:10])[0], 10
            if len(self.buf) < start + n:
                return
            payload, self.buf = self.buf[start : start + n], self.buf[start + n :]
            if opcode == 0x1:
                self._message(payload, now)
            elif opcode == 0x9:  # ping: a client's pong is masked (a zero mask keeps it simple)
                self._send(0xA, payload)
            elif opcode == 0x8:
                self._finish()

    def _message(self, payload: bytes, now: float) -> None:
        if payload.startswith(b'{"type":"snapshot"'):
            self.last_seq = json.loads(payload)["seq"]
            self.ready.set()
            return
        self.received.append((now, payload))  # read after the run: measuring must not slow the reading
        if b'"type":"run.succeeded"' in payload:
            self._finish()

    def check(self) -> None:
        """Latencies and seq continuity of what was received."""
        for now, payload in self.received:
            seq = int(payload[payload.index(b'"seq":') + 6 : payload.index(b",", 16)])
            ts = payload[payload.index(b'"ts":"') + 6 :]
            ts = ts[: ts.index(b'"')]
            if seq != self.last_seq + 1:
                self.errors.append(f"expected seq {self.last_seq + 1}, got {seq}")
            self.last_seq = seq
            self.latencies.append((now - datetime.fromisoformat(ts.decode()).timestamp()) * 1000)

    def _send(self, opcode: int, payload: bytes) -> None:
        if self.transport is not None and len(payload) < 126:
            self.transport.write(bytes([0x80 | opcode, 0x80 | len(payload)]) + b"\0\0\0\0" + payload)

    def _finish(self) -> None:
        self.done.set()
        self.ready.set()

    def close(self) -> None:
        """Hang up (after every watcher is done: a thousand hang-ups are not part of delivery)."""
        if self.transport is not None:
            self.transport.close()


async def scenario_live(base: str, headers: dict[str, str], watchers: int) -> dict[str, Any]:
    """``watchers`` WebSocket clients follow one run while it moves on, one approval at a time."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    token = headers["Authorization"].removeprefix("Bearer ")
    api = base + "/api/v1"
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(headers=headers, connector=connector) as http:
        flow = await _json(http.post(f"{api}/flows", json={"name": "bench-live", "definition": approval_flow()}))
        await _json(http.post(f"{api}/flows/{flow['id']}/publish"))
        run = await _json(http.post(f"{api}/flows/{flow['id']}/runs", json={"input": {}}))
        await _wait_status(http, f"{api}/runs/{run['id']}", "waiting")
        host, port = urlsplit(base).hostname or "127.0.0.1", urlsplit(base).port or 80
        path = f"/ws/runs/{run['id']}"
        loop = asyncio.get_running_loop()
        watches: list[Watch] = []
        connect_started = time.perf_counter()
        for i in range(watchers):
            w = Watch(f"{host}:{port}", path, token)
            watches.append(w)
            await loop.create_connection(lambda w=w: w, host, port)  # type: ignore[misc]
            if i % 50 == 49:  # connect in waves, as a crowd of browsers would
                await asyncio.gather(*(x.ready.wait() for x in watches))
        await asyncio.gather(*(w.ready.wait() for w in watches))
        connect_s = time.perf_counter() - connect_started
        gc.disable()  # the load generator's own pauses are not the gateway's latency
        for i in range(1, APPROVALS + 1):
            await _json(http.post(f"{api}/runs/{run['id']}/resume", json={"stepId": f"ok{i}", "decision": "approved"}))
            await asyncio.sleep(0.25)  # the pace of a person clicking through (not a wait on a result)
        await asyncio.wait_for(asyncio.gather(*(w.done.wait() for w in watches)), 120)
    gc.enable()
    for w in watches:
        w.close()
        w.check()
    latencies = sorted(x for w in watches for x in w.latencies)
    broken = [w for w in watches if w.errors]
    events = max((len(w.latencies) for w in watches), default=0)
    return {
        "scenario": "live",
        "watchers": watchers,
        "events_per_watcher": events,
        "messages": len(latencies),
        "connect_s": round(connect_s, 2),
        "p50_ms": round(statistics.median(latencies), 2) if latencies else None,
        "p99_ms": round(latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))], 2) if latencies else None,
        "max_ms": round(latencies[-1], 2) if latencies else None,
        "incomplete_watchers": len(broken),
        "errors": sorted({e for w in broken for e in w.errors})[:5],
    }


async def _json(request: Any) -> Any:
    async with request as r:
        if r.status >= 400:
            raise RuntimeError(f"{r.method} {r.url} -> {r.status}: {await r.text()}")
        return await r.json()


async def _wait_status(http: aiohttp.ClientSession, url: str, status: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (await _json(http.get(url)))["status"] == status:
            return
        await asyncio.sleep(0.05)
    raise TimeoutError(f"{url} not {status} after {timeout}s")
