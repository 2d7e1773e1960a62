"""The scheduler in-process (the test kit's ``service``, ``rpc``, ``tenant``), its fired timers recorded.

The scheduler reads schedules from the flows service (``fm.rpc.flows.schedules``), which these
tests do not start (a service's tests import no other service): a stand-in answers that no schedule
exists. Cron triggers made through the real flows service are tested in ``tests/scheduler``.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import nats
import pytest
from nats.aio.msg import Msg

from flowmesh.contracts import headers
from flowmesh.contracts.models.schedules import ScheduleSources
from flowmesh.contracts.subjects import TIMERS_FIRED_ALL, FlowsOp
from flowmesh.runtime.rpc import RpcContext
from flowmesh.runtime.service import ServiceRuntime
from flowmesh.runtime.testing import Infra, ServiceUnderTest, responder
from flowmesh.scheduler.app import create_app
from flowmesh.scheduler.settings import SchedulerSettings


async def no_schedules(_: RpcContext, __: Any) -> ScheduleSources:
    return ScheduleSources()


@pytest.fixture(scope="module")
async def flows_without_schedules(infra: Infra) -> AsyncIterator[None]:
    """``fm.rpc.flows.schedules`` answered as by a flows service holding no schedule trigger."""
    async with responder(infra.nats_url, "flows", {FlowsOp.SCHEDULES: no_schedules}, tenant_required=False):
        yield


@pytest.fixture(scope="module")
def service_under_test(flows_without_schedules: None) -> ServiceUnderTest[SchedulerSettings]:
    return ServiceUnderTest(create_app, SchedulerSettings)


@dataclass
class Fired:
    """One fired timer seen on the wire (every publish, before JetStream's de-duplication)."""

    at: float
    subject: str
    msg_id: str
    body: dict[str, Any]


@dataclass
class TimerRecorder:
    """Every timer fired on the test NATS."""

    seen: list[Fired] = field(default_factory=list)

    async def handler(self, msg: Msg) -> None:
        hdrs = msg.headers or {}
        self.seen.append(Fired(time.time(), msg.subject, hdrs.get(headers.MSG_ID, ""), json.loads(msg.data)))

    def timers(self, key: str) -> list[Fired]:
        return [s for s in self.seen if s.body.get("key") == key]

    async def wait(self, done: Callable[[], bool], timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            if time.monotonic() > deadline:
                raise TimeoutError("condition not met in time")
            await asyncio.sleep(0.02)


@pytest.fixture(scope="module")
async def recorder(infra: Infra, service: ServiceRuntime) -> AsyncIterator[TimerRecorder]:
    rec = TimerRecorder()
    nc = await nats.connect(infra.nats_url)
    await nc.subscribe(TIMERS_FIRED_ALL, cb=rec.handler)
    await nc.flush()
    yield rec
    await nc.close()
