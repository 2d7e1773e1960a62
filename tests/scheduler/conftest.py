"""The scheduler and the flows service in-process, on a NATS and a database of their own.

These tests live here, not in the scheduler's own tests, because they use two services (schedules
are made through the flows service's API, as in production), and a service's tests import no other
service. Their own NATS and database, because two schedulers on one ``schedules`` table act as
replicas of each other, and two on one NATS share the flow announcements: another stack in the
session must not take our work.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import nats
import pytest
from nats.aio.msg import Msg

from flowmesh.cli.embedded import EmbeddedNats, start_nats
from flowmesh.contracts import headers
from flowmesh.contracts.subjects import RUN_START_CMD, FlowsOp
from flowmesh.contracts.testing import echo
from flowmesh.flows.app import create_app as create_flows
from flowmesh.flows.settings import FlowsSettings
from flowmesh.runtime.rpc import RpcClient
from flowmesh.runtime.service import ServiceRuntime
from flowmesh.runtime.testing import new_tenant, rpc_client, running_service, service_settings
from flowmesh.scheduler.settings import SchedulerSettings
from stack import create_database, drop_database

FLOW = echo()


@dataclass
class Seen:
    """One message seen on the wire (every publish, before JetStream's de-duplication)."""

    at: float
    subject: str
    msg_id: str
    body: dict[str, Any]


@dataclass
class Recorder:
    """Every run start published on the test NATS."""

    seen: list[Seen] = field(default_factory=list)

    async def handler(self, msg: Msg) -> None:
        hdrs = msg.headers or {}
        self.seen.append(Seen(time.time(), msg.subject, hdrs.get(headers.MSG_ID, ""), json.loads(msg.data)))

    def starts(self, trigger_id: str) -> list[Seen]:
        return [s for s in self.seen if s.subject == RUN_START_CMD and s.body.get("triggerId") == trigger_id]

    @staticmethod
    def due(seen: Seen) -> datetime:
        """The due time a run start is for."""
        return datetime.fromisoformat(seen.body["input"]["scheduledAt"])

    async def wait(self, done: Callable[[], bool], timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            if time.monotonic() > deadline:
                raise TimeoutError("condition not met in time")
            await asyncio.sleep(0.02)


def scheduler_settings(nats_url: str, database_url: str, **overrides: Any) -> SchedulerSettings:
    return service_settings(SchedulerSettings, nats_url, database_url, **overrides)


@pytest.fixture(scope="module")
def settings_for() -> Callable[..., SchedulerSettings]:
    """Scheduler settings for a NATS URL and a database URL, with overrides."""
    return scheduler_settings


@pytest.fixture(scope="module")
def own_nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedNats]:
    server = start_nats(tmp_path_factory.mktemp("nats"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
async def own_db(infra: Any) -> AsyncIterator[str]:
    name = f"scheduler_{uuid.uuid4().hex[:10]}"
    url = await create_database(infra.database_url, name)
    yield url
    await drop_database(infra.database_url, name)


@pytest.fixture(scope="module")
async def flows_service(own_nats: EmbeddedNats, own_db: str) -> AsyncIterator[ServiceRuntime]:
    async with running_service(create_flows, service_settings(FlowsSettings, own_nats.url, own_db)) as service:
        yield service


@pytest.fixture(scope="module")
async def rpc(own_nats: EmbeddedNats) -> AsyncIterator[RpcClient]:
    async with rpc_client(own_nats.url) as client:
        yield client


@pytest.fixture(scope="module")
async def recorder(own_nats: EmbeddedNats) -> AsyncIterator[Recorder]:
    rec = Recorder()
    nc = await nats.connect(own_nats.url)
    await nc.subscribe(RUN_START_CMD, cb=rec.handler)
    await nc.flush()
    yield rec
    await nc.close()


class Flows:
    """The flows service's real API for one tenant, as the gateway would call it."""

    def __init__(self, rpc: RpcClient, tenant: str) -> None:
        self.rpc = rpc
        self.tenant = tenant

    async def call(self, subject: str, body: dict[str, Any]) -> Any:
        return await self.rpc.call(subject, body, tenant=self.tenant)

    async def flow(self, *, publish: bool = True) -> str:
        flow = await self.call(FlowsOp.CREATE, {"name": "ticker", "definition": FLOW})
        if publish:
            await self.call(FlowsOp.PUBLISH, {"flowId": flow["id"]})
        return str(flow["id"])

    async def schedule(self, flow_id: str, cron: str = "* * * * * *", **config: Any) -> str:
        trigger = await self.call(
            FlowsOp.TRIGGER_CREATE,
            {"flowId": flow_id, "trigger": {"type": "schedule", "name": "tick", "config": {"cron": cron, **config}}},
        )
        return str(trigger["id"])

    async def patch_trigger(self, trigger_id: str, **patch: Any) -> None:
        await self.call(FlowsOp.TRIGGER_UPDATE, {"triggerId": trigger_id, "patch": patch})


@pytest.fixture
def flows(rpc: RpcClient) -> Flows:
    return Flows(rpc, new_tenant())
