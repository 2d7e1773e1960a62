"""A new step type needs one module: its kind in the contracts' registry, its execution in the runner's.

The ``wordCount`` type below exists only in this test: registered here, it is parsed, dispatched,
branched on and recorded by the engine without any change to the engine.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from pydantic import Field

from flowmesh.contracts.expressions import CONTEXT_NAMES, render
from flowmesh.contracts.models.definition import StepData
from flowmesh.contracts.steps import STEP_TYPES, StepKind, handles_of, register, types_that_run
from flowmesh.runner import kinds
from flowmesh.runner.engine import RunRecord, RunState
from flowmesh.runner.graph import Graph, Step
from flowmesh.runner.kinds import Context, StepRunner, register_runner, runner_for
from flowmesh.runner.outcome import Outcome

NOW = datetime(2026, 1, 1, tzinfo=UTC)


# --- the whole of a new step type ----------------------------------------------------------------


class WordCountData(StepData):
    """Counts the words of ``text`` (a template); ``long`` when there are more than ``limit``."""

    text: str = Field(min_length=1)
    limit: int = Field(default=3, ge=0)


def count_words(step: Step, context: Context) -> Outcome:
    assert isinstance(step.data, WordCountData)
    words = len(str(render(step.data.text, context)).split())
    return Outcome(ok=True, output={"words": words}, handle="long" if words > step.data.limit else "short")


WORD_COUNT = StepKind(
    "wordCount",
    "Word count",
    "Counts the words of a text.",
    WordCountData,
    "pure",
    ("short", "long"),
    timeout="none",
    templates={"text": CONTEXT_NAMES},
)


@pytest.fixture
def word_count() -> Iterator[StepKind]:
    register(WORD_COUNT)
    register_runner("wordCount", StepRunner(compute=count_words))
    yield WORD_COUNT
    STEP_TYPES.pop("wordCount")
    kinds._RUNNERS.pop("wordCount")


# --- running it ----------------------------------------------------------------------------------


def run_of(definition: dict[str, Any], run_input: Any) -> RunState:
    run = RunRecord(
        id="r",
        tenant_id="t",
        flow_id="f",
        version=1,
        status="queued",
        trigger_type="manual",
        input=run_input,
        created_at=NOW,
    )
    return RunState(run, Graph(definition), {}, NOW)


def flow(limit: int) -> dict[str, Any]:
    return {
        "nodes": [
            {"id": "start", "type": "trigger", "data": {}},
            {"id": "count", "type": "wordCount", "data": {"text": "{{ input.text }}", "limit": limit}},
            {"id": "short", "type": "transform", "data": {"output": "short"}},
            {"id": "long", "type": "transform", "data": {"output": "{{ steps.count.output.words }} words"}},
        ],
        "edges": [
            {"id": "e1", "source": "start", "target": "count"},
            {"id": "e2", "source": "count", "target": "short", "sourceHandle": "short"},
            {"id": "e3", "source": "count", "target": "long", "sourceHandle": "long"},
        ],
    }


def test_a_step_type_registered_in_one_module_runs_through_the_engine(word_count: StepKind) -> None:
    state = run_of(flow(limit=2), {"text": "one two three"})
    state.advance()
    assert state.run.status == "succeeded" and state.run.output == "3 words"
    assert state.steps["count"].output == {"words": 3} and state.steps["short"].status == "skipped"
    succeeded = next(e for e in state.events if e.type == "step.succeeded" and e.step_id == "count")
    assert succeeded.data.dump()["stepType"] == "wordCount"


def test_the_registry_answers_for_the_new_type_everywhere(word_count: StepKind) -> None:
    assert handles_of("wordCount", None) == ["short", "long"]
    assert "wordCount" in types_that_run("pure") and runner_for("wordCount").compute is count_words
    assert word_count.catalog().data_schema["properties"]["limit"]["default"] == 3


def test_a_type_the_runner_cannot_execute_fails_its_step_not_the_engine(word_count: StepKind) -> None:
    kinds._RUNNERS.pop("wordCount")
    state = run_of(flow(limit=2), {"text": "x"})
    state.advance()
    register_runner("wordCount", StepRunner(compute=count_words))  # for the fixture's clean-up
    assert state.run.status == "failed" and state.run.error is not None
    assert state.run.error["type"] == "configuration"
