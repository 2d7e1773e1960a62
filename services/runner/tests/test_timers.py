"""Time in the run state machine, without I/O: delays, wait and attempt timeouts, run time limits.

The engine records deadlines and says which durable timers to arm or cancel; a fired timer is a
hint it checks against the run's state.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from flowmesh.contracts.ids import format_time
from flowmesh.contracts.testing import edge as e
from flowmesh.contracts.testing import node as n
from flowmesh.runner.engine import ATTEMPT_GRACE, Deadline, Outcome, RunRecord, RunState
from flowmesh.runner.graph import Graph

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def graph(nodes: list[dict[str, Any]], edges: list[dict[str, Any]], **timeouts: int | None) -> Graph:
    return Graph({"nodes": [n("start", "trigger"), *nodes], "edges": edges}, **timeouts)


def started(g: Graph, run_input: Any = None, at: datetime = NOW) -> RunState:
    """A new run's first transaction: queued and advanced."""
    run = RunRecord(
        id="r",
        tenant_id="t",
        flow_id="f",
        version=1,
        status="queued",
        trigger_type="manual",
        input=run_input if run_input is not None else {},
        created_at=at,
    )
    ex = RunState(run, g, {}, at)
    ex.queue()
    ex.advance()
    return ex


def later(ex: RunState, by: timedelta) -> RunState:
    """The next transaction on the same run, ``by`` later (state as committed, no pending writes)."""
    return RunState(ex.run, ex.graph, dict(ex.steps), ex.now + by)


def armed(ex: RunState) -> dict[str, datetime]:
    return {key: op.due_at for key, op in ex.timers.items() if op.due_at is not None}


def cancelled(ex: RunState) -> set[str]:
    return {key for key, op in ex.timers.items() if op.due_at is None}


def types(ex: RunState) -> list[str]:
    return [ev.type for ev in ex.events]


STEP = "step:r:0:1:"


def test_a_delay_waits_on_a_durable_timer_and_outputs_when_it_fired() -> None:
    g = graph([n("wait", "delay", durationMs=2000), n("after")], [e("start", "wait"), e("wait", "after")])
    ex = started(g)
    due = NOW + timedelta(seconds=2)
    assert ex.steps["wait"].status == "waiting" and ex.steps["wait"].deadline_at == due
    assert ex.run.status == "waiting" and ex.dispatch == []
    assert armed(ex) == {STEP + "wait": due}
    payload = ex.timers[STEP + "wait"].deadline.payload().wire(exclude_none=True)
    assert payload == {"runId": "r", "retryCount": 0, "stepId": "wait", "attempt": 1}
    fired = later(ex, timedelta(seconds=2, milliseconds=5))
    fired_at = NOW + timedelta(seconds=2, milliseconds=1)
    assert fired.expire(Deadline("r", 0, "wait", 1), due, fired_at) is None
    assert fired.steps["wait"].status == "succeeded"
    assert fired.steps["wait"].output == {"firedAt": format_time(fired_at)}
    assert fired.steps["wait"].input == {"until": format_time(due)}
    assert fired.run.status == "succeeded"
    assert fired.timers == {}  # a timer that fired is not cancelled
    assert types(fired) == ["step.succeeded", "step.started", "step.succeeded", "run.succeeded"]


def test_a_timer_that_fired_within_the_tolerance_before_the_deadline_reports_the_deadline() -> None:
    g = graph([n("wait", "delay", durationMs=2000)], [e("start", "wait")])
    ex = started(g)
    due = NOW + timedelta(seconds=2)
    fired = later(ex, timedelta(seconds=2))  # by our clock the deadline has come
    early = due - timedelta(microseconds=600)  # a scheduler whose due time was a hair before ours
    assert fired.expire(Deadline("r", 0, "wait", 1), due - timedelta(milliseconds=1), early) is None
    assert fired.steps["wait"].output == {"firedAt": format_time(due)}


def test_a_delay_until_a_past_time_goes_on_at_once() -> None:
    past = format_time(NOW - timedelta(minutes=5))
    g = graph([n("wait", "delay", until=past), n("after")], [e("start", "wait"), e("wait", "after")])
    ex = started(g)
    assert ex.run.status == "succeeded" and ex.timers == {}
    assert ex.steps["wait"].output == {"firedAt": format_time(NOW)} and ex.steps["wait"].deadline_at is None


def test_a_delay_until_an_expression_waits_for_its_value() -> None:
    g = graph([n("wait", "delay", until="{{ input.at }}")], [e("start", "wait")])
    ex = started(g, {"at": "2026-01-01T01:00:00+01:00"})  # that is NOW: no wait
    assert ex.run.status == "succeeded"
    ex = started(g, {"at": "2026-01-01T00:00:30.250Z"})
    assert ex.steps["wait"].deadline_at == NOW + timedelta(seconds=30, milliseconds=250)
    assert list(armed(ex).values()) == [NOW + timedelta(seconds=30, milliseconds=250)]


def test_a_delay_until_something_that_is_not_a_time_fails_the_step() -> None:
    g = graph([n("wait", "delay", until="{{ input.at }}")], [e("start", "wait")])
    for bad in ("tomorrow", "2026-01-02T00:00:00", 42):
        ex = started(g, {"at": bad})
        assert ex.run.status == "failed" and ex.run.error is not None
        assert ex.run.error["type"] == "configuration" and "RFC 3339" in ex.run.error["message"]
    missing = started(g, {})
    assert missing.run.error is not None and missing.run.error["type"] == "expression"


def approval_flow(*, timeout_edge: bool) -> Graph:
    nodes = [n("ok", "approval", timeoutMs=1000), n("yes"), n("late")]
    edges = [e("start", "ok"), e("ok", "yes", "approved")]
    if timeout_edge:
        edges.append(e("ok", "late", "timeout"))
    else:
        nodes.pop()
    return graph(nodes, edges)


def test_an_approval_timeout_takes_the_timeout_handle() -> None:
    ex = started(approval_flow(timeout_edge=True))
    due = NOW + timedelta(seconds=1)
    assert armed(ex) == {STEP + "ok": due} and ex.run.status == "waiting"
    fired = later(ex, timedelta(seconds=1))
    fired.expire(Deadline("r", 0, "ok", 1), due)
    assert fired.steps["ok"].status == "succeeded" and fired.steps["ok"].output == {"decision": "timeout"}
    assert fired.steps["yes"].status == "skipped" and fired.steps["late"].status == "succeeded"
    assert fired.run.status == "succeeded"


def test_an_approval_timeout_with_no_edge_on_it_fails_the_run_saying_why() -> None:
    ex = started(approval_flow(timeout_edge=False))
    fired = later(ex, timedelta(seconds=1))
    fired.expire(Deadline("r", 0, "ok", 1), NOW + timedelta(seconds=1))
    assert fired.run.status == "failed" and fired.run.error is not None
    assert fired.run.error["type"] == "timeout" and fired.run.error["stepId"] == "ok"
    assert "timed out after 1000 ms" in fired.run.error["message"] and "'timeout' handle" in fired.run.error["message"]


def test_a_wait_event_timeout_takes_the_timeout_handle() -> None:
    g = graph(
        [n("paid", "waitEvent", eventType="order.paid", timeoutMs=500), n("got"), n("gaveUp")],
        [e("start", "paid"), e("paid", "got"), e("paid", "gaveUp", "timeout")],
    )
    ex = started(g)
    fired = later(ex, timedelta(milliseconds=500))
    fired.expire(Deadline("r", 0, "paid", 1), NOW + timedelta(milliseconds=500))
    assert fired.steps["paid"].handle == "timeout" and fired.steps["paid"].output is None
    assert fired.steps["got"].status == "skipped" and fired.steps["gaveUp"].status == "succeeded"


def test_a_wait_that_ends_early_cancels_its_timer() -> None:
    ex = started(approval_flow(timeout_edge=True))
    resumed = later(ex, timedelta(milliseconds=100))
    resumed.complete("ok", 1, Outcome(ok=True, output={"decision": "approved"}, handle="approved"))
    assert resumed.run.status == "succeeded" and cancelled(resumed) == {STEP + "ok"}
    # the cancel is best effort: if the timer fires anyway, it is stale
    fired = later(resumed, timedelta(seconds=1))
    assert fired.expire(Deadline("r", 0, "ok", 1), NOW + timedelta(seconds=1)) is None
    assert fired.events == [] and fired.changed == set()


def test_stale_or_foreign_timers_change_nothing() -> None:
    ex = started(approval_flow(timeout_edge=True))
    due = NOW + timedelta(seconds=1)
    fired = later(ex, timedelta(seconds=5))
    for stale, at in [
        (Deadline("r", 0, "ok", 2), due),  # another attempt
        (Deadline("r", 1, "ok", 1), due),  # before the run was reopened
        (Deadline("r", 0, "ok", 1), due + timedelta(seconds=3)),  # not the deadline recorded
        (Deadline("r", 0, "nope", 1), due),  # no such step
        (Deadline("r", 1), due),  # a run timer of another retry
        (Deadline("r", 0), due),  # a run timer for a run with no time limit
    ]:
        assert fired.expire(stale, at) is None
    assert fired.events == [] and fired.changed == set() and fired.steps["ok"].status == "waiting"


def test_a_timer_fired_before_the_deadline_by_our_clock_is_waited_for() -> None:
    ex = started(approval_flow(timeout_edge=True))
    early = later(ex, timedelta(milliseconds=700))
    assert early.expire(Deadline("r", 0, "ok", 1), NOW + timedelta(seconds=1)) == 0.3
    assert early.events == []


def test_a_run_time_limit_times_the_run_out_and_cancels_what_is_open() -> None:
    g = graph(
        [n("ok", "approval", timeoutMs=60_000), n("d", "delay", durationMs=60_000)],
        [e("start", "ok"), e("start", "d")],
        run_timeout_ms=1500,
    )
    ex = started(g)
    due = NOW + timedelta(milliseconds=1500)
    assert ex.run.deadline_at == due and armed(ex)["run:r:0"] == due and len(armed(ex)) == 3
    fired = later(ex, timedelta(seconds=2))
    fired.expire(Deadline("r", 0), due)
    assert fired.run.status == "timedOut" and fired.run.output is None
    assert fired.run.error == {"message": "the run did not finish within 1500 ms", "stepId": None, "type": "timeout"}
    assert {fired.steps[s].status for s in ("ok", "d")} == {"cancelled"}
    assert types(fired)[-1] == "run.timedOut" and fired.events[-1].data.dump()["status"] == "timedOut"
    assert cancelled(fired) == {STEP + "ok", STEP + "d"}  # the run's own timer fired
    assert fired.expire(Deadline("r", 0), due) is None and len(fired.events) == 1  # once


def test_a_flow_of_pure_steps_arms_no_timer_even_with_a_time_limit() -> None:
    g = graph([n("a"), n("b")], [e("start", "a"), e("a", "b")], run_timeout_ms=1000)
    ex = started(g)
    assert ex.run.status == "succeeded" and ex.timers == {}


def test_the_default_time_limit_is_recorded_but_arms_no_timer() -> None:
    g = graph([n("ok", "approval")], [e("start", "ok")], default_run_timeout_ms=3_600_000)
    ex = started(g)
    assert ex.run.deadline_at == NOW + timedelta(hours=1) and ex.timers == {}
    swept = later(ex, timedelta(hours=1, seconds=10))
    swept.expire(Deadline("r", 0))  # the sweep found it overdue
    assert swept.run.status == "timedOut" and swept.timers == {}


def test_an_attempt_with_timeout_ms_is_given_up_on_by_its_timer_and_retried() -> None:
    retry = {"maxAttempts": 2, "backoff": "fixed", "initialDelayMs": 100}
    g = graph([n("h", "http", url="http://x", timeoutMs=1000, retry=retry)], [e("start", "h")])
    ex = started(g)
    due = NOW + timedelta(seconds=1) + ATTEMPT_GRACE
    assert ex.dispatch == ["h"] and armed(ex) == {STEP + "h": due}
    # the worker died: the timer fires
    fired = later(ex, ATTEMPT_GRACE + timedelta(seconds=1))
    fired.expire(Deadline("r", 0, "h", 1), due)
    state = fired.steps["h"]
    assert state.status == "pending" and state.error is not None and state.error["type"] == "timeout"
    assert fired.dispatch == ["h"] and fired.timers == {}
    # the next attempt gets its own deadline and timer
    retried = later(fired, timedelta(seconds=1))
    assert retried.claim_retry("h") == 2
    assert armed(retried) == {"step:r:0:2:h": retried.now + timedelta(seconds=1) + ATTEMPT_GRACE}
    # the dead worker's attempt 1, redelivered, reports late: not recorded
    assert not retried.complete("h", 1, Outcome(ok=True, output={}))
    finished = later(retried, timedelta(milliseconds=50))
    finished.complete("h", 2, Outcome(ok=True, output={"status": 200}))
    assert finished.run.status == "succeeded" and cancelled(finished) == {"step:r:0:2:h"}


def test_a_subflow_attempt_that_times_out_abandons_its_children() -> None:
    g = graph([n("sub", "subflow", flowId="c", timeoutMs=1000, onError="continue")], [e("start", "sub")])
    ex = started(g)
    assert armed(ex) == {STEP + "sub": NOW + timedelta(seconds=1)}  # no grace: nothing else bounds it
    waiting = later(ex, timedelta(milliseconds=10))
    waiting.complete("sub", 1, Outcome(ok=True, wait=True, input={"flowId": "c"}))
    assert waiting.timers == {}  # still the same attempt and deadline
    fired = later(waiting, timedelta(seconds=1))
    fired.expire(Deadline("r", 0, "sub", 1), NOW + timedelta(seconds=1))
    assert fired.abandoned == ["sub"] and fired.steps["sub"].status == "failed" and fired.steps["sub"].handled
    assert fired.run.status == "succeeded"


def test_deadlines_survive_the_wire_to_the_millisecond() -> None:
    odd = NOW + timedelta(microseconds=123_456)
    g = graph([n("wait", "delay", durationMs=10)], [e("start", "wait")])
    ex = started(g, at=odd)
    deadline = ex.steps["wait"].deadline_at
    assert deadline == NOW + timedelta(milliseconds=133)
    assert datetime.fromisoformat(format_time(deadline)) == deadline


def test_a_timer_payload_round_trips_and_foreign_payloads_are_refused() -> None:
    d = Deadline("r", 2, "a:b", 3)
    assert Deadline.from_payload(d.payload()) == d and d.key == "step:r:2:3:a:b"
    assert Deadline.from_payload(Deadline("r", 0).payload()) == Deadline("r", 0)
    for bad in ({}, {"runId": 1, "retryCount": 0}, {"runId": "r"}, {"runId": "r", "retryCount": 0, "stepId": 5}):
        assert Deadline.from_payload(bad) is None
