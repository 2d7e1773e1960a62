"""Recovery by the sweep, in-process: a run whose step work never reached a worker still finishes.

The work is lost for real: the runner's step consumer is paused (JetStream keeps the message from
every worker), the ``STEP_WORK`` stream is purged, then the consumer resumes with nothing to deliver.
Only the sweep, which finds the step dispatched too long ago, can send the work again.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest
from nats.js import JetStreamContext

from flowmesh.contracts.streams import RUNNER_STEPS, STEP_WORK
from flowmesh.contracts.subjects import RunsOp
from flowmesh.contracts.testing import http_step, linear, node
from flowmesh.runner.settings import RunnerSettings
from flowmesh.runtime.testing import FlowsStandIn, ServiceUnderTest
from flowmesh.runtime.testing import RunsClient as Runs
from upstream import Upstream

STALLED_STEP = timedelta(seconds=2)  # the runner's stalled_step_s in this directory's conftest


@pytest.fixture(scope="module")
def service_under_test(service_under_test: ServiceUnderTest[RunnerSettings]) -> ServiceUnderTest[RunnerSettings]:
    """The runner sending every step as a work message, even those it could execute itself: these tests lose them."""
    return dataclasses.replace(service_under_test, overrides={**service_under_test.overrides, "local_steps": 0})


@contextlib.asynccontextmanager
async def work_lost(js: JetStreamContext) -> AsyncIterator[None]:
    """No step work published in the block reaches a worker: it is held back, then purged."""
    until = (datetime.now(UTC) + timedelta(minutes=2)).strftime("%Y-%m-%dT%H:%M:%SZ")
    await js.pause_consumer(STEP_WORK.name, RUNNER_STEPS.durable, until)
    try:
        yield
        deadline = time.monotonic() + 5
        while (await js.stream_info(STEP_WORK.name)).state.messages == 0:
            assert time.monotonic() < deadline, "no step work was published"
            await asyncio.sleep(0.02)
        await js.purge_stream(STEP_WORK.name)
    finally:
        await js.resume_consumer(STEP_WORK.name, RUNNER_STEPS.durable)


def calls_to(upstream: Upstream, path: str) -> int:
    return sum(r["path"] == path for r in upstream.requests)


async def test_a_dispatched_step_whose_work_was_lost_is_sent_again_by_the_sweep(
    runs: Runs, flows: FlowsStandIn, js: JetStreamContext, upstream: Upstream
) -> None:
    path = f"/lost-at-start/{runs.tenant}"
    flow_id = flows.publish(
        runs.tenant,
        linear(http_step("call", upstream.base + path), node("after", output="{{ steps.call.output.status }}")),
    )
    async with work_lost(js):
        started = await runs.start(flow_id)
    lost = datetime.now(UTC)
    assert (await runs.get(started.run.id)).status in ("queued", "running")
    run = await runs.wait(started.run.id)
    assert run.status == "succeeded" and run.output == 200
    assert calls_to(upstream, path) == 1
    step = (await runs.steps(run.id))["call"]
    assert step.status == "succeeded" and step.attempt == 1
    assert step.completed_at is not None and step.completed_at >= lost + STALLED_STEP - timedelta(seconds=1)


async def test_work_lost_after_an_approval_is_sent_again_by_the_sweep(
    runs: Runs, flows: FlowsStandIn, js: JetStreamContext, upstream: Upstream
) -> None:
    path = f"/lost-after-approval/{runs.tenant}"
    flow_id = flows.publish(runs.tenant, linear(node("ok", "approval"), http_step("call", upstream.base + path)))
    started = await runs.start(flow_id)
    await runs.wait(started.run.id, until=("waiting",))
    async with work_lost(js):
        resumed = await runs.rpc.call(
            RunsOp.RESUME, {"runId": started.run.id, "stepId": "ok", "decision": "approved"}, tenant=runs.tenant
        )
        assert resumed["status"] == "running"
    run = await runs.wait(started.run.id)
    assert run.status == "succeeded" and calls_to(upstream, path) == 1
    steps = await runs.steps(run.id)
    assert steps["ok"].output is not None and steps["ok"].output["decision"] == "approved"
