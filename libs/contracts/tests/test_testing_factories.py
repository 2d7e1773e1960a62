"""The definition factories build what a canvas would save, with step configs their step types accept."""

from __future__ import annotations

from typing import Any

import pytest

from flowmesh.contracts.models.definition import STEP_TYPES, FlowDefinition
from flowmesh.contracts.models.rpc import RunnableFlow
from flowmesh.contracts.testing import (
    START,
    chain,
    definition,
    echo,
    edge,
    foreach,
    http_step,
    linear,
    node,
    runnable,
    subflow,
)

FLOW_ID = "0190a5b4-0000-7000-8000-000000000001"


def assert_valid_steps(d: dict[str, Any]) -> None:
    parsed = FlowDefinition.model_validate(d)
    for n in parsed.nodes:
        STEP_TYPES[n.type].model.model_validate(n.data)
    ids = {n.id for n in parsed.nodes}
    assert all(e.source in ids and e.target in ids for e in parsed.edges)
    assert len({e.id for e in parsed.edges}) == len(parsed.edges)


@pytest.mark.parametrize(
    "built",
    [
        chain(3),
        echo(),
        linear(http_step("h", "https://example.test/x", "POST", body={"a": 1}), node("t")),
        linear(subflow("s", FLOW_ID, {"n": "{{ input.n }}"}), foreach("f", FLOW_ID, "input.xs", concurrency=2)),
        definition(
            node("c", "condition", expression="input.ok"),
            node("yes"),
            node("no"),
            edges=[edge(START, "c"), edge("c", "yes", "true"), edge("c", "no", "false")],
        ),
    ],
)
def test_every_factory_builds_a_definition_its_step_types_accept(built: dict[str, Any]) -> None:
    assert_valid_steps(built)
    assert built["nodes"][0] == {"id": START, "type": "trigger", "data": {}}


def test_a_chain_is_linear_and_adds_one_per_step() -> None:
    d = chain(2)
    assert [n["id"] for n in d["nodes"]] == [START, "s0", "s1"]
    assert [(e["source"], e["target"]) for e in d["edges"]] == [(START, "s0"), ("s0", "s1")]
    assert d["nodes"][2]["data"]["output"] == {"v": "{{ steps.s0.output.v + 1 }}"}


def test_edges_name_their_handle_and_take_a_given_id() -> None:
    assert edge("a", "b") == {"id": "a>b", "source": "a", "target": "b"}
    assert edge("a", "b", "true", edge_id="e") == {"id": "e", "source": "a", "target": "b", "sourceHandle": "true"}


def test_runnable_is_the_flows_answer_for_a_published_version() -> None:
    found = runnable("t", FLOW_ID, echo(), version=3, active=False)
    assert RunnableFlow.model_validate(found.wire()).wire() == found.wire()
    assert found.version.version == 3 and found.version.definition == echo() and not found.active
