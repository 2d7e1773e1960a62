"""How a run moves (DESIGN §4, §5): the changes one transaction makes to a run. Pure: no I/O.

An :class:`Execution` holds a run's state as loaded (under the run's row lock), applies an event
(start, a step's outcome, a resume, a cancel), advances the graph as far as it can go without I/O
(pure steps run inline, so a chain of transforms costs one transaction), and collects what must be
written: changed steps, new run events in ``seq`` order, and steps to hand to workers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

from flowmesh.contracts.expressions import ExpressionError, evaluate, expression_source, render
from flowmesh.contracts.ids import format_time
from flowmesh.contracts.models.definition import (
    ConditionData,
    FailData,
    ForeachData,
    SwitchData,
    TransformData,
    WaitEventData,
    case_handle,
)
from flowmesh.contracts.models.runs import FINAL_RUN_STATUSES
from flowmesh.contracts.subjects import tenant_token
from flowmesh.runner.graph import Graph, Step, StepState, retry_delay

WAITING_TYPES: Final = frozenset({"approval", "waitEvent"})
"""Steps that wait for something from outside once started."""


@dataclass(slots=True)
class RunRecord:
    """The fields of a run the engine reads and changes."""

    id: str
    tenant_id: str
    flow_id: str
    version: int
    status: str
    trigger_type: str
    input: Any
    created_at: datetime
    retry_count: int = 0
    parent_run_id: str | None = None
    parent_step_id: str | None = None
    output: Any = None
    error: dict[str, Any] | None = None
    started_at: datetime | None = None
    completed_at: datetime | None = None
    last_seq: int = 0

    @property
    def final(self) -> bool:
        """Succeeded, failed, cancelled or timed out."""
        return self.status in FINAL_RUN_STATUSES


@dataclass(frozen=True, slots=True)
class Outcome:
    """How one attempt of a step ended."""

    ok: bool
    output: Any = None
    handle: str | None = None
    message: str = ""
    error_type: str = "error"
    retryable: bool = False
    input: Any = None
    wait: bool = False
    """The attempt started something to wait for (child runs): the step waits, it has not ended."""

    @classmethod
    def failure(cls, message: str, error_type: str = "error", *, retryable: bool = False) -> Outcome:
        """A failed attempt."""
        return cls(ok=False, message=message, error_type=error_type, retryable=retryable)


@dataclass(frozen=True, slots=True)
class Child:
    """A child run of a subflow or foreach step, as its parent sees it."""

    id: str
    index: int
    status: str
    output: Any = None
    error: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class NewEvent:
    """A run event to append, numbered when written."""

    seq: int
    type: str
    ts: datetime
    step_id: str | None
    attempt: int | None
    data: dict[str, Any]


@dataclass
class Execution:
    """The changes of one transaction to one run."""

    run: RunRecord
    graph: Graph
    steps: dict[str, StepState]
    now: datetime
    events: list[NewEvent] = field(default_factory=list)
    changed: set[str] = field(default_factory=set)
    dispatch: list[str] = field(default_factory=list)
    run_changed: bool = False
    _context: dict[str, Any] | None = None

    # --- bookkeeping -----------------------------------------------------------------------------

    def emit(self, event_type: str, step_id: str | None = None, attempt: int | None = None, **data: Any) -> None:
        """Append a run event with the next ``seq``."""
        self.run.last_seq += 1
        self.run_changed = True
        self.events.append(NewEvent(self.run.last_seq, event_type, self.now, step_id, attempt, data))

    def _set(self, step_id: str, state: StepState) -> None:
        self.steps[step_id] = state
        self.changed.add(step_id)
        if self._context is not None:
            self._context["steps"][step_id] = {"output": state.output, "status": state.status}

    def context(self) -> dict[str, Any]:
        """What expressions see: ``input``, ``steps.<id>.output|status``, ``run``."""
        if self._context is None:
            self._context = {
                "input": self.run.input,
                "steps": {k: {"output": s.output, "status": s.status} for k, s in self.steps.items()},
                "run": {
                    "id": self.run.id,
                    "flowId": self.run.flow_id,
                    "version": self.run.version,
                    "startedAt": format_time(self.run.started_at or self.now),
                },
            }
        return self._context

    def _duration_ms(self, start: datetime | None) -> int:
        return max(0, int((self.now - (start or self.now)).total_seconds() * 1000))

    # --- run lifecycle ---------------------------------------------------------------------------

    def queue(self) -> None:
        """A new run: its first event."""
        self.emit("run.queued", status="queued", triggerType=self.run.trigger_type, parentRunId=self.run.parent_run_id)

    def _finish(self, status: str, *, error: dict[str, Any] | None = None) -> None:
        self.run.status = status
        self.run.completed_at = self.now
        self.run.error = error
        self.run.output = self.graph.output(self.steps) if status == "succeeded" else None
        for step_id, state in list(self.steps.items()):
            if not state.final:
                self._set(step_id, _replace(state, status="cancelled", completed_at=self.now))
        data: dict[str, Any] = {
            "status": status,
            "durationMs": self._duration_ms(self.run.started_at),
            "triggerType": self.run.trigger_type,
            "parentRunId": self.run.parent_run_id,
        }
        if error is not None:
            data["error"] = error
        self.emit(f"run.{status}", **data)

    def fail(self, message: str, step_id: str | None, error_type: str) -> None:
        """End the run as failed."""
        self._finish("failed", error={"message": message, "stepId": step_id, "type": error_type})

    def cancel(self) -> None:
        """End the run as cancelled; unfinished steps are cancelled with it."""
        self._finish("cancelled")

    # --- advancing -------------------------------------------------------------------------------

    def advance(self) -> None:
        """Run every step that can run now without I/O; start the others; settle the run's status."""
        if self.run.final:
            return
        if self.run.status == "queued":
            self.run.status = "running"
            self.run.started_at = self.run.started_at or self.now
            self.emit("run.started", status="running")
        candidates: set[str] | None = None  # first look: every step; then only those after what finished
        while not self.run.final:
            ready, skip = self.graph.frontier(self.steps, candidates)
            if not ready and not skip:
                break
            candidates = {e.target for step_id in (*ready, *skip) for e in self.graph.steps[step_id].outgoing}
            for step_id in skip:
                step = self.graph.steps[step_id]
                self._set(step_id, StepState(status="skipped", completed_at=self.now))
                self.emit("step.skipped", step_id, status="skipped", stepType=step.type)
            for step_id in ready:
                if self.run.final:
                    break
                step = self.graph.steps[step_id]
                self._set(step_id, StepState(status="running", attempt=1, started_at=self.now))
                self.emit("step.started", step_id, 1, stepType=step.type)
                if step.pure:
                    self._record(step, 1, run_pure(step, self.context()))
                elif step.type in WAITING_TYPES:
                    wait_for = None
                    if isinstance(step.data, WaitEventData):
                        wait_for = f"{tenant_token(self.run.tenant_id)}.{step.data.event_type}"
                    self._set(step_id, _replace(self.steps[step_id], status="waiting", wait_for=wait_for))
                    self.emit("step.waiting", step_id, 1, stepType=step.type)
                else:
                    self.dispatch.append(step_id)
        self._settle()

    def _settle(self) -> None:
        if self.run.final:
            return
        if all(self.steps.get(s) is not None and self.steps[s].final for s in self.graph.order):
            self._finish("succeeded")
            return
        busy = any(s.status in ("running", "pending") for s in self.steps.values())
        waiting = any(s.status == "waiting" for s in self.steps.values())
        if waiting and not busy and self.run.status != "waiting":
            self.run.status = "waiting"
            self.emit("run.waiting", status="waiting")
        elif busy and self.run.status == "waiting":
            self.run.status = "running"
            self.emit("run.resumed", status="running")

    # --- outcomes --------------------------------------------------------------------------------

    def claim_retry(self, step_id: str) -> int | None:
        """Start the next attempt of a step waiting to retry; returns the attempt, or None if not due."""
        state = self.steps.get(step_id)
        if self.run.final or state is None or state.status != "pending":
            return None
        if state.next_attempt_at is not None and state.next_attempt_at > self.now:
            return None
        attempt = state.attempt + 1
        self._set(
            step_id, _replace(state, status="running", attempt=attempt, started_at=self.now, next_attempt_at=None)
        )
        self.emit("step.started", step_id, attempt, stepType=self.graph.steps[step_id].type)
        self._settle()
        return attempt

    def deliver_event(self, step_id: str, attempt: int, payload: Any) -> bool:
        """Offer an external event to a waiting ``waitEvent`` step; True when its ``match`` took it."""
        state = self.steps.get(step_id)
        step = self.graph.steps.get(step_id)
        if state is None or step is None or state.status != "waiting" or state.attempt != attempt:
            return False
        data = step.data
        if not isinstance(data, WaitEventData):
            return False
        if data.match:
            try:
                matched = evaluate(expression_source(data.match), {**self.context(), "event": payload})
            except ExpressionError as exc:
                return self.complete(step_id, attempt, Outcome.failure(f"step {step_id!r}: {exc}", "expression"))
            if matched is not True:
                return False
        return self.complete(step_id, attempt, Outcome(ok=True, output=payload, handle="event"))

    def complete(self, step_id: str, attempt: int, outcome: Outcome) -> bool:
        """Record how an attempt of a dispatched or waiting step ended, then advance.

        Returns False (and changes nothing) when the attempt is not the current one: another worker
        recorded it already, or the run ended — so a result is recorded exactly once.
        """
        state = self.steps.get(step_id)
        if self.run.final or state is None or state.attempt != attempt or state.status not in ("running", "waiting"):
            return False
        if outcome.wait:
            self._set(step_id, _replace(state, status="waiting", input=outcome.input))
            self.emit("step.waiting", step_id, attempt, stepType=self.graph.steps[step_id].type)
            self._settle()
            return True
        self._record(self.graph.steps[step_id], attempt, outcome)
        self.advance()
        return True

    def children_done(self, step_id: str, children: list[Child]) -> int:
        """A child run of a subflow or foreach step ended: finish the step, or say how many to start.

        Returns how many more children (foreach elements) may start now; 0 when the step is done
        or still waits for running children.
        """
        state = self.steps.get(step_id)
        step = self.graph.steps.get(step_id)
        if self.run.final or state is None or step is None or state.status != "waiting":
            return 0
        for child in children:
            if child.status in FINAL_RUN_STATUSES and child.status != "succeeded":
                message = (child.error or {}).get("message", child.status)
                self.complete(
                    step_id,
                    state.attempt,
                    Outcome.failure(
                        f"child run {child.id} of step {step_id!r} {child.status}: {message}", "child-failed"
                    ),
                )
                return 0
        done = sorted((c for c in children if c.status == "succeeded"), key=lambda c: c.index)
        if not isinstance(step.data, ForeachData):
            if done:
                self.complete(step_id, state.attempt, Outcome(ok=True, output=done[0].output, input=state.input))
            return 0
        total = len((state.input or {}).get("items", []))
        if len(done) == total:
            self.complete(step_id, state.attempt, Outcome(ok=True, output=[c.output for c in done], input=state.input))
            return 0
        running = sum(1 for c in children if c.status not in FINAL_RUN_STATUSES)
        return max(0, min(step.data.concurrency - running, total - len(children)))

    def _record(self, step: Step, attempt: int, outcome: Outcome) -> None:
        state = self.steps[step.id]
        duration = self._duration_ms(state.started_at)
        if outcome.ok:
            if (
                outcome.handle is not None
                and step.type in WAITING_TYPES
                and not step.edges_on(outcome.handle)
                and outcome.handle != step.handles[0]
            ):
                # a rejection or a timeout nobody handles ends the run (DESIGN §4)
                outcome = Outcome.failure(
                    f"step {step.id!r} ended with {outcome.handle!r} and no edge handles it", outcome.handle
                )
            else:
                self._set(
                    step.id,
                    _replace(
                        state,
                        status="succeeded",
                        output=outcome.output,
                        handle=outcome.handle,
                        input=outcome.input,
                        completed_at=self.now,
                    ),
                )
                self.emit(
                    "step.succeeded", step.id, attempt, status="succeeded", durationMs=duration, stepType=step.type
                )
                return
        error = {"message": outcome.message, "type": outcome.error_type}
        policy = step.data.retry
        if outcome.retryable and policy is not None and attempt < policy.max_attempts:
            next_at = self.now + retry_delay(policy, attempt)
            self._set(
                step.id, _replace(state, status="pending", error=error, input=outcome.input, next_attempt_at=next_at)
            )
            self.emit(
                "step.retrying", step.id, attempt, error=error, nextAttemptAt=format_time(next_at), stepType=step.type
            )
            self.dispatch.append(step.id)
            return
        handled = step.data.on_error == "continue"
        self._set(
            step.id,
            _replace(
                state,
                status="failed",
                error=error,
                handled=handled,
                input=outcome.input,
                output={"error": error} if handled else None,
                completed_at=self.now,
            ),
        )
        self.emit(
            "step.failed",
            step.id,
            attempt,
            status="failed",
            durationMs=duration,
            stepType=step.type,
            error=error,
            handled=handled,
        )
        if not handled:
            self.fail(outcome.message, step.id, outcome.error_type)


def run_pure(step: Step, context: dict[str, Any]) -> Outcome:
    """Run a step that needs no I/O: trigger, transform, condition, switch, fail."""
    data = step.data
    try:
        if step.type == "trigger":
            return Outcome(ok=True, output=context["input"])
        if isinstance(data, TransformData):
            return Outcome(ok=True, output=render(data.output, context))
        if isinstance(data, ConditionData):
            value = evaluate(expression_source(data.expression), context)
            if not isinstance(value, bool):
                return Outcome.failure(f"condition {data.expression!r} gave {value!r}, not a boolean", "expression")
            return Outcome(ok=True, output={"value": value}, handle="true" if value else "false")
        if isinstance(data, SwitchData):
            value = evaluate(expression_source(data.expression), context)
            handle = case_handle(value) if value in data.cases else "default"
            return Outcome(ok=True, output={"value": value}, handle=handle)
        if isinstance(data, FailData):
            return Outcome.failure(str(render(data.message, context)), "fail")
    except ExpressionError as exc:
        return Outcome.failure(f"step {step.id!r}: {exc}", "expression")
    return Outcome.failure(f"step type {step.type!r} cannot run inline", "configuration")


def _replace(state: StepState, **changes: Any) -> StepState:
    fields = {name: getattr(state, name) for name in state.__slots__}
    fields.update(changes)
    return StepState(**fields)
