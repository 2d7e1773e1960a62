"""The runner's output limits are its settings: a step over ``step_output_max_bytes`` fails ``output-too-large``."""

from __future__ import annotations

from typing import Any

import pytest

from flowmesh.contracts.testing import linear, node
from flowmesh.runner.app import create_app
from flowmesh.runner.settings import RunnerSettings
from flowmesh.runtime.testing import FlowsStandIn, ServiceUnderTest
from flowmesh.runtime.testing import RunsClient as Runs

SETTINGS: dict[str, Any] = {
    "default_run_timeout_ms": 0,  # no run time limit: no timer per run, no scheduler needed
    "step_output_max_bytes": 4096,
    "run_output_max_bytes": 4096,
}


@pytest.fixture(scope="module")
def service_under_test() -> ServiceUnderTest[RunnerSettings]:
    return ServiceUnderTest(create_app, RunnerSettings, SETTINGS)


async def test_a_step_output_over_the_setting_fails_the_run_with_output_too_large(
    runs: Runs, flows: FlowsStandIn
) -> None:
    copies = {f"f{i}": "{{ input.text }}" for i in range(10)}
    flow_id = flows.publish(runs.tenant, linear(node("copy", output=copies)))
    run = await runs.run(flow_id, {"text": "t" * 1000})
    assert run.status == "failed" and run.error is not None
    assert run.error.type == "output-too-large" and run.error.step_id == "copy"
    steps = await runs.steps(run.id)
    assert steps["copy"].output is None and steps["copy"].error is not None
    assert "over the limit of 4096 bytes" in steps["copy"].error.message
    small = await runs.run(flow_id, {"text": "t"})
    assert small.status == "succeeded" and small.output == dict.fromkeys(copies, "t")
