"""Steps executed by the replica whose change made them ready: no work message on ``STEP_WORK``.

The runner here has room for one such step at a time (``local_steps`` 1). The replica that creates a
run leases its first step in the creating statement and executes it; each step's result hands its
room to the next step of the chain. So a chain of ``http`` steps sends no work message at all, and a
run started while another's step holds the room sends its step as one (and still runs).
"""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
from nats.js import JetStreamContext

from flowmesh.contracts.streams import STEP_WORK
from flowmesh.contracts.testing import http_step, linear
from flowmesh.runner.settings import RunnerSettings
from flowmesh.runtime.testing import FlowsStandIn, ServiceUnderTest
from flowmesh.runtime.testing import RunsClient as Runs
from upstream import Upstream


@pytest.fixture(scope="module")
def service_under_test(service_under_test: ServiceUnderTest[RunnerSettings]) -> ServiceUnderTest[RunnerSettings]:
    """The runner executing at most one step at a time itself."""
    return dataclasses.replace(service_under_test, overrides={**service_under_test.overrides, "local_steps": 1})


async def work_published(js: JetStreamContext) -> int:
    """Messages ever published on ``STEP_WORK`` (its last sequence: delivered ones are removed)."""
    return (await js.stream_info(STEP_WORK.name)).state.last_seq


async def test_a_chain_of_io_steps_sends_no_work_message(
    runs: Runs, flows: FlowsStandIn, js: JetStreamContext, upstream: Upstream
) -> None:
    path = f"/chain/{runs.tenant}"
    flow_id = flows.publish(runs.tenant, linear(*(http_step(f"s{i}", upstream.base + path) for i in range(3))))
    before = await work_published(js)
    run = await runs.wait((await runs.start(flow_id)).run.id)
    assert run.status == "succeeded"
    assert sum(r["path"] == path for r in upstream.requests) == 3
    assert all(step.attempt == 1 for step in (await runs.steps(run.id)).values() if step.step_id != "start")
    assert await work_published(js) == before


async def test_a_step_beyond_the_room_goes_as_a_work_message_and_runs(
    runs: Runs, flows: FlowsStandIn, js: JetStreamContext, upstream: Upstream
) -> None:
    hold = f"room-{runs.tenant}"
    holding = flows.publish(runs.tenant, linear(http_step("call", f"{upstream.base}/hold/{hold}")))
    path = f"/beyond/{runs.tenant}"
    other = flows.publish(runs.tenant, linear(http_step("call", upstream.base + path)))
    first = await runs.start(holding)
    deadline = asyncio.get_running_loop().time() + 10
    while not any(r["path"] == f"/hold/{hold}" for r in upstream.requests):  # its step holds the room
        assert asyncio.get_running_loop().time() < deadline, "the first run's step never started"
        await asyncio.sleep(0.02)
    before = await work_published(js)
    second = await runs.wait((await runs.start(other)).run.id)
    assert second.status == "succeeded" and sum(r["path"] == path for r in upstream.requests) == 1
    assert await work_published(js) == before + 1
    upstream.release(hold)
    assert (await runs.wait(first.run.id)).status == "succeeded"
