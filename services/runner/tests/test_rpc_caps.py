"""A plan's caps on a run, in-process (P9): foreach items, child runs per run, step and run outputs.

The caps come as the usage service gives them, in the tenant's ``fm_quota`` snapshot; the runner
follows the bucket. Over a cap, the step fails ``limit-exceeded`` (children) or ``output-too-large``
(outputs) naming the cap and the plan; at the cap, the run goes as before.
"""

from __future__ import annotations

import asyncio
import time

from nats.js import JetStreamContext

from flowmesh.contracts.models import Run
from flowmesh.contracts.models.usage import PlanCaps
from flowmesh.contracts.testing import foreach, linear, node, subflow
from flowmesh.runtime.testing import FlowsStandIn, put_caps
from flowmesh.runtime.testing import RunsClient as Runs

ECHO = linear(node("echo", output="{{ input.item }}"))


async def capped(runs: Runs, js: JetStreamContext, flows: FlowsStandIn, caps: PlanCaps) -> str:
    """Give the test's tenant ``caps`` (foreach items among them) and wait until the runner applies them.

    Returns the child flow the tests iterate over. The wait is a run over the foreach cap, which
    starts no child once the caps are known (and children of a trivial flow before).
    """
    assert caps.foreach_items is not None
    child = flows.publish(runs.tenant, ECHO)
    probe = flows.publish(runs.tenant, linear(foreach("each", child, "input.xs")))
    await put_caps(js, runs.tenant, caps)
    deadline = time.monotonic() + 10
    while True:
        run = await runs.run(probe, {"xs": list(range(caps.foreach_items + 1))})
        if run.error is not None and run.error.type == "limit-exceeded":
            return child
        assert time.monotonic() < deadline, f"the caps never applied: {run}"
        await asyncio.sleep(0.05)


def refused(run: Run, step_id: str, error_type: str) -> str:
    assert run.status == "failed" and run.error is not None, run
    assert run.error.type == error_type and run.error.step_id == step_id, run.error
    return run.error.message


async def test_a_foreach_over_the_plans_items_starts_no_child_and_at_the_cap_runs_them_all(
    runs: Runs, js: JetStreamContext, flows: FlowsStandIn
) -> None:
    child = await capped(runs, js, flows, PlanCaps(foreach_items=3))
    parent = flows.publish(runs.tenant, linear(foreach("each", child, "input.xs", concurrency=5)))

    over = await runs.run(parent, {"xs": [1, 2, 3, 4]})
    message = refused(over, "each", "limit-exceeded")
    assert message == "step 'each': 4 items, over the tiny plan's cap of 3 foreach items"
    assert not [k for k in await runs.of_flow(child) if k.parent_run_id == over.id]

    at = await runs.run(parent, {"xs": [1, 2, 3]})
    assert at.status == "succeeded" and at.output == [1, 2, 3], at


async def test_the_children_of_a_run_are_capped_across_its_steps(
    runs: Runs, js: JetStreamContext, flows: FlowsStandIn
) -> None:
    child = await capped(runs, js, flows, PlanCaps(foreach_items=10, children_per_run=4))
    parent = flows.publish(
        runs.tenant,
        linear(
            foreach("first", child, "input.xs", concurrency=3),
            subflow("one", child, {"item": "one"}),
            foreach("then", child, "input.ys", concurrency=3),
        ),
    )
    at = await runs.run(parent, {"xs": [1, 2], "ys": [3]})  # 2 + 1 + 1 = 4 children
    assert at.status == "succeeded" and at.output == [3], at

    over = await runs.run(parent, {"xs": [1, 2], "ys": [3, 4]})  # 2 + 1 + 2 = 5
    message = refused(over, "then", "limit-exceeded")
    assert message == (
        "step 'then' would start 2 child runs after the 3 this run started: "
        "over the tiny plan's cap of 4 child runs per run"
    )
    assert len([k for k in await runs.of_flow(child) if k.parent_run_id == over.id]) == 3

    alone = await runs.run(parent, {"xs": [1, 2, 3, 4], "ys": []})  # the subflow is the fifth
    assert refused(alone, "one", "limit-exceeded").startswith("step 'one' would start 1 child run after the 4")


async def test_the_plans_output_caps_lower_the_runners_limits(
    runs: Runs, js: JetStreamContext, flows: FlowsStandIn
) -> None:
    await capped(runs, js, flows, PlanCaps(foreach_items=1, step_output_bytes=50, run_output_bytes=40))
    twice = {"a": "{{ input.x }}", "b": "{{ input.x }}"}  # the input (the trigger's output) stays small
    flow = flows.publish(runs.tenant, linear(node("copy", output=twice)))

    step_over = await runs.run(flow, {"x": "y" * 18})  # 51 bytes as JSON
    assert refused(step_over, "copy", "output-too-large") == (
        "step 'copy': its output is 51 bytes, over the tiny plan's limit of 50 bytes"
    )
    run_over = await runs.run(flow, {"x": "y" * 13})  # 41 bytes: the step's fine, the run's not
    assert run_over.status == "failed" and run_over.error is not None
    assert run_over.error.type == "output-too-large" and run_over.error.step_id is None
    assert run_over.error.message == "the run's output is 41 bytes, over the tiny plan's limit of 40 bytes"

    at = await runs.run(flow, {"x": "y" * 12})  # 39 bytes: under both caps
    assert at.status == "succeeded" and at.output == {"a": "y" * 12, "b": "y" * 12}
