"""The scheduler in-process with the real flows service: cron triggers through their life.

(Its timers need no flows service: they are tested in the scheduler's own tests.)

Schedules are created, changed and removed through the flows service's API, so the scheduler
learns of them the way it does in production: announcements on ``fm.flows.>`` and lookups.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from typing import Any

import pytest

from flowmesh.cli.embedded import EmbeddedNats
from flowmesh.contracts.ids import format_time, utcnow
from flowmesh.contracts.subjects import FlowsOp
from flowmesh.runtime.service import ServiceRuntime
from flowmesh.scheduler.app import create_app as create_scheduler

Flows = Recorder = Any  # fixtures of conftest.py

S = timedelta(seconds=1)


@pytest.fixture(scope="module")
async def scheduler(
    own_nats: EmbeddedNats, own_db: str, flows_service: ServiceRuntime, settings_for: Any
) -> AsyncIterator[ServiceRuntime]:
    async with create_scheduler(settings_for(own_nats.url, own_db)).running() as service:
        yield service


pytestmark = pytest.mark.usefixtures("scheduler")


def assert_once_per_second(dues: list[datetime]) -> None:
    assert dues == sorted(dues)
    assert [b - a for a, b in itertools.pairwise(dues)] == [S] * (len(dues) - 1)


# --- cron triggers ------------------------------------------------------------------------------------


async def test_an_every_second_cron_fires_once_per_second(flows: Flows, recorder: Recorder) -> None:
    flow_id = await flows.flow()
    created = utcnow()
    trigger_id = await flows.schedule(flow_id)
    await recorder.wait(lambda: len(recorder.starts(trigger_id)) >= 4)
    seen = recorder.starts(trigger_id)
    dues = [recorder.due(s) for s in seen]
    assert_once_per_second(dues)
    assert dues[0] >= created + S
    assert len({s.msg_id for s in seen}) == len(seen), "a due time was published twice"
    for s in seen:
        assert s.msg_id == s.body["idempotencyKey"] == f"sched:{trigger_id}:{format_time(recorder.due(s))}"
        assert s.body["flowId"] == flow_id and s.body["triggerType"] == "schedule"
        fired = datetime.fromisoformat(s.body["input"]["firedAt"])
        assert timedelta(0) <= fired - recorder.due(s) < timedelta(milliseconds=300)
        assert s.at >= recorder.due(s).timestamp()


async def test_disabling_deleting_or_deactivating_stops_it_within_a_second(flows: Flows, recorder: Recorder) -> None:
    stops = {
        "disable": lambda trigger_id, flow_id: flows.patch_trigger(trigger_id, enabled=False),
        "delete trigger": lambda trigger_id, flow_id: flows.call(FlowsOp.TRIGGER_DELETE, {"triggerId": trigger_id}),
        "deactivate flow": lambda trigger_id, flow_id: flows.call(FlowsOp.DEACTIVATE, {"flowId": flow_id}),
        "delete flow": lambda trigger_id, flow_id: flows.call(FlowsOp.DELETE, {"flowId": flow_id, "force": True}),
    }
    running = {}
    for name in stops:
        flow_id = await flows.flow()
        running[name] = (await flows.schedule(flow_id), flow_id)
    await recorder.wait(lambda: all(recorder.starts(t) for t, _ in running.values()))
    stopped = {}
    for name, stop in stops.items():
        await stop(*running[name])
        stopped[name] = utcnow()
    await asyncio.sleep(2.2)
    for name, (trigger_id, _) in running.items():
        late = [recorder.due(s) for s in recorder.starts(trigger_id) if recorder.due(s) > stopped[name] + S]
        assert late == [], f"{name}: still fired {late}"


async def test_enabling_or_activating_again_resumes_a_second_later(flows: Flows, recorder: Recorder) -> None:
    flow_id = await flows.flow()
    disabled = await flows.schedule(flow_id)
    other_flow = await flows.flow()
    deactivated = await flows.schedule(other_flow)
    await flows.patch_trigger(disabled, enabled=False)
    await flows.call(FlowsOp.DEACTIVATE, {"flowId": other_flow})
    await asyncio.sleep(1.2)
    before = {t: len(recorder.starts(t)) for t in (disabled, deactivated)}
    resumed = {disabled: utcnow()}
    await flows.patch_trigger(disabled, enabled=True)
    resumed[deactivated] = utcnow()
    await flows.call(FlowsOp.ACTIVATE, {"flowId": other_flow})
    await recorder.wait(lambda: all(len(recorder.starts(t)) >= before[t] + 2 for t in before))
    for t in before:
        dues = [recorder.due(s) for s in recorder.starts(t)[before[t] :]]
        assert dues[0] >= resumed[t] + S
        assert_once_per_second(dues)


async def test_a_schedule_of_a_draft_fires_only_once_the_flow_is_published(flows: Flows, recorder: Recorder) -> None:
    flow_id = await flows.flow(publish=False)
    trigger_id = await flows.schedule(flow_id)
    await asyncio.sleep(1.8)
    assert recorder.starts(trigger_id) == []
    await flows.call(FlowsOp.PUBLISH, {"flowId": flow_id})
    published = utcnow()
    await recorder.wait(lambda: len(recorder.starts(trigger_id)) >= 1)
    assert recorder.due(recorder.starts(trigger_id)[0]) >= published + S


async def test_a_new_cron_takes_over_from_the_old_one(flows: Flows, recorder: Recorder) -> None:
    flow_id = await flows.flow()
    trigger_id = await flows.schedule(flow_id)
    await recorder.wait(lambda: len(recorder.starts(trigger_id)) >= 1)
    await flows.patch_trigger(trigger_id, config={"cron": "*/2 * * * * *"})
    changed = utcnow()
    await recorder.wait(lambda: sum(recorder.due(s) > changed + S for s in recorder.starts(trigger_id)) >= 2)
    later = [recorder.due(s) for s in recorder.starts(trigger_id) if recorder.due(s) > changed + S]
    assert all(d.second % 2 == 0 for d in later)
    assert [b - a for a, b in itertools.pairwise(later)] == [2 * S] * (len(later) - 1)
