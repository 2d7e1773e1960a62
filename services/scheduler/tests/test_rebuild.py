"""A scheduler that missed flow announcements rebuilds its schedules from the flows service on start."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import nats
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from flowmesh.cli.embedded import EmbeddedNats
from flowmesh.contracts.ids import utcnow
from flowmesh.contracts.streams import FLOWS, SCHEDULER_FLOWS
from flowmesh.contracts.subjects import FlowsOp
from flowmesh.runtime.service import ServiceRuntime
from flowmesh.scheduler.app import create_app as create_scheduler

S = timedelta(seconds=1)


async def stored_triggers(database_url: str) -> set[str]:
    engine = create_async_engine(database_url)
    try:
        async with engine.connect() as conn:
            rows = await conn.execute(text("SELECT trigger_id FROM scheduler.schedules WHERE next_due_at IS NOT NULL"))
            return {str(r[0]) for r in rows}
    finally:
        await engine.dispose()


async def test_announcements_lost_while_down_are_rebuilt_on_start(
    own_nats: EmbeddedNats,
    own_db: str,
    flows_service: ServiceRuntime,
    settings_for: Any,
    flows: Any,
    recorder: Any,
) -> None:
    flow_id = await flows.flow()
    keep, disable, delete = [await flows.schedule(flow_id) for _ in range(3)]
    async with create_scheduler(settings_for(own_nats.url, own_db)).running():
        await recorder.wait(lambda: all(recorder.starts(t) for t in (keep, disable, delete)))

    # while no scheduler runs: changes, then their announcements vanish (expired, or the stream purged)
    await flows.patch_trigger(disable, enabled=False)
    await flows.call(FlowsOp.TRIGGER_DELETE, {"triggerId": delete})
    added = await flows.schedule(flow_id)
    other = await flows.schedule(await flows.flow())
    changed = utcnow()
    nc = await nats.connect(own_nats.url)
    try:
        js = nc.jetstream()
        await js.purge_stream(FLOWS.name)
        await js.delete_consumer(FLOWS.name, SCHEDULER_FLOWS.durable)
    finally:
        await nc.close()

    async with create_scheduler(settings_for(own_nats.url, own_db)).running():
        await recorder.wait(lambda: bool(recorder.starts(added)) and bool(recorder.starts(other)))
        await asyncio.sleep(1.1)
        assert await stored_triggers(own_db) == {keep, added, other}
    for gone in (disable, delete):
        assert all(recorder.due(s) <= changed + S for s in recorder.starts(gone))
