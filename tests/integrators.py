"""What the tests of external events look at: the EVENTS stream, the runner's registry and consumer of it."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import nats
from nats.js.errors import NotFoundError

from flowmesh.cli.embedded import free_port, nats_server_binary
from flowmesh.cli.natsconf import password_var, render_auth_config
from flowmesh.contracts.permissions import SERVICES, integrator_user
from flowmesh.contracts.streams import EVENTS, RUNNER_EVENTS
from flowmesh.contracts.subjects import PREFIX, tenant_token
from stack import ProcessStack

T = {"id": "start", "type": "trigger", "data": {}}


def edge(source: str, target: str, handle: str | None = None) -> dict[str, Any]:
    e = {"id": f"{source}-{target}", "source": source, "target": target}
    return {**e, "sourceHandle": handle} if handle else e


def greeting_flow() -> dict[str, Any]:
    """A flow that answers ``{hello: input.name}``."""
    return {
        "nodes": [T, {"id": "hi", "type": "transform", "data": {"output": {"hello": "{{ input.name }}"}}}],
        "edges": [edge("start", "hi")],
    }


def waiting_flow(event_type: str) -> dict[str, Any]:
    """A flow that waits for an ``event_type`` event of its order, then answers the event's total."""
    return {
        "nodes": [
            T,
            {
                "id": "paid",
                "type": "waitEvent",
                "data": {"eventType": event_type, "match": "event.orderId == input.orderId"},
            },
            {"id": "done", "type": "transform", "data": {"output": {"total": "{{ steps.paid.output.total }}"}}},
        ],
        "edges": [edge("start", "paid"), edge("paid", "done")],
    }


def unique_event_type(prefix: str = "order") -> str:
    return f"{prefix}.{uuid.uuid4().hex[:8]}"


def tenant_of(c: httpx.Client, flow_id: str) -> str:
    return str(c.get(f"/flows/{flow_id}").json()["tenantId"])


def add_event_trigger(c: httpx.Client, database_url: str, flow_id: str, event_type: str, **config: Any) -> str:
    """An ``event`` trigger on the flow, once the runner knows of it (before, its events start nothing)."""
    r = c.post(
        f"/flows/{flow_id}/triggers",
        json={"type": "event", "name": "on-event", "config": {"eventType": event_type, **config}},
    )
    assert r.status_code == 201, r.text
    trigger_id: str = r.json()["id"]
    _wait_for_registry(database_url, trigger_id)
    return trigger_id


def _wait_for_registry(database_url: str, trigger_id: str, timeout: float = 20) -> None:
    async def known() -> bool:
        conn = await asyncpg.connect(database_url.replace("postgresql+asyncpg", "postgresql"))
        try:
            found = await conn.fetchval("SELECT enabled FROM runner.event_triggers WHERE trigger_id = $1", trigger_id)
        finally:
            await conn.close()
        return found is True

    deadline = time.monotonic() + timeout
    while not asyncio.run(known()):
        assert time.monotonic() < deadline, "the runner never learned of the trigger"
        time.sleep(0.1)


def stored_events(nats_url: str, tenant: str) -> dict[str, int]:
    """How many messages the EVENTS stream holds per subject of the tenant."""

    async def read() -> dict[str, int]:
        nc = await nats.connect(nats_url)
        try:
            info = await nc.jetstream().stream_info(
                EVENTS.name, subjects_filter=f"{PREFIX}.events.{tenant_token(tenant)}.>"
            )
            return dict(info.state.subjects or {})
        finally:
            await nc.close()

    return asyncio.run(read())


def last_event(nats_url: str, subject: str) -> tuple[dict[str, str], bytes] | None:
    """The headers and data of the last message on ``subject`` in EVENTS (None: there is none)."""

    async def read() -> tuple[dict[str, str], bytes] | None:
        nc = await nats.connect(nats_url)
        try:
            msg = await nc.jetstream().get_last_msg(EVENTS.name, subject)
        except NotFoundError:
            return None
        finally:
            await nc.close()
        return dict(msg.headers or {}), msg.data or b""

    return asyncio.run(read())


def events_handled(nats_url: str, timeout: float = 20) -> None:
    """Wait until the runner's consumer of EVENTS has acknowledged everything published so far."""

    async def pending() -> int:
        nc = await nats.connect(nats_url)
        try:
            info = await nc.jetstream().consumer_info(RUNNER_EVENTS.stream, RUNNER_EVENTS.durable)
            return int(info.num_pending or 0) + int(info.num_ack_pending or 0)
        finally:
            await nc.close()

    deadline = time.monotonic() + timeout
    while asyncio.run(pending()):
        assert time.monotonic() < deadline, "the runner did not get through the events"
        time.sleep(0.05)


def runs_of(c: httpx.Client, flow_id: str, *, at_least: int, timeout: float = 20) -> list[dict[str, Any]]:
    """The flow's runs once there are ``at_least`` finished ones (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        items: list[dict[str, Any]] = c.get("/runs", params={"flowId": flow_id, "pageSize": 100}).json()["items"]
        if sum(r["status"] in ("succeeded", "failed") for r in items) >= at_least:
            return items
        assert time.monotonic() < deadline, f"{len(items)} runs of {flow_id} after {timeout}s: {items}"
        time.sleep(0.05)


@dataclass
class LockedNats:
    """A nats-server whose only users are those of ``flowmesh nats-config`` (no anonymous connections)."""

    url: str
    passwords: dict[str, str]


@contextlib.contextmanager
def locked_nats(root: Path, integrators: tuple[str, ...]) -> Iterator[LockedNats]:
    """A nats-server (JetStream) with a user per service and per integrator of ``integrators``, as deployed."""
    root.mkdir(parents=True, exist_ok=True)
    users = [*SERVICES, *(integrator_user(t) for t in integrators)]
    passwords = {user: f"pw-{user}-{uuid.uuid4().hex}" for user in users}
    (root / "auth.conf").write_text(render_auth_config(integrators))
    port, monitor = free_port(), free_port()
    (root / "nats.conf").write_text(
        f"listen: 127.0.0.1:{port}\nhttp: 127.0.0.1:{monitor}\n"
        f'jetstream {{ store_dir: "{root / "js"}" }}\ninclude ./auth.conf\n'
    )
    log = root / "nats.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [str(nats_server_binary()), "-c", str(root / "nats.conf")],
            env={password_var(user): pw for user, pw in passwords.items()},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 20
        while True:
            assert process.poll() is None, log.read_text()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{monitor}/healthz?js-enabled-only=true", timeout=1):
                    break
            except OSError:
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.05)
        yield LockedNats(f"nats://127.0.0.1:{port}", passwords)
    finally:
        process.terminate()
        process.wait(10)


class LockedStack(ProcessStack):
    """Every service connecting to a :func:`locked_nats` server as its own user, as ``make cluster`` runs them."""

    def __init__(self, nats: LockedNats, database_url: str, workdir: Path) -> None:
        super().__init__(nats.url, database_url, workdir)
        self.passwords = nats.passwords

    def start_all(self) -> None:
        for name in self.services:
            user = name.split("#")[0]
            self.start(name, {"FLOWMESH_NATS_USER": user, "FLOWMESH_NATS_PASSWORD": self.passwords[user]})
