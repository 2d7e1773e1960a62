"""Graph semantics and the run state machine, without I/O."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from flowmesh.contracts.models.definition import RetryPolicy
from flowmesh.contracts.testing import edge as e
from flowmesh.contracts.testing import node as n
from flowmesh.runner.engine import Outcome, RunRecord, RunState
from flowmesh.runner.graph import Graph, retry_delay

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def execution(nodes: list[dict[str, Any]], edges: list[dict[str, Any]], run_input: Any = None) -> RunState:
    graph = Graph({"nodes": [n("start", "trigger"), *nodes], "edges": edges})
    run = RunRecord(
        id="r",
        tenant_id="t",
        flow_id="f",
        version=1,
        status="queued",
        trigger_type="manual",
        input=run_input if run_input is not None else {},
        created_at=NOW,
    )
    return RunState(run, graph, {}, NOW)


def statuses(ex: RunState) -> dict[str, str]:
    return {k: v.status for k, v in ex.steps.items()}


def test_a_chain_of_pure_steps_runs_in_one_go() -> None:
    nodes = [n("a", output={"v": "{{ input.v + 1 }}"}), n("b", output={"v": "{{ steps.a.output.v * 2 }}"})]
    ex = execution(nodes, [e("start", "a"), e("a", "b")], {"v": 1})
    ex.advance()
    assert ex.run.status == "succeeded" and ex.run.output == {"v": 4}
    assert [ev.seq for ev in ex.events] == list(range(1, len(ex.events) + 1))
    assert [ev.type for ev in ex.events] == [
        "run.started",
        "step.started",
        "step.succeeded",
        "step.started",
        "step.succeeded",
        "step.started",
        "step.succeeded",
        "run.succeeded",
    ]
    assert ex.dispatch == []


def test_an_untaken_branch_is_skipped_and_an_if_else_merges_once() -> None:
    nodes = [n("big", "condition", expression="input.v > 10"), n("yes"), n("no"), n("merge", output={"m": 1})]
    edges = [e("start", "big"), e("big", "yes", "true"), e("big", "no", "false"), e("yes", "merge"), e("no", "merge")]
    ex = execution(nodes, edges, {"v": 3})
    ex.advance()
    assert statuses(ex) == {
        "start": "succeeded",
        "big": "succeeded",
        "yes": "skipped",
        "no": "succeeded",
        "merge": "succeeded",
    }
    assert ex.run.output == {"m": 1}
    assert sum(ev.type == "step.started" and ev.step_id == "merge" for ev in ex.events) == 1


def test_skips_propagate_down_a_branch() -> None:
    nodes = [n("c", "condition", expression="false"), n("a"), n("b"), n("c2")]
    ex = execution(nodes, [e("start", "c"), e("c", "a", "true"), e("a", "b"), e("b", "c2")])
    ex.advance()
    assert statuses(ex)["b"] == "skipped" and statuses(ex)["c2"] == "skipped"
    assert ex.run.status == "succeeded" and ex.run.output == {"value": False}


def test_plain_edges_of_a_condition_follow_its_first_handle() -> None:
    ex = execution([n("c", "condition", expression="true"), n("a")], [e("start", "c"), e("c", "a")])
    ex.advance()
    assert statuses(ex)["a"] == "succeeded"
    ex = execution([n("c", "condition", expression="false"), n("a")], [e("start", "c"), e("c", "a")])
    ex.advance()
    assert statuses(ex)["a"] == "skipped"


def test_a_join_waits_for_every_parallel_branch() -> None:
    nodes = [n("p1", "http", url="http://x.test"), n("p2"), n("join", output={"a": "{{ steps.p2.output.from }}"})]
    ex = execution(nodes, [e("start", "p1"), e("start", "p2"), e("p1", "join"), e("p2", "join")])
    ex.advance()
    assert ex.dispatch == ["p1"] and "join" not in ex.steps and ex.run.status == "running"
    ex.dispatch.clear()
    assert ex.complete("p1", 1, Outcome(ok=True, output={"status": 200}))
    assert statuses(ex)["join"] == "succeeded" and ex.run.status == "succeeded"
    assert ex.run.output == {"a": "p2"}


def test_several_terminal_steps_make_an_object_keyed_by_step_id() -> None:
    ex = execution([n("a"), n("b")], [e("start", "a"), e("start", "b")])
    ex.advance()
    assert ex.run.output == {"a": {"from": "a"}, "b": {"from": "b"}}


def test_a_switch_picks_the_matching_case_or_default() -> None:
    nodes = [n("s", "switch", expression="input.k", cases=["a", 2]), n("A"), n("two"), n("other")]
    edges = [e("start", "s"), e("s", "A", "a"), e("s", "two", "2"), e("s", "other", "default")]
    for value, ran in (("a", "A"), (2, "two"), ("zzz", "other")):
        ex = execution(nodes, edges, {"k": value})
        ex.advance()
        assert [k for k in ("A", "two", "other") if ex.steps[k].status == "succeeded"] == [ran]


def test_an_expression_error_fails_the_run_naming_the_step() -> None:
    ex = execution([n("a", output={"v": "{{ input.missing.deeper }}"})], [e("start", "a")])
    ex.advance()
    assert ex.run.status == "failed" and ex.run.output is None
    assert ex.run.error is not None and ex.run.error["stepId"] == "a" and ex.run.error["type"] == "expression"
    assert "input.missing.deeper" in ex.run.error["message"]


def test_a_fail_step_ends_the_run_with_its_message() -> None:
    ex = execution([n("f", "fail", message="bad {{ input.x }}")], [e("start", "f")], {"x": "news"})
    ex.advance()
    assert ex.run.error == {"message": "bad news", "stepId": "f", "type": "fail"}


def test_a_handled_failure_takes_error_edges_only() -> None:
    nodes = [n("bad", output={"v": "{{ nope }}"}, onError="continue"), n("onerr"), n("next")]
    ex = execution(nodes, [e("start", "bad"), e("bad", "onerr", "error"), e("bad", "next")])
    ex.advance()
    assert statuses(ex) == {"start": "succeeded", "bad": "failed", "onerr": "succeeded", "next": "skipped"}
    assert ex.steps["bad"].handled is True and ex.steps["bad"].output["error"]["type"] == "expression"
    assert ex.run.status == "succeeded"


def test_a_handled_failure_without_error_edges_takes_plain_edges() -> None:
    nodes = [n("bad", output={"v": "{{ nope }}"}, onError="continue"), n("next")]
    ex = execution(nodes, [e("start", "bad"), e("bad", "next")])
    ex.advance()
    assert statuses(ex)["next"] == "succeeded" and ex.run.status == "succeeded"


def test_retryable_failures_retry_then_fail_for_good() -> None:
    retry = {"maxAttempts": 3, "backoff": "fixed", "initialDelayMs": 100}
    ex = execution([n("h", "http", url="http://x.test", retry=retry)], [e("start", "h")])
    ex.advance()
    for attempt in (1, 2):
        assert ex.complete("h", attempt, Outcome.failure("503", retryable=True))
        state = ex.steps["h"]
        assert state.status == "pending" and state.next_attempt_at == ex.now + timedelta(milliseconds=100)
        assert ex.claim_retry("h") is None  # not due yet
        ex.now = state.next_attempt_at
        assert ex.claim_retry("h") == attempt + 1
    assert ex.complete("h", 3, Outcome.failure("503", retryable=True))
    assert ex.run.status == "failed"
    assert [ev.type for ev in ex.events].count("step.retrying") == 2


def test_a_result_is_recorded_once_and_stale_attempts_are_ignored() -> None:
    ex = execution([n("h", "http", url="http://x.test")], [e("start", "h")])
    ex.advance()
    assert ex.complete("h", 1, Outcome(ok=True, output=1))
    assert not ex.complete("h", 1, Outcome(ok=True, output=2))
    assert ex.steps["h"].output == 1


def test_non_retryable_failures_do_not_retry() -> None:
    ex = execution([n("h", "http", url="http://x.test", retry={"maxAttempts": 5})], [e("start", "h")])
    ex.advance()
    ex.complete("h", 1, Outcome.failure("404", retryable=False))
    assert ex.run.status == "failed"


def test_approval_waits_and_a_rejection_without_an_edge_fails_the_run() -> None:
    ex = execution([n("ok", "approval"), n("after")], [e("start", "ok"), e("ok", "after")])
    ex.advance()
    assert ex.steps["ok"].status == "waiting" and ex.run.status == "waiting"
    assert ex.events[-1].type == "run.waiting"
    ex.complete("ok", 1, Outcome(ok=True, output={"decision": "rejected"}, handle="rejected"))
    assert ex.run.status == "failed" and "rejected" in (ex.run.error or {})["message"]


def test_approval_approved_continues_on_plain_edges() -> None:
    ex = execution([n("ok", "approval"), n("after")], [e("start", "ok"), e("ok", "after")])
    ex.advance()
    ex.complete("ok", 1, Outcome(ok=True, output={"decision": "approved"}, handle="approved"))
    assert ex.run.status == "succeeded" and ex.run.output == {"from": "after"}


def test_cancel_cancels_unfinished_steps() -> None:
    ex = execution([n("h", "http", url="http://x.test")], [e("start", "h")])
    ex.advance()
    ex.cancel()
    assert ex.run.status == "cancelled" and ex.steps["h"].status == "cancelled"
    assert not ex.complete("h", 1, Outcome(ok=True))


@pytest.mark.parametrize(
    ("policy", "attempt", "expected_ms"),
    [
        (RetryPolicy(backoff="fixed", initial_delay_ms=500), 3, 500),
        (RetryPolicy(backoff="exponential", initial_delay_ms=500), 3, 2000),
        (RetryPolicy(backoff="exponential", initial_delay_ms=500, max_delay_ms=1200), 5, 1200),
    ],
)
def test_retry_delays(policy: RetryPolicy, attempt: int, expected_ms: int) -> None:
    assert retry_delay(policy, attempt) == timedelta(milliseconds=expected_ms)


def test_jitter_stays_within_its_bound() -> None:
    policy = RetryPolicy(initial_delay_ms=1000, jitter=0.2, backoff="fixed")
    rng = random.Random(7)
    delays = [retry_delay(policy, 1, rng).total_seconds() for _ in range(200)]
    assert min(delays) >= 0.8 and max(delays) <= 1.2 and len(set(delays)) > 1


def test_wait_event_takes_only_a_matching_event() -> None:
    nodes = [n("w", "waitEvent", eventType="order.paid", match="event.id == input.id"), n("after")]
    ex = execution(nodes, [e("start", "w"), e("w", "after")], {"id": 7})
    ex.advance()
    assert ex.steps["w"].status == "waiting" and ex.steps["w"].wait_for == "t.order.paid"
    assert not ex.deliver_event("w", 1, {"id": 8})
    assert ex.steps["w"].status == "waiting"
    assert ex.deliver_event("w", 1, {"id": 7, "x": 1})
    assert ex.steps["w"].output == {"id": 7, "x": 1} and ex.run.status == "succeeded"


def test_a_wait_event_match_that_cannot_be_evaluated_fails_the_step() -> None:
    ex = execution([n("w", "waitEvent", eventType="x", match="event.missing > 1")], [e("start", "w")])
    ex.advance()
    ex.deliver_event("w", 1, {})
    assert ex.run.status == "failed" and (ex.run.error or {})["type"] == "expression"
