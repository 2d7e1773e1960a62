"""Contract models: camelCase on the wire, snake_case accepted, strict HTTP bodies, canvas keys kept."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from pydantic import ValidationError

from flowmesh.contracts.errors import InvalidInput, NotFound, QuotaExceeded, from_problem
from flowmesh.contracts.models import (
    Flow,
    FlowCreate,
    FlowDefinition,
    FlowUpdate,
    Page,
    Problem,
    RunEvent,
    Trigger,
)
from flowmesh.contracts.models.definition import DelayData, HttpData, TransformData
from flowmesh.contracts.models.rpc import RpcReply
from flowmesh.contracts.models.run_events import EVENT_DATA, RunQueuedData, StepSucceededData
from flowmesh.contracts.models.runs import RUN_EVENT_TYPES, Run
from flowmesh.contracts.models.timers import DeadlinePayload
from flowmesh.contracts.models.work import StepWork
from flowmesh.contracts.steps import STEP_TYPES
from flowmesh.contracts.strict import json_pointer, parse_strict

CANVAS = {
    "nodes": [
        {
            "id": "start",
            "type": "trigger",
            "position": {"x": 10, "y": 20},
            "data": {"label": "Start"},
            "width": 150,
            "height": 40,
            "selected": True,
            "measured": {"width": 150, "height": 40},
            "style": {"border": "1px solid"},
        },
        {"id": "x", "type": "no-such-type", "data": {"anything": [1, 2]}},
    ],
    "edges": [
        {"id": "e1", "source": "start", "target": "x", "markerEnd": {"type": "arrow"}, "animated": True},
    ],
    "viewport": {"x": 0, "y": 0, "zoom": 1.5},
}


def test_canvas_definition_round_trips_with_every_extra_key() -> None:
    definition = FlowDefinition.model_validate(CANVAS)
    assert definition.dump() == CANVAS
    assert json.loads(json.dumps(definition.dump())) == CANVAS


def test_definition_written_in_snake_case_is_read_and_written_in_camel_case() -> None:
    d = FlowDefinition.model_validate(
        {"nodes": [], "edges": [{"id": "e", "source": "a", "target": "b", "source_handle": "true"}]}
    )
    assert d.dump()["edges"][0] == {"id": "e", "source": "a", "target": "b", "sourceHandle": "true"}


def test_strict_body_rejects_unknown_top_level_fields_but_keeps_nested_canvas_keys() -> None:
    flow = parse_strict(FlowCreate, {"name": "n", "definition": CANVAS})
    assert flow.definition.dump() == CANVAS
    with pytest.raises(InvalidInput) as err:
        parse_strict(FlowCreate, {"name": "n", "unknownField": 1, "inputSchema": {}})
    assert err.value.errors is not None
    assert [e.path for e in err.value.errors] == ["/unknownField"]


def test_strict_body_reports_every_problem_with_json_pointers() -> None:
    with pytest.raises(InvalidInput) as err:
        parse_strict(FlowCreate, {"name": "", "extra": True, "definition": {"nodes": [{"id": "a"}]}})
    paths = sorted(e.path for e in err.value.errors or [])
    assert paths == ["/definition/nodes/0/type", "/extra", "/name"]


@pytest.mark.parametrize("body", [[1, 2], "text", 3, None])
def test_strict_body_must_be_an_object(body: object) -> None:
    with pytest.raises(InvalidInput, match="JSON object"):
        parse_strict(FlowCreate, body)


@pytest.mark.parametrize(
    "body",
    [
        {"name": "x" * 101},
        {"name": "ok", "description": "d" * 501},
        {"name": "ok", "definition": "not an object"},
        {"name": 3},
        {"name": "ok", "definition": {"nodes": "nope"}},
    ],
)
def test_flow_create_rejects_bad_values(body: dict[str, object]) -> None:
    with pytest.raises(InvalidInput):
        parse_strict(FlowCreate, body)


def test_both_name_forms_are_accepted_on_input() -> None:
    a = FlowCreate.model_validate({"name": "n", "inputSchema": {"type": "object"}})
    b = FlowCreate.model_validate({"name": "n", "input_schema": {"type": "object"}})
    assert a.input_schema == b.input_schema == {"type": "object"}
    assert "inputSchema" in a.wire()


def test_nats_messages_are_read_tolerantly() -> None:
    flow = FlowCreate.model_validate({"name": "n", "fieldFromANewerSender": 1})
    assert flow.name == "n"


def test_patch_knows_which_fields_were_given_and_refuses_null_for_required_ones() -> None:
    patch = FlowUpdate.model_validate({"description": None})
    assert patch.model_fields_set == {"description"}
    with pytest.raises(ValidationError, match="name cannot be null"):
        FlowUpdate.model_validate({"name": None})


def test_flow_times_are_rfc3339_utc_with_milliseconds() -> None:
    t = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    flow = Flow(
        id="i",
        tenant_id="t",
        name="n",
        status="draft",
        active=True,
        revision=3,
        created_at=t,
        updated_at=t,
        definition={},
    )
    wire = flow.wire()
    assert wire["createdAt"] == "2026-01-02T03:04:05.678Z"
    assert wire["tenantId"] == "t" and wire["activeVersion"] is None
    assert flow.etag == '"3"'
    assert Flow.model_validate(wire) == flow.model_copy(
        update={"created_at": t.replace(microsecond=678000), "updated_at": t.replace(microsecond=678000)}
    )


def test_run_event_and_run_round_trip() -> None:
    event = {
        "id": "e",
        "seq": 1,
        "type": "run.queued",
        "ts": "2026-01-02T03:04:05.678Z",
        "tenantId": "t",
        "runId": "r",
        "flowId": "f",
        "version": 1,
        "data": {"status": "queued"},
    }
    assert RunEvent.model_validate(event).wire(exclude_none=True) == event
    run = Run.model_validate(
        {
            "id": "r",
            "flowId": "f",
            "version": 2,
            "tenantId": "t",
            "status": "succeeded",
            "triggerType": "manual",
            "createdAt": "2026-01-02T03:04:05.678Z",
            "output": {"v": 1},
        }
    )
    assert run.wire()["triggerType"] == "manual" and run.wire()["output"] == {"v": 1}
    with pytest.raises(ValidationError):
        Run.model_validate({**run.wire(), "status": "exploded"})


def test_trigger_never_requires_url_or_secret() -> None:
    t = Trigger(id="t", flow_id="f", type="webhook", name="hook")
    assert t.wire(exclude_none=True) == {
        "id": "t",
        "flowId": "f",
        "type": "webhook",
        "name": "hook",
        "config": {},
        "enabled": True,
    }


def test_page_has_the_list_shape() -> None:
    page = Page[int](items=[1, 2], total=5, page=1, page_size=2, has_more=True)
    assert page.wire() == {"items": [1, 2], "total": 5, "page": 1, "pageSize": 2, "hasMore": True}
    with pytest.raises(ValidationError):
        Page[int](items=[], total=0, page=1, page_size=101, has_more=False)


def test_step_catalog_covers_every_type_and_validates_data() -> None:
    assert set(STEP_TYPES) == {
        "trigger",
        "transform",
        "condition",
        "switch",
        "http",
        "delay",
        "approval",
        "waitEvent",
        "foreach",
        "subflow",
        "publish",
        "llm",
        "fail",
    }
    assert STEP_TYPES["condition"].handles == ("true", "false")
    assert "model" not in STEP_TYPES["http"].catalog().wire()
    HttpData.model_validate({"url": "https://example.test", "retry": {"maxAttempts": 3, "backoff": "fixed"}})
    with pytest.raises(ValidationError):
        HttpData.model_validate({"url": "https://example.test", "unknown": 1})
    with pytest.raises(ValidationError):
        TransformData.model_validate({})
    with pytest.raises(ValidationError, match="exactly one"):
        DelayData.model_validate({})


def test_problems_map_back_to_the_same_errors() -> None:
    problem = QuotaExceeded("flow limit 1 reached").to_problem("/api/v1/flows")
    assert problem.wire(exclude_none=True) == {
        "type": "quota-exceeded",
        "title": "Quota exceeded",
        "status": 403,
        "detail": "flow limit 1 reached",
        "instance": "/api/v1/flows",
    }
    again = from_problem(Problem.model_validate(problem.wire()))
    assert isinstance(again, QuotaExceeded) and again.detail == "flow limit 1 reached"
    assert isinstance(from_problem(Problem(type="not-found", title="x", status=404)), NotFound)
    reply = RpcReply.model_validate({"error": problem.wire()})
    assert reply.error is not None and reply.error.status == 403


def test_json_pointer_escapes_slash_and_tilde() -> None:
    assert json_pointer(("a/b", "c~d", 0)) == "/a~1b/c~0d/0"


def test_full_dumps_of_a_definition_add_no_null_keys_and_keep_integer_positions() -> None:
    given = {
        "nodes": [{"id": "a", "type": "trigger", "data": {}, "position": {"x": 0, "y": 12}}],
        "edges": [{"id": "e", "source": "a", "target": "a"}],
    }
    wire = FlowDefinition.model_validate(given).wire()
    assert wire == given
    assert isinstance(wire["nodes"][0]["position"]["x"], int)


def test_run_event_data_is_read_as_its_type_and_written_with_exactly_its_keys() -> None:
    base = {"id": "e", "seq": 1, "ts": "2026-03-20T10:00:00.000Z", "tenantId": "t", "runId": "r", "flowId": "f"}
    queued = {**base, "type": "run.queued", "version": 1, "data": {"status": "queued", "parentRunId": None}}
    event = RunEvent.model_validate(queued)
    assert isinstance(event.data, RunQueuedData) and event.data.parent_run_id is None
    assert event.wire(exclude_none=True) == queued  # the explicit null stays, nothing is added
    reopened = RunEvent.model_validate({**queued, "data": {"status": "queued", "retryCount": 2}})
    assert reopened.wire(exclude_none=True)["data"] == {"status": "queued", "retryCount": 2}
    llm = {"status": "succeeded", "durationMs": 9, "stepType": "llm", "usage": {"inputTokens": 1, "outputTokens": 2}}
    done = RunEvent.model_validate({**base, "type": "step.succeeded", "version": 1, "data": llm})
    assert isinstance(done.data, StepSucceededData) and done.data.usage is not None
    assert done.data.usage.output_tokens == 2 and done.wire()["data"] == llm
    assert set(EVENT_DATA) == set(RUN_EVENT_TYPES)


def test_step_work_names_its_kind_and_reads_the_form_before_it() -> None:
    assert StepWork(run_id="r", step_id="s", kind="attempt").wire() == {"runId": "r", "stepId": "s", "kind": "attempt"}
    assert StepWork.model_validate({"runId": "r", "stepId": None}).kind == "advance"
    assert StepWork.model_validate({"runId": "r", "stepId": "s", "child": True}).kind == "child"
    assert StepWork(run_id="r", step_id="s", kind="child").wire()["child"] is True


def test_a_deadline_payload_is_read_strictly() -> None:
    body = {"runId": "r", "retryCount": 0, "stepId": "s", "attempt": 1}
    assert DeadlinePayload.model_validate(body).wire(exclude_none=True) == body
    with pytest.raises(ValidationError):
        DeadlinePayload.model_validate({"runId": "r", "retryCount": "0"})
