"""The services as real processes (``python -m flowmesh.<name>``) on the test NATS and PostgreSQL."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import httpx
import jwt
import pytest
from sqlalchemy.engine import make_url
from websockets.exceptions import InvalidStatus
from websockets.sync.client import ClientConnection, connect

from flowmesh.cli.embedded import free_port, start_nats
from flowmesh.contracts.testing import chain as chain  # re-exported: the e2e tests and the bench import it from here

SERVICES = ("gateway", "flows", "runner", "scheduler", "usage")
SECRET = "e2e-secret-" + "0123456789abcdef" * 4


def token(
    sub: str = "alice",
    *,
    tenant: str | None = None,
    role: str = "member",
    secret: str = SECRET,
    exp_in: int = 3600,
    iss: str = "flowmesh",
    aud: str = "flowmesh",
    alg: str = "HS256",
    headers: dict[str, str] | None = None,
    **extra: object,
) -> str:
    """A signed JWT as an identity provider would issue it."""
    now = int(time.time())
    claims = {
        "sub": sub,
        "tenant": tenant or sub,
        "role": role,
        "iss": iss,
        "aud": aud,
        "iat": now,
        "exp": now + exp_in,
        **extra,
    }
    return jwt.encode(claims, secret, algorithm=alg, headers=headers)


class ProcessStack:
    """Starts, kills and restarts service processes; stops only its own, by PID."""

    def __init__(
        self,
        nats_url: str,
        database_url: str,
        workdir: Path,
        *,
        env: dict[str, str] | None = None,
        services: tuple[str, ...] = SERVICES,
        replicas: dict[str, int] | None = None,
    ) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        # replicas beyond the first are named "<service>#<n>"
        self.services = tuple(
            name if i == 0 else f"{name}#{i + 1}" for name in services for i in range((replicas or {}).get(name, 1))
        )
        self.env = {
            **os.environ,
            "FLOWMESH_ENV": "dev",
            "NATS_URL": nats_url,
            "DATABASE_URL": database_url,
            "FLOWMESH_DATA_DIR": str(workdir / "data"),
            "FLOWMESH_JWT_SECRET": SECRET,
            "FLOWMESH_HTTP_HOST": "127.0.0.1",
            "FLOWMESH_HTTP_PORT": str(self.port),
            "FLOWMESH_LOG_FORMAT": "json",
            # tests drive tenants harder than a free plan's 20 requests/s; tests of plans choose their own
            "FLOWMESH_DEFAULT_PLAN": "enterprise",
            **(env or {}),
        }
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.health_ports: dict[str, int] = {}
        """The health port (``/healthz``, ``/readyz``, ``/metrics``) of each NATS-only service process."""

    def start(self, name: str, env: dict[str, str] | None = None) -> None:
        service = name.split("#")[0]
        health: dict[str, str] = {}
        if service != "gateway":
            # a port of its own per process (a restart gets a new one): tests read its /metrics
            self.health_ports[name] = free_port()
            health[f"FLOWMESH_{service.upper()}_HEALTH_PORT"] = str(self.health_ports[name])
        log = (self.workdir / f"{name}.log").open("ab")
        try:
            self.procs[name] = subprocess.Popen(
                [sys.executable, "-m", f"flowmesh.{service}"],
                env={**self.env, **health, **(env or {})},
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        finally:
            log.close()

    def start_all(self) -> None:
        for name in self.services:
            self.start(name)

    def start_gateway(self, name: str, env: dict[str, str] | None = None) -> str:
        """Another gateway replica (``gateway#<name>``) on its own port, with extra settings; its base URL."""
        port = free_port()
        self.start(f"gateway#{name}", {**(env or {}), "FLOWMESH_HTTP_PORT": str(port)})
        return f"http://127.0.0.1:{port}"

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs.pop(name)
        proc.send_signal(sig)
        proc.wait(15)

    def __enter__(self) -> ProcessStack:
        """Every service started and ready (stopped again if that fails)."""
        try:
            self.start_all()
            self.wait_ready()
        except BaseException:
            self.stop_all()
            raise
        return self

    def __exit__(self, *_: object) -> None:
        self.stop_all()

    def stop_all(self) -> None:
        for name in list(self.procs):
            proc = self.procs[name]
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for name, proc in list(self.procs.items()):
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
            del self.procs[name]

    def logs(self, name: str) -> str:
        path = self.workdir / f"{name}.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def wait_ready(self, timeout: float = 90, base: str | None = None) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self.logs(name)}")
            try:
                r = httpx.get((base or self.base) + "/readyz", timeout=2)
                if r.status_code == 200:
                    return
                last = r.text
            except httpx.HTTPError as exc:
                last = str(exc)
            time.sleep(0.2)
        raise TimeoutError(f"stack not ready after {timeout}s: {last}")

    def metrics_url(self, name: str) -> str:
        """Where a service process serves ``/metrics``: the gateway's API port (dev), the others' health port."""
        if name.split("#")[0] == "gateway":
            return self.base + "/metrics"
        return f"http://127.0.0.1:{self.health_ports[name]}/metrics"

    def client(self, sub: str = "alice", **kw: object) -> httpx.Client:
        return httpx.Client(
            base_url=self.base + "/api/v1", timeout=15, headers={"Authorization": "Bearer " + token(sub, **kw)}
        )  # type: ignore[arg-type]


FINAL = ("succeeded", "failed", "cancelled", "timedOut")


def wait_run(c: httpx.Client, run_id: str, *, timeout: float = 30, until: tuple[str, ...] = FINAL) -> dict:  # type: ignore[type-arg]
    """Poll a run until its status is one of ``until`` (bounded)."""
    deadline = time.monotonic() + timeout
    run: dict = {}  # type: ignore[type-arg]
    while time.monotonic() < deadline:
        r = c.get(f"/runs/{run_id}")
        if r.status_code in (502, 503, 504):
            time.sleep(0.1)
            continue
        assert r.status_code == 200, r.text
        run = r.json()
        if run["status"] in until:
            return run
        time.sleep(0.05)
    raise TimeoutError(f"run {run_id} still {run.get('status')} after {timeout}s: {run}")


def publish_flow(c: httpx.Client, definition: dict, **body: object) -> str:  # type: ignore[type-arg]
    """Create and publish a flow; its id."""
    r = c.post("/flows", json={"name": "f", "definition": definition, **body})
    assert r.status_code == 201, r.text
    flow_id: str = r.json()["id"]
    r = c.post(f"/flows/{flow_id}/publish")
    assert r.status_code == 201, r.text
    return flow_id


async def create_database(database_url: str, name: str) -> str:
    """A new, empty database ``name`` on the server of ``database_url``; its URL.

    For tests whose services must not share tables with another stack on the same server (two
    schedulers on one ``schedules`` table are replicas of each other, whatever NATS they use).
    """
    url = make_url(database_url)
    conn = await asyncpg.connect(url.set(drivername="postgresql").render_as_string(hide_password=False))
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return url.set(database=name).render_as_string(hide_password=False)


async def drop_database(database_url: str, name: str) -> None:
    """Drop a database made by :func:`create_database` (connections still open are closed)."""
    url = make_url(database_url)
    conn = await asyncpg.connect(url.set(drivername="postgresql").render_as_string(hide_password=False))
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


def fresh_database(database_url: str, name: str) -> str:
    """:func:`create_database` for synchronous tests."""
    return asyncio.run(create_database(database_url, name))


def remove_database(database_url: str, name: str) -> None:
    """:func:`drop_database` for synchronous tests."""
    asyncio.run(drop_database(database_url, name))


@contextlib.contextmanager
def isolated_stack(
    database_url: str,
    workdir: Path,
    *,
    env: dict[str, str] | None = None,
    replicas: dict[str, int] | None = None,
) -> Iterator[ProcessStack]:
    """Every service, ready, on a NATS server and a database of its own (removed afterwards).

    For tests whose services must not meet another stack's: a second scheduler on the same tables
    is one more replica, a runner with other settings would take the other stack's work.
    """
    nats_server = start_nats(workdir / "nats")
    db_name = f"e2e_{workdir.name.lower().replace('-', '_')}_{uuid.uuid4().hex[:8]}"
    try:
        url = fresh_database(database_url, db_name)
        try:
            with ProcessStack(nats_server.url, url, workdir, env=env, replicas=replicas) as s:
                yield s
        finally:
            remove_database(database_url, db_name)
    finally:
        nats_server.stop()


def bearer(c: httpx.Client) -> str:
    """The token a client made by :meth:`ProcessStack.client` sends."""
    return str(c.headers["Authorization"]).removeprefix("Bearer ")


def ws_url(stack: ProcessStack, path: str) -> str:
    return "ws://" + urlsplit(stack.base).netloc + path


def open_ws(stack: ProcessStack, path: str, c: httpx.Client | None, **kw: Any) -> ClientConnection:
    """A WebSocket to ``path``, authenticated with ``c``'s token (subprotocol ``bearer.<token>``) if given."""
    protocols = ["flowmesh.v1", "bearer." + bearer(c)] if c is not None else ["flowmesh.v1"]
    return connect(ws_url(stack, path), subprotocols=protocols, open_timeout=10, **kw)  # type: ignore[arg-type]


def refused(stack: ProcessStack, path: str, protocols: list[str], **kw: Any) -> int:
    """The HTTP status of a WebSocket handshake the gateway refuses (it must not upgrade)."""
    with pytest.raises(InvalidStatus) as exc:
        connect(ws_url(stack, path), subprotocols=protocols, open_timeout=10, **kw)  # type: ignore[arg-type]
    return exc.value.response.status_code


def std_sign(secret: str, msg_id: str, ts: int, body: bytes) -> str:
    """``v1,<base64 HMAC-SHA256(key, "{id}.{ts}.{body}")>`` with the key behind ``whsec_`` (Standard Webhooks)."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    mac = hmac.new(key, f"{msg_id}.{ts}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def signed_headers(secret: str, body: bytes, *, msg_id: str | None = None, ts: int | None = None) -> dict[str, str]:
    """The headers of a webhook delivery signed with ``secret``."""
    msg_id = msg_id or f"msg_{uuid.uuid4().hex}"
    ts = int(time.time()) if ts is None else ts
    return {
        "content-type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(ts),
        "webhook-signature": std_sign(secret, msg_id, ts, body),
    }
