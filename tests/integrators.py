"""What the tests of external events look at: the EVENTS stream, the runner's registry and consumer of it."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import asyncpg
import httpx
import nats
from nats.js.errors import NotFoundError

from flowmesh.contracts.streams import EVENTS, RUNNER_EVENTS
from flowmesh.contracts.subjects import PREFIX, tenant_token

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
