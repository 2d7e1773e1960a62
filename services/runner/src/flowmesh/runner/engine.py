"""How a run moves (DESIGN §4, §5): the changes one transaction makes to a run. Pure: no I/O.

An :class:`Execution` holds a run's state as loaded (under the run's row lock), applies an event
(start, a step's outcome, a resume, a cancel), advances the graph as far as it can go without I/O
(pure steps run inline, so a chain of transforms costs one transaction), and collects what must be
written: changed steps, new run events in ``seq`` order, and steps to hand to workers.

Time is data here too: a delay, a wait with ``timeoutMs``, a worker's attempt with ``timeoutMs``
and the run's time limit each record a deadline with the change, and the change lists the durable
timers to arm or cancel once it is committed. A fired timer is only a hint: :meth:`Execution.expire`
acts on it when it still matches the state.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Final

from pydantic import ValidationError

from flowmesh.contracts.expressions import ExpressionError, evaluate, expression_source, render
from flowmesh.contracts.ids import format_time
from flowmesh.contracts.models.definition import (
    ConditionData,
    DelayData,
    FailData,
    ForeachData,
    SubflowData,
    SwitchData,
    TransformData,
    WaitEventData,
    case_handle,
)
from flowmesh.contracts.models.run_events import (
    RUN_ENDED,
    EventData,
    RunFailure,
    RunQueuedData,
    RunResumedData,
    RunStartedData,
    RunWaitingData,
    StepFailedData,
    StepRetryingData,
    StepSkippedData,
    StepStartedData,
    StepSucceededData,
    StepWaitingData,
    TokenUsage,
)
from flowmesh.contracts.models.runs import FINAL_RUN_STATUSES
from flowmesh.contracts.models.timers import DeadlinePayload
from flowmesh.contracts.subjects import tenant_token
from flowmesh.runner.graph import Graph, Step, StepState, retry_delay

WAITING_TYPES: Final = frozenset({"approval", "waitEvent"})
"""Steps that wait for something from outside once started."""
OPEN_STEP: Final = frozenset({"running", "waiting"})
"""Step statuses an attempt's deadline applies to."""
ATTEMPT_GRACE: Final = timedelta(seconds=2)
"""How long after ``timeoutMs`` the durable timer of a worker's attempt fires: the worker bounds the
attempt itself, the timer is for a worker that died or hung, so it must not beat a live one."""
TIMER_OWNER: Final = "runner"
"""The runner's ``owner`` token for the scheduler's timers."""
MAX_EARLY_S: Final = 60.0
"""A timer that fires more than this before its deadline (by our clock) is not ours to wait for."""


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
    deadline_at: datetime | None = None

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
    usage: dict[str, int] | None = None
    """Tokens an ``llm`` attempt used (``{inputTokens, outputTokens}``): put in ``step.succeeded``'s
    data, where the usage service meters them."""

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
class Deadline:
    """What a durable timer of the runner stands for: a run's deadline, or one step attempt's.

    Carried as the timer's payload; whoever fires it is only giving a hint, checked against the
    run's state under its lock (:meth:`Execution.expire`).
    """

    run_id: str
    retry_count: int
    step_id: str | None = None
    attempt: int = 0

    @property
    def key(self) -> str:
        """The timer's key: one per run (and retry), one per step attempt; the step id comes last."""
        if self.step_id is None:
            return f"run:{self.run_id}:{self.retry_count}"
        return f"step:{self.run_id}:{self.retry_count}:{self.attempt}:{self.step_id}"

    def payload(self) -> DeadlinePayload:
        """The timer's payload."""
        if self.step_id is None:
            return DeadlinePayload(run_id=self.run_id, retry_count=self.retry_count)
        return DeadlinePayload(
            run_id=self.run_id, retry_count=self.retry_count, step_id=self.step_id, attempt=self.attempt
        )

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> Deadline | None:
        """The deadline a fired timer's payload names, or None when it is not one of ours."""
        try:
            found = DeadlinePayload.model_validate(payload)
        except ValidationError:
            return None
        return cls(found.run_id, found.retry_count, found.step_id, found.attempt or 0)


@dataclass(frozen=True, slots=True)
class TimerOp:
    """A timer to arm (``due_at`` set) or to cancel (``due_at`` None) once the change is committed."""

    deadline: Deadline
    due_at: datetime | None


@dataclass(frozen=True, slots=True)
class NewEvent:
    """A run event to append, numbered when written."""

    seq: int
    type: str
    ts: datetime
    step_id: str | None
    attempt: int | None
    data: EventData


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
    timers: dict[str, TimerOp] = field(default_factory=dict)
    """Timers to arm or cancel after the commit, by key (the last word for a key wins)."""
    abandoned: list[str] = field(default_factory=list)
    """Subflow/foreach steps whose attempt timed out: their open child runs are to be cancelled."""
    _context: dict[str, Any] | None = None

    # --- bookkeeping -----------------------------------------------------------------------------

    def emit(self, data: EventData, step_id: str | None = None, attempt: int | None = None) -> None:
        """Append a run event of ``data``'s type with the next ``seq``."""
        self.run.last_seq += 1
        self.run_changed = True
        self.events.append(NewEvent(self.run.last_seq, data.TYPE, self.now, step_id, attempt, data))

    def _set(self, step_id: str, state: StepState) -> None:
        old = self.steps.get(step_id)
        if state.deadline_at is not None and state.status not in OPEN_STEP:
            state.deadline_at = None  # a deadline is for an open attempt or wait only
        moved = old is None or state.deadline_at != old.deadline_at or state.attempt != old.attempt
        if moved and old is not None and old.deadline_at is not None:
            self._disarm(self._step_deadline(step_id, old.attempt))
        if moved and state.deadline_at is not None:
            self._arm(self._step_deadline(step_id, state.attempt), state.deadline_at)
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

    # --- timers ----------------------------------------------------------------------------------

    def _step_deadline(self, step_id: str, attempt: int) -> Deadline:
        return Deadline(self.run.id, self.run.retry_count, step_id, attempt)

    def _arm(self, deadline: Deadline, due_at: datetime) -> None:
        self.timers[deadline.key] = TimerOp(deadline, due_at)

    def _disarm(self, deadline: Deadline) -> None:
        armed = self.timers.get(deadline.key)
        if armed is not None and armed.due_at is not None:
            del self.timers[deadline.key]  # armed by this very change: it never reached the scheduler
        else:
            self.timers[deadline.key] = TimerOp(deadline, None)

    def start_clock(self) -> None:
        """The run's time limit starts now (a new or reopened run); only a flow's own limit arms a timer."""
        if self.graph.run_timeout_ms is None:
            self.run.deadline_at = None
            return
        self.run.deadline_at = _ms(self.now + timedelta(milliseconds=self.graph.run_timeout_ms))
        self.run_changed = True
        if self.graph.run_timer:
            self._arm(Deadline(self.run.id, self.run.retry_count), self.run.deadline_at)

    def _attempt_deadline(self, step: Step) -> datetime | None:
        """When a worker's attempt of ``step`` (starting now) is given up on, if it has ``timeoutMs``."""
        timeout_ms = step.data.timeout_ms
        if timeout_ms is None:
            return None
        grace = timedelta(0) if isinstance(step.data, SubflowData | ForeachData) else ATTEMPT_GRACE
        return _ms(self.now + timedelta(milliseconds=timeout_ms) + grace)

    def expire(
        self, deadline: Deadline, due_at: datetime | None = None, fired_at: datetime | None = None
    ) -> float | None:
        """A timer fired (or the sweep found a deadline overdue): act on it if it is still current.

        Stale timers change nothing: the run ended or was reopened since, the step moved to another
        attempt or finished, or ``due_at`` is not the deadline recorded now. Returns the seconds
        still to wait when the deadline has not come by our clock (a scheduler clock ahead of
        ours), else None.
        """
        if self.run.final or self.run.retry_count != deadline.retry_count:
            return None
        state = None
        if deadline.step_id is None:
            target = self.run.deadline_at
        else:
            state = self.steps.get(deadline.step_id)
            if state is None or state.attempt != deadline.attempt or state.status not in OPEN_STEP:
                return None
            target = state.deadline_at
        if target is None or (due_at is not None and abs(due_at - target) > timedelta(milliseconds=1)):
            return None
        early = (target - self.now).total_seconds()
        if early > 0:
            return early if early <= MAX_EARLY_S else None
        if deadline.step_id is None or state is None:
            self.time_out()
        else:
            self._expire_step(deadline.step_id, state, fired_at or self.now)
        if due_at is not None:
            self.timers.pop(deadline.key, None)  # it fired: nothing left to cancel
        return None

    def _expire_step(self, step_id: str, state: StepState, fired_at: datetime) -> None:
        step = self.graph.steps[step_id]
        data = step.data
        if isinstance(data, DelayData):
            outcome = Outcome(ok=True, output={"firedAt": format_time(fired_at)}, input=state.input)
        elif step.type == "approval":
            outcome = Outcome(ok=True, output={"decision": "timeout"}, handle="timeout")
        elif step.type == "waitEvent":
            outcome = Outcome(ok=True, output=None, handle="timeout")
        else:
            # a worker's attempt that never reported (its worker died or hung): a retryable timeout,
            # except for a step waiting on child runs, which are cancelled instead of started again
            children = isinstance(data, SubflowData | ForeachData)
            if children:
                self.abandoned.append(step_id)
            outcome = Outcome(
                ok=False,
                message=f"attempt {state.attempt} of step {step_id!r} did not finish within {data.timeout_ms} ms",
                error_type="timeout",
                retryable=not children,
                input=state.input,
            )
        self.complete(step_id, state.attempt, outcome)

    def time_out(self) -> None:
        """End the run as timed out: its time limit passed; unfinished steps are cancelled."""
        limit = self.graph.run_timeout_ms
        self._finish(
            "timedOut",
            error={"message": f"the run did not finish within {limit} ms", "stepId": None, "type": "timeout"},
        )

    # --- run lifecycle ---------------------------------------------------------------------------

    def queue(self) -> None:
        """A new run: its first event; its time limit starts."""
        self.emit(
            RunQueuedData(status="queued", trigger_type=self.run.trigger_type, parent_run_id=self.run.parent_run_id)
        )
        self.start_clock()

    def _finish(self, status: str, *, error: dict[str, Any] | None = None) -> None:
        self.run.status = status
        self.run.completed_at = self.now
        self.run.error = error
        self.run.output = self.graph.output(self.steps) if status == "succeeded" else None
        for step_id, state in list(self.steps.items()):
            if not state.final:
                self._set(step_id, _replace(state, status="cancelled", completed_at=self.now))
        if self.graph.run_timer and self.run.deadline_at is not None:
            self._disarm(Deadline(self.run.id, self.run.retry_count))
        data = RUN_ENDED[status](
            status=status,
            duration_ms=self._duration_ms(self.run.started_at),
            trigger_type=self.run.trigger_type,
            parent_run_id=self.run.parent_run_id,
        )
        if error is not None:
            data.error = RunFailure.model_validate(error)  # set only when there is one: absent, not null
        self.emit(data)

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
            self.emit(RunStartedData(status="running"))
        candidates: set[str] | None = None  # first look: every step; then only those after what finished
        while not self.run.final:
            ready, skip = self.graph.frontier(self.steps, candidates)
            if not ready and not skip:
                break
            candidates = {e.target for step_id in (*ready, *skip) for e in self.graph.steps[step_id].outgoing}
            for step_id in skip:
                step = self.graph.steps[step_id]
                self._set(step_id, StepState(status="skipped", completed_at=self.now))
                self.emit(StepSkippedData(status="skipped", step_type=step.type), step_id)
            for step_id in ready:
                if self.run.final:
                    break
                step = self.graph.steps[step_id]
                self._set(step_id, StepState(status="running", attempt=1, started_at=self.now))
                self.emit(StepStartedData(step_type=step.type), step_id, 1)
                if step.pure:
                    self._record(step, 1, run_pure(step, self.context()))
                elif isinstance(step.data, DelayData):
                    self._start_delay(step, step.data)
                elif step.type in WAITING_TYPES:
                    wait_for = None
                    if isinstance(step.data, WaitEventData):
                        wait_for = f"{tenant_token(self.run.tenant_id)}.{step.data.event_type}"
                    timeout_ms = step.data.timeout_ms
                    deadline = _ms(self.now + timedelta(milliseconds=timeout_ms)) if timeout_ms else None
                    self._set(
                        step_id,
                        _replace(self.steps[step_id], status="waiting", wait_for=wait_for, deadline_at=deadline),
                    )
                    self.emit(StepWaitingData(step_type=step.type), step_id, 1)
                else:
                    deadline = self._attempt_deadline(step)
                    if deadline is not None:
                        self._set(step_id, _replace(self.steps[step_id], deadline_at=deadline))
                    self.dispatch.append(step_id)
        self._settle()

    def _start_delay(self, step: Step, data: DelayData) -> None:
        """Wait until the delay's time (a durable timer), or go on at once when it has come."""
        if data.duration_ms is not None:
            due = self.now + timedelta(milliseconds=data.duration_ms)
        else:
            try:
                value = render(data.until, self.context())
            except ExpressionError as exc:
                self._record(step, 1, Outcome.failure(f"step {step.id!r}: {exc}", "expression"))
                return
            found = _parse_time(value)
            if found is None:
                message = f"step {step.id!r}: until gave {value!r}, not an RFC 3339 time with an offset"
                self._record(step, 1, Outcome.failure(message, "configuration"))
                return
            due = found
        due = _ms(due)
        waited = {"until": format_time(due)}
        if due <= self.now:
            self._record(step, 1, Outcome(ok=True, output={"firedAt": format_time(self.now)}, input=waited))
            return
        self._set(step.id, _replace(self.steps[step.id], status="waiting", input=waited, deadline_at=due))
        self.emit(StepWaitingData(step_type=step.type), step.id, 1)

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
            self.emit(RunWaitingData(status="waiting"))
        elif busy and self.run.status == "waiting":
            self.run.status = "running"
            self.emit(RunResumedData(status="running"))

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
            step_id,
            _replace(
                state,
                status="running",
                attempt=attempt,
                started_at=self.now,
                next_attempt_at=None,
                deadline_at=self._attempt_deadline(self.graph.steps[step_id]),
            ),
        )
        self.emit(StepStartedData(step_type=self.graph.steps[step_id].type), step_id, attempt)
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
            self.emit(StepWaitingData(step_type=self.graph.steps[step_id].type), step_id, attempt)
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
                if outcome.handle == "timeout":
                    message = (
                        f"step {step.id!r} timed out after {step.data.timeout_ms} ms"
                        " and has no edge on its 'timeout' handle"
                    )
                else:
                    message = f"step {step.id!r} ended with {outcome.handle!r} and no edge handles it"
                outcome = Outcome.failure(message, outcome.handle)
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
                data = StepSucceededData(status="succeeded", duration_ms=duration, step_type=step.type)
                if outcome.usage is not None:
                    data.usage = TokenUsage.model_validate(outcome.usage)  # llm steps only: absent otherwise
                self.emit(data, step.id, attempt)
                return
        error = {"message": outcome.message, "type": outcome.error_type}
        policy = step.data.retry
        if outcome.retryable and policy is not None and attempt < policy.max_attempts:
            next_at = self.now + retry_delay(policy, attempt)
            self._set(
                step.id, _replace(state, status="pending", error=error, input=outcome.input, next_attempt_at=next_at)
            )
            retrying = StepRetryingData(error=error, next_attempt_at=format_time(next_at), step_type=step.type)
            self.emit(retrying, step.id, attempt)
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
        failed = StepFailedData(status="failed", duration_ms=duration, step_type=step.type, error=error)
        failed.handled = handled
        self.emit(failed, step.id, attempt)
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


def _ms(value: datetime) -> datetime:
    """A time cut to whole milliseconds: what the wire carries, so a deadline survives the round trip."""
    return value.replace(microsecond=value.microsecond - value.microsecond % 1000)


def _parse_time(value: Any) -> datetime | None:
    """An RFC 3339 time with an offset (or a timezone-aware datetime), else None."""
    if isinstance(value, datetime):
        found = value
    elif isinstance(value, str):
        try:
            found = datetime.fromisoformat(value.strip())
        except ValueError:
            return None
    else:
        return None
    return found if found.tzinfo is not None else None


def _replace(state: StepState, **changes: Any) -> StepState:
    fields = {name: getattr(state, name) for name in state.__slots__}
    fields.update(changes)
    return StepState(**fields)
