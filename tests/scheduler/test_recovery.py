"""Recovery: schedules rebuilt after lost announcements, fires JetStream did not acknowledge sent again."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections import Counter
from datetime import datetime, timedelta
from typing import Any

import asyncpg
import nats
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from flowmesh.cli.embedded import EmbeddedNats
from flowmesh.contracts.ids import utcnow
from flowmesh.contracts.streams import FLOWS, RUN_CMDS, SCHEDULER_FLOWS
from flowmesh.contracts.subjects import RUN_START_CMD, FlowsOp
from flowmesh.runtime.db import dsn
from flowmesh.runtime.nats import provision_streams
from flowmesh.runtime.service import ServiceRuntime
from flowmesh.scheduler.app import create_app as create_scheduler

S = timedelta(seconds=1)


async def stored_triggers(database_url: str) -> set[str]:
    conn = await asyncpg.connect(dsn(database_url))
    try:
        rows = await conn.fetch("SELECT trigger_id FROM scheduler.schedules WHERE next_due_at IS NOT NULL")
        return {str(r[0]) for r in rows}
    finally:
        await conn.close()


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


async def stored_dues(nats_url: str, trigger_id: str) -> list[datetime]:
    """The due times of one trigger's run starts JetStream holds in ``RUN_CMDS`` (duplicates kept)."""
    nc = await nats.connect(nats_url)
    found: list[datetime] = []
    try:
        js = nc.jetstream()
        sub = await js.pull_subscribe(
            RUN_START_CMD,
            stream=RUN_CMDS.name,
            config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, deliver_policy=DeliverPolicy.ALL),
        )
        while True:
            try:
                msgs = await sub.fetch(100, timeout=0.5)
            except TimeoutError:
                break
            for m in msgs:
                body = json.loads(m.data)
                if body["triggerId"] == trigger_id:
                    found.append(datetime.fromisoformat(body["input"]["scheduledAt"]))
    finally:
        await nc.close()
    return sorted(found)


async def test_a_fire_jetstream_did_not_acknowledge_is_sent_again_with_the_same_key(
    own_nats: EmbeddedNats,
    own_db: str,
    flows_service: ServiceRuntime,
    settings_for: Any,
    flows: Any,
    recorder: Any,
) -> None:
    flow_id = await flows.flow()
    trigger_id = await flows.schedule(flow_id)
    nc = await nats.connect(own_nats.url)
    js = nc.jetstream()
    try:
        async with create_scheduler(settings_for(own_nats.url, own_db, lease_s=0.5)).running():
            await recorder.wait(lambda: bool(recorder.starts(trigger_id)))
            # the run-start stream is gone for a moment: fires are sent but nothing acknowledges them
            await js.delete_stream(RUN_CMDS.name)
            lost = utcnow()
            await recorder.wait(lambda: sum(recorder.due(s) > lost for s in recorder.starts(trigger_id)) >= 2)
            await provision_streams(js, [RUN_CMDS])
            back = utcnow()
            await recorder.wait(lambda: any(recorder.due(s) > back + S for s in recorder.starts(trigger_id)))
    finally:
        await nc.close()
    dues = await stored_dues(own_nats.url, trigger_id)
    # every due time since the stream vanished is stored once: the unacknowledged ones were sent again
    assert dues and dues[0] <= lost + S
    assert [b - a for a, b in itertools.pairwise(dues)] == [S] * (len(dues) - 1)
    unconfirmed = [s for s in recorder.starts(trigger_id) if lost < recorder.due(s) < back]
    keys = Counter(s.msg_id for s in unconfirmed)
    assert max(keys.values()) >= 2, "an unacknowledged fire was not sent again"
