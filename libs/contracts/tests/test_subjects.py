"""Subject names and builders: one source, safe tenant tokens."""

from __future__ import annotations

import pytest

from flowmesh.contracts import headers, streams, subjects
from flowmesh.contracts.ids import is_uuid, new_id


def test_builders_follow_the_design_table() -> None:
    assert subjects.FlowsOp.CREATE == "fm.rpc.flows.create"
    assert subjects.ping("runner") == "fm.rpc.runs.ping"
    assert subjects.flow_event("acme", "published") == "fm.flows.acme.published"
    assert subjects.run_event("acme", "f1", "r1", "step.succeeded") == "fm.runs.acme.f1.r1.step.succeeded"
    assert subjects.run_events_of_run("acme", "f1", "r1") == "fm.runs.acme.f1.r1.>"
    assert subjects.timer_fired("runner") == "fm.timers.fired.runner"
    assert subjects.external_event("acme", "order.paid") == "fm.events.acme.order.paid"
    assert subjects.out_message("acme", "done") == "fm.out.acme.done"
    assert headers.TENANT == "Flowmesh-Tenant" and headers.MSG_ID == "Nats-Msg-Id"


@pytest.mark.parametrize("tenant", ["a.b", "a b", "*", ">", "x" * 65, "", "ünï", "_hdeadbeef"])
def test_unsafe_tenant_ids_become_a_stable_hashed_token(tenant: str) -> None:
    token = subjects.tenant_token(tenant)
    assert subjects.is_safe_token(token)
    assert token == subjects.tenant_token(tenant)
    assert token != tenant
    assert "." not in subjects.flow_event(tenant, "published").removeprefix("fm.flows.").removesuffix(".published")


def test_safe_tenant_ids_stay_readable() -> None:
    assert subjects.tenant_token("acme-Corp_1") == "acme-Corp_1"


def test_a_tenant_cannot_pick_another_tenants_hashed_token() -> None:
    hashed = subjects.tenant_token("a.b")
    assert subjects.tenant_token(hashed) != hashed


@pytest.mark.parametrize(
    ("part", "ok"),
    [("order.paid", True), ("a", True), ("a..b", False), ("a.*", False), (">", False), ("a b", False), ("", False)],
)
def test_user_given_subject_parts_are_checked(part: str, ok: bool) -> None:
    assert subjects.is_safe_subject_part(part) is ok


def test_every_stream_is_declared_once_and_subjects_do_not_overlap() -> None:
    names = [s.name for s in streams.ALL_STREAMS]
    assert names == ["FLOWS", "RUN_CMDS", "STEP_WORK", "RUN_EVENTS", "TIMERS", "EVENTS", "OUT"]
    all_subjects = [subj for s in streams.ALL_STREAMS for subj in s.subjects]
    assert len(all_subjects) == len(set(all_subjects))
    assert streams.RUN_CMDS.retention == "workqueue"


def test_ids_are_time_ordered_uuids() -> None:
    a, b = new_id(), new_id()
    assert is_uuid(a) and a < b
    assert not is_uuid("not-a-uuid")


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("steps.a.output.v + steps['b-c'].output.w", frozenset({"a", "b-c"})),
        ('steps["x y"].status == "succeeded"', frozenset({"x y"})),
        ("input.v > 1", frozenset()),
        ("size(steps) > 2", None),
        ("steps[input.key].output", None),
    ],
)
def test_expressions_name_the_steps_they_read(source: str, expected: frozenset[str] | None) -> None:
    from flowmesh.contracts.expressions import referenced_steps

    assert referenced_steps(source) == expected


def test_evaluation_hands_cel_only_what_it_reads_and_still_sees_everything_it_needs() -> None:
    from flowmesh.contracts.expressions import evaluate

    ctx = {"input": {"v": 1}, "steps": {f"s{i}": {"output": i} for i in range(50)}, "run": {"id": "r"}}
    assert evaluate("steps.s3.output + steps.s49.output + input.v", ctx) == 53
    assert evaluate("size(steps)", ctx) == 50
