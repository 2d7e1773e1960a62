"""Starting runs, in-process: ``fm.rpc.runs.start`` as the gateway calls it, ``fm.cmd.runs.start`` as
the scheduler sends it, the run's events on ``RUN_EVENTS``, and the refusals a start can meet."""

from __future__ import annotations

import asyncio
import time

import orjson
import pytest
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy

from flowmesh.contracts import headers
from flowmesh.contracts.errors import Conflict, InvalidInput, NotFound
from flowmesh.contracts.ids import new_id
from flowmesh.contracts.models import Run
from flowmesh.contracts.models.rpc import StartRun
from flowmesh.contracts.streams import RUN_EVENTS
from flowmesh.contracts.subjects import RUN_START_CMD, run_events_of_run
from flowmesh.contracts.testing import chain, echo
from flowmesh.runtime.testing import FlowsStandIn
from flowmesh.runtime.testing import RunsClient as Runs


async def test_a_chain_runs_to_its_output_with_gap_free_events(runs: Runs, flows: FlowsStandIn) -> None:
    flow_id = flows.publish(runs.tenant, chain(3))
    started = await runs.start(flow_id, {"v": 10})
    assert started.created and started.run.status == "queued" and started.run.trigger_type == "manual"
    run = await runs.wait(started.run.id)
    assert run.status == "succeeded" and run.output == {"v": 13} and run.version == 1
    steps = await runs.steps(run.id)
    assert {k: s.status for k, s in steps.items()} == dict.fromkeys(("start", "s0", "s1", "s2"), "succeeded")
    assert steps["s2"].output == {"v": 13}
    events = await runs.events(run.id)
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert events[0]["type"] == "run.queued" and events[-1]["type"] == "run.succeeded"


async def test_the_same_idempotency_key_gives_the_same_run(runs: Runs, flows: FlowsStandIn) -> None:
    flow_id = flows.publish(runs.tenant, echo())
    first = await runs.start(flow_id, {"a": 1}, idempotencyKey="k-1")
    again = await runs.start(flow_id, {"a": 1}, idempotencyKey="k-1")
    assert first.created and not again.created and again.run.id == first.run.id
    with pytest.raises(InvalidInput, match="another input"):  # the same key with another input
        await runs.start(flow_id, {"a": 2}, idempotencyKey="k-1")
    assert (await runs.wait(first.run.id)).output == {"a": 1}


async def test_a_start_is_refused_for_unknown_deactivated_or_mismatched_flows(runs: Runs, flows: FlowsStandIn) -> None:
    with pytest.raises(NotFound):
        await runs.start(new_id())
    with pytest.raises(NotFound):  # another tenant's flow
        await runs.start(flows.publish("someone-else", echo()))
    with pytest.raises(Conflict):
        await runs.start(flows.publish(runs.tenant, echo(), active=False))
    schema = {"type": "object", "required": ["n"], "properties": {"n": {"type": "integer"}}}
    typed = flows.publish(runs.tenant, echo(), input_schema=schema)
    with pytest.raises(InvalidInput) as err:
        await runs.start(typed, {"n": "one"})
    assert [e.path for e in err.value.errors or []] == ["/input/n"]
    assert (await runs.run(typed, {"n": 1})).output == {"n": 1}


async def run_with_key(runs: Runs, flow_id: str, key: str, timeout: float = 10.0) -> Run:
    deadline = time.monotonic() + timeout
    while not (found := [r for r in await runs.of_flow(flow_id) if r.idempotency_key == key]):
        assert time.monotonic() < deadline, f"no run with key {key} after {timeout} s"
        await asyncio.sleep(0.05)
    [run] = found
    return await runs.wait(run.id)


async def test_a_durable_start_command_runs_once_whatever_the_repeats(
    runs: Runs, flows: FlowsStandIn, js: JetStreamContext
) -> None:
    flow_id = flows.publish(runs.tenant, echo())
    key = f"sched:{new_id()}"
    command = StartRun(flow_id=flow_id, input={"tick": 1}, trigger_type="schedule", idempotency_key=key)
    hdrs = {headers.TENANT: runs.tenant, headers.SCHEMA: headers.SCHEMA_VERSION}
    for n in range(3):  # a sender re-sending (another msg id each time: JetStream does not drop them)
        await js.publish(
            RUN_START_CMD,
            command.model_dump_json(by_alias=True).encode(),
            headers=hdrs | {headers.MSG_ID: f"{key}:{n}"},
        )
    run = await run_with_key(runs, flow_id, key)
    assert run.status == "succeeded" and run.output == {"tick": 1} and run.trigger_type == "schedule"
    await asyncio.sleep(0.5)
    assert [r.id for r in await runs.of_flow(flow_id)] == [run.id]


async def test_a_runs_events_reach_the_run_events_stream_in_order(
    runs: Runs, flows: FlowsStandIn, js: JetStreamContext
) -> None:
    run = await runs.run(flows.publish(runs.tenant, chain(2)), {"v": 0})
    sub = await js.pull_subscribe(
        run_events_of_run(runs.tenant, run.flow_id, run.id),
        stream=RUN_EVENTS.name,
        config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL, inactive_threshold=10),
    )
    stored = await runs.events(run.id)
    seen: list[dict[str, object]] = []
    deadline = time.monotonic() + 10
    while len(seen) < len(stored):
        assert time.monotonic() < deadline, f"{len(seen)} of {len(stored)} events on the stream"
        try:
            seen += [orjson.loads(m.data) for m in await sub.fetch(100, timeout=0.5)]
        except TimeoutError:
            continue
    await sub.unsubscribe()
    assert [e["seq"] for e in seen] == [e["seq"] for e in stored]
    assert [e["type"] for e in seen] == [e["type"] for e in stored]
