"""Child runs, in-process: subflow and foreach steps start runs of other flows and take their outputs.

The child flows are "published" in the flows stand-in too: the runner asks ``fm.rpc.flows.runnable``
for a child's flow as for any other, in the parent's tenant.
"""

from __future__ import annotations

import asyncio
import time

from flowmesh.contracts.subjects import RunsOp
from flowmesh.contracts.testing import Definition, definition, edge, foreach, linear, node, subflow
from flowmesh.runtime.testing import FlowsStandIn
from flowmesh.runtime.testing import RunsClient as Runs


def doubling() -> Definition:
    """Doubles ``input.n``, or fails on ``n == 13``."""
    return definition(
        node("bad", "condition", expression="input.n == 13"),
        node("boom", "fail", message="unlucky {{ input.n }}"),
        node("double", output={"n": "{{ input.n * 2 }}"}),
        edges=[edge("start", "bad"), edge("bad", "boom", "true"), edge("bad", "double", "false")],
    )


async def test_a_subflow_runs_the_child_and_takes_its_output(runs: Runs, flows: FlowsStandIn) -> None:
    child = flows.publish(runs.tenant, doubling())
    parent = flows.publish(
        runs.tenant,
        linear(
            subflow("sub", child, {"n": "{{ input.n }}"}),
            node("after", output="{{ steps.sub.output.n + 1 }}"),
        ),
    )
    run = await runs.run(parent, {"n": 20})
    assert run.status == "succeeded" and run.output == 41
    [kid] = await runs.of_flow(child)
    assert kid.parent_run_id == run.id and kid.trigger_type == "subflow" and kid.output == {"n": 40}

    failed = await runs.run(parent, {"n": 13})
    assert failed.status == "failed" and failed.error is not None
    assert failed.error.type == "child-failed" and "unlucky 13" in failed.error.message


async def test_foreach_runs_a_child_per_item_in_order(runs: Runs, flows: FlowsStandIn) -> None:
    child = flows.publish(runs.tenant, doubling())
    parent = flows.publish(
        runs.tenant, linear(foreach("each", child, "input.xs", {"n": "{{ item + index }}"}, concurrency=2))
    )
    run = await runs.run(parent, {"xs": [1, 2, 3, 4, 5]})
    assert run.status == "succeeded", run
    assert run.output == [{"n": 2}, {"n": 6}, {"n": 10}, {"n": 14}, {"n": 18}]
    kids = await runs.of_flow(child)
    assert len(kids) == 5 and {k.parent_run_id for k in kids} == {run.id}
    assert (await runs.run(parent, {"xs": []})).output == []
    bad = await runs.run(parent, {"xs": [13, 0]})  # 13 + 0 fails
    assert bad.status == "failed" and bad.error is not None and bad.error.type == "child-failed"


async def test_a_child_of_a_flow_the_runner_cannot_start_fails_the_parent(runs: Runs, flows: FlowsStandIn) -> None:
    parent = flows.publish(runs.tenant, linear(subflow("sub", "0190a5b4-0000-7000-8000-00000000dead")))
    run = await runs.run(parent)
    assert run.status == "failed" and run.error is not None


async def test_cancelling_a_parent_cancels_its_children(runs: Runs, flows: FlowsStandIn) -> None:
    waiting = flows.publish(runs.tenant, linear(node("ok", "approval")))
    parent = flows.publish(runs.tenant, linear(subflow("sub", waiting)))
    started = await runs.start(parent)
    await runs.wait(started.run.id, until=("waiting",))
    deadline = time.monotonic() + 10
    while not (kids := await runs.of_flow(waiting)):
        assert time.monotonic() < deadline, "the child run was never created"
        await asyncio.sleep(0.05)
    await runs.wait(kids[0].id, until=("waiting",))
    cancelled = await runs.rpc.call(RunsOp.CANCEL, {"runId": started.run.id}, tenant=runs.tenant)
    assert cancelled["status"] == "cancelled"
    assert (await runs.wait(kids[0].id)).status == "cancelled"
