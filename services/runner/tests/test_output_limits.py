"""A step's recorded output and a run's output are limited; over the limit is ``output-too-large`` (P9)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from flowmesh.contracts.testing import edge as e
from flowmesh.contracts.testing import node as n
from flowmesh.runner.engine import OutputLimits, RunRecord, RunState
from flowmesh.runner.graph import Graph

NOW = datetime(2026, 1, 1, tzinfo=UTC)
TWICE = {"a": "{{ input.x }}", "b": "{{ input.x }}"}
"""An output twice the size of the input's ``x``: the trigger's output (the input) stays under the limit."""


def execution(
    nodes: list[dict[str, Any]], edges: list[dict[str, Any]], run_input: Any, limits: OutputLimits
) -> RunState:
    graph = Graph({"nodes": [n("start", "trigger"), *nodes], "edges": edges})
    run = RunRecord(
        id="r", tenant_id="t", flow_id="f", version=1, status="queued", trigger_type="manual",
        input=run_input, created_at=NOW,
    )  # fmt: skip
    return RunState(run, graph, {}, NOW, limits=limits)


def test_a_step_output_over_the_limit_fails_the_step_and_the_run_without_recording_it() -> None:
    ex = execution([n("copy", output=TWICE)], [e("start", "copy")], {"x": "y" * 30}, OutputLimits(50, 0))
    ex.advance()
    assert ex.steps["start"].status == "succeeded"
    copy = ex.steps["copy"]
    assert copy.status == "failed" and copy.output is None
    assert copy.error is not None and copy.error["type"] == "output-too-large"
    assert "over the limit of 50 bytes" in copy.error["message"]
    assert ex.run.status == "failed" and ex.run.error is not None
    assert ex.run.error["type"] == "output-too-large" and ex.run.error["stepId"] == "copy"
    assert [ev.type for ev in ex.events][-2:] == ["step.failed", "run.failed"]


def test_an_over_limit_step_with_on_error_continue_is_handled_like_any_failure() -> None:
    nodes = [n("copy", output=TWICE, onError="continue"), n("after", output="ok")]
    ex = execution(nodes, [e("start", "copy"), e("copy", "after")], {"x": "y" * 30}, OutputLimits(50, 0))
    ex.advance()
    assert ex.steps["copy"].handled is True and ex.steps["copy"].output["error"]["type"] == "output-too-large"
    assert ex.run.status == "succeeded" and ex.run.output == "ok"


def test_a_run_output_over_the_limit_fails_the_run() -> None:
    nodes = [n("a", output="{{ input.x }}"), n("b", output="{{ input.x }}")]  # two terminal steps: both in the output
    ex = execution(nodes, [e("start", "a"), e("start", "b")], {"x": "y" * 60}, OutputLimits(100, 100))
    ex.advance()
    assert ex.steps["a"].status == "succeeded" and ex.steps["b"].status == "succeeded"
    assert ex.run.status == "failed" and ex.run.output is None
    assert ex.run.error == {
        "message": "the run's output is 135 bytes, over the limit of 100 bytes",
        "stepId": None,
        "type": "output-too-large",
    }
    assert ex.events[-1].type == "run.failed"


def test_outputs_within_the_limits_or_with_no_limit_are_recorded() -> None:
    for limits in (OutputLimits(), OutputLimits(0, 0), OutputLimits(200, 200)):
        ex = execution([n("copy", output="{{ input }}")], [e("start", "copy")], {"x": "y" * 100}, limits)
        ex.advance()
        assert ex.run.status == "succeeded" and ex.run.output == {"x": "y" * 100}
