"""How a run moves: the changes one transaction makes to a run. Pure: no I/O.

A :class:`RunState` holds a run's state as loaded (under the run's row lock), applies an event
(start, a step's outcome, a resume, a cancel), advances the graph as far as it can go without I/O
(pure steps run inline, so a chain of transforms costs one transaction), and collects what must be
written: changed steps, new run events in ``seq`` order, and steps to hand to workers. What each
step type does comes from the registry (``docs/steps.md``), never from a test of its type here.

Time is data here too: a delay, a wait with ``timeoutMs``, a worker's attempt with ``timeoutMs``
and the run's time limit each record a deadline with the change, and the change lists the durable
timers to arm or cancel once it is committed. A fired timer is only a hint: :meth:`RunState.expire`
acts on it when it still matches the state.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Final

import orjson
from pydantic import ValidationError

from flowmesh.contracts.errors import Conflict
from flowmesh.contracts.expressions import ExpressionError
from flowmesh.contracts.ids import format_time
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
from flowmesh.contracts.models.usage import PlanCaps
from flowmesh.runner import builtin_steps
from flowmesh.runner.graph import Graph, Step, StepState, retry_delay
from flowmesh.runner.kinds import runner_for
from flowmesh.runner.outcome import Child, Outcome

__all__ = ["Child", "Deadline", "NewEvent", "Outcome", "RunRecord", "RunState", "TimerOp"]

OPEN_STEP: Final = frozenset({"running", "waiting"})
"""Step statuses an attempt's deadline applies to."""
ATTEMPT_GRACE: Final = timedelta(seconds=2)
"""How long after ``timeoutMs`` the durable timer of a worker's attempt fires: the worker bounds the
attempt itself, the timer is for a worker that died or hung, so it must not beat a live one."""
TIMER_OWNER: Final = "runner"
"""The runner's ``owner`` token for the scheduler's timers."""
MAX_EARLY_S: Final = 60.0
"""A timer that fires more than this before its deadline (by our clock) is not ours to wait for."""
_ms = builtin_steps.whole_ms

OUTPUT_TOO_LARGE: Final = "output-too-large"
"""The error type of a step or a run whose output is over its limit (:class:`OutputLimits`)."""


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
    traceparent: str | None = None
    """The trace context of what started the run: its steps, however late, continue that trace."""
    revision: int = 0
    """One more with every committed change of the run (a change made from a run held in memory
    applies only if no other came between)."""

    @property
    def final(self) -> bool:
        """Succeeded, failed, cancelled or timed out."""
        return self.status in FINAL_RUN_STATUSES


@dataclass(frozen=True, slots=True)
class OutputLimits:
    """The largest output, as JSON, a step may record and a run may end with (0: no limit).

    An output over its limit is not recorded: the step (or the run) fails with ``output-too-large``.
    Every value a run holds then stays readable whole (a reply holds one NATS message), and a
    template that multiplies its input cannot fill the database.
    """

    step_bytes: int = 1024 * 1024
    run_bytes: int = 1024 * 1024
    plan: str | None = None
    """The plan whose caps lowered these limits (named in the error), None for the operator's own."""

    def within(self, plan: str, caps: PlanCaps) -> OutputLimits:
        """These limits (the operator's ceiling) lowered to a plan's caps, where the plan's are lower."""
        step, run = _lower(self.step_bytes, caps.step_output_bytes), _lower(self.run_bytes, caps.run_output_bytes)
        if (step, run) == (self.step_bytes, self.run_bytes):
            return self
        return OutputLimits(step, run, plan)

    def over(self, size: int, limit: int) -> str:
        """The end of the message of an output of ``size`` bytes over ``limit``."""
        whose = f"the {self.plan} plan's limit" if self.plan is not None else "the limit"
        return f"is {size} bytes, over {whose} of {limit} bytes"

    @staticmethod
    def excess(value: Any, limit: int) -> int | None:
        """The size of ``value`` as JSON when it is over ``limit`` bytes, else None."""
        if limit <= 0 or value is None:
            return None
        try:
            size = len(orjson.dumps(value))
        except TypeError:  # not JSON: the store refuses it with its own error
            return None
        return size if size > limit else None


def _lower(ceiling: int, cap: int | None) -> int:
    """The smaller of an operator's limit and a plan's cap (0 and None: none)."""
    if cap is None or cap <= 0:
        return ceiling
    return cap if ceiling <= 0 else min(ceiling, cap)


@dataclass(frozen=True, slots=True)
class Deadline:
    """What a durable timer of the runner stands for: a run's deadline, or one step attempt's.

    Carried as the timer's payload; whoever fires it is only giving a hint, checked against the
    run's state under its lock (:meth:`RunState.expire`).
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
class RunState:
    """A run's state as one transaction loaded it, and the changes that transaction makes.

    The pure core of the runner: what each step type does comes from the registry
    (:func:`flowmesh.runner.kinds.runner_for` and the step's :class:`~flowmesh.contracts.steps.StepKind`).
    """

    run: RunRecord
    graph: Graph
    steps: dict[str, StepState]
    now: datetime
    events: list[NewEvent] = field(default_factory=list)
    changed: set[str] = field(default_factory=set)
    dispatch: list[str] = field(default_factory=list)
    timers: dict[str, TimerOp] = field(default_factory=dict)
    """Timers to arm or cancel after the commit, by key (the last word for a key wins)."""
    abandoned: list[str] = field(default_factory=list)
    """Steps waiting on child runs whose attempt timed out: their open child runs are to be cancelled."""
    limits: OutputLimits = field(default_factory=OutputLimits)
    _context: dict[str, Any] | None = None

    # --- bookkeeping -----------------------------------------------------------------------------

    def emit(self, data: EventData, step_id: str | None = None, attempt: int | None = None) -> None:
        """Append a run event of ``data``'s type with the next ``seq``."""
        self.run.last_seq += 1
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

    def deadline_in(self, timeout_ms: int | None) -> datetime | None:
        """``timeout_ms`` from now (whole milliseconds), or None without a timeout."""
        return _ms(self.now + timedelta(milliseconds=timeout_ms)) if timeout_ms else None

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
        if self.graph.run_timer:
            self._arm(Deadline(self.run.id, self.run.retry_count), self.run.deadline_at)

    def _attempt_deadline(self, step: Step) -> datetime | None:
        """When a worker's attempt of ``step`` (starting now) is given up on, if it has ``timeoutMs``.

        A wait for child runs ends at ``timeoutMs`` exactly; a worker's own attempt gets a grace,
        since the worker bounds it and the timer is only for a worker that died.
        """
        timeout_ms = step.data.timeout_ms
        if timeout_ms is None:
            return None
        grace = timedelta(0) if step.kind.timeout == "children" else ATTEMPT_GRACE
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
            # a timer armed within the millisecond's tolerance of the deadline may fire before it; the
            # step waited (``early`` above) until the deadline came by our clock: never report less
            self._expire_step(self.graph.steps[deadline.step_id], state, max(fired_at or self.now, target))
        if due_at is not None:
            self.timers.pop(deadline.key, None)  # it fired: nothing left to cancel
        return None

    def _expire_step(self, step: Step, state: StepState, fired_at: datetime) -> None:
        expire = runner_for(step.type).expire
        if step.kind.runs == "wait" and expire is not None:
            outcome = expire(step, state, fired_at)
        else:
            # a worker's attempt that never reported (its worker died or hung): a retryable timeout,
            # except for a step waiting on child runs, which are cancelled instead of started again
            children = step.kind.runs == "children"
            if children:
                self.abandoned.append(step.id)
            outcome = Outcome(
                ok=False,
                message=f"attempt {state.attempt} of step {step.id!r} did not finish within {step.data.timeout_ms} ms",
                error_type="timeout",
                retryable=not children,
                input=state.input,
            )
        self.complete(step.id, state.attempt, outcome)

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

    def requeue(self) -> None:
        """A failed run reopened in place (its steps reset by the caller): queued again, its time limit anew."""
        run = self.run
        run.status, run.error, run.output, run.completed_at = "queued", None, None, None
        self.emit(RunQueuedData(status="queued", trigger_type=run.trigger_type, retry_count=run.retry_count))
        self.start_clock()

    def _finish(self, status: str, *, error: dict[str, Any] | None = None) -> None:
        output = self.graph.output(self.steps) if status == "succeeded" else None
        if (size := self.limits.excess(output, self.limits.run_bytes)) is not None:
            message = f"the run's output {self.limits.over(size, self.limits.run_bytes)}"
            status, output, error = "failed", None, {"message": message, "stepId": None, "type": OUTPUT_TOO_LARGE}
        self.run.status = status
        self.run.completed_at = self.now
        self.run.error = error
        self.run.output = output
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
                self._begin(self.graph.steps[step_id])
        self._settle()

    def _begin(self, step: Step) -> None:
        """A step's turn came: run it inline, start its wait, or hand it to a worker, as its kind runs."""
        self._set(step.id, StepState(status="running", attempt=1, started_at=self.now))
        self.emit(StepStartedData(step_type=step.type), step.id, 1)
        behaviour = runner_for(step.type)
        if step.kind.runs == "pure":
            self.record(step, 1, self._compute(step))
        elif step.kind.runs == "wait" and behaviour.wait is not None:
            behaviour.wait(self, step)
        else:
            deadline = self._attempt_deadline(step)
            if deadline is not None:
                self._set(step.id, _replace(self.steps[step.id], deadline_at=deadline))
            self.dispatch.append(step.id)

    def _compute(self, step: Step) -> Outcome:
        compute = runner_for(step.type).compute
        if compute is None:
            return Outcome.failure(f"step type {step.type!r} cannot run inline", "configuration")
        try:
            return compute(step, self.context())
        except ExpressionError as exc:
            return Outcome.failure(f"step {step.id!r}: {exc}", exc.error_type)

    def wait(self, step: Step, *, deadline: datetime | None, wait_for: str | None = None, input: Any = None) -> None:
        """The step's attempt waits (for ``deadline``, an event keyed ``wait_for``, or a decision)."""
        state = _replace(self.steps[step.id], status="waiting", wait_for=wait_for, deadline_at=deadline, input=input)
        self._set(step.id, state)
        self.emit(StepWaitingData(step_type=step.type), step.id, state.attempt)

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
        """Offer an external event to a step waiting for one; True when the step took it."""
        state = self.steps.get(step_id)
        step = self.graph.steps.get(step_id)
        if state is None or step is None or state.status != "waiting" or state.attempt != attempt:
            return False
        on_event = runner_for(step.type).on_event
        outcome = on_event(self, step, payload) if on_event is not None else None
        return outcome is not None and self.complete(step_id, attempt, outcome)

    def resume(self, step_id: str, decision: str, data: dict[str, Any], by: str) -> None:
        """A person decided on a step waiting for a decision (an approval): it ends with that decision.

        Raises:
            Conflict: the run ended, or the step is not waiting for a decision.
        """
        state = self.steps.get(step_id)
        step = self.graph.steps.get(step_id)
        decide = runner_for(step.type).decide if step is not None else None
        if self.run.final or state is None or decide is None or state.status != "waiting":
            raise Conflict(f"step {step_id!r} of run {self.run.id} is not waiting for an approval")
        self.complete(step_id, state.attempt, decide(decision, data, by))

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
        self.record(self.graph.steps[step_id], attempt, outcome)
        self.advance()
        return True

    def children_done(self, step_id: str, children: list[Child]) -> int:
        """A child run of a step waiting on child runs ended: finish the step, or say how many to start.

        Returns how many more children may start now; 0 when the step is done or still waits for
        running children.
        """
        state = self.steps.get(step_id)
        step = self.graph.steps.get(step_id)
        join = runner_for(step.type).join if step is not None else None
        if self.run.final or state is None or step is None or join is None or state.status != "waiting":
            return 0
        for child in children:
            if child.status in FINAL_RUN_STATUSES and child.status != "succeeded":
                message = (child.error or {}).get("message", child.status)
                failure = Outcome.failure(
                    f"child run {child.id} of step {step_id!r} {child.status}: {message}", "child-failed"
                )
                self.complete(step_id, state.attempt, failure)
                return 0
        joined = join(step, state, children)
        if joined.outcome is not None:
            self.complete(step_id, state.attempt, joined.outcome)
            return 0
        return joined.more

    def record(self, step: Step, attempt: int, outcome: Outcome) -> None:
        """Record an attempt's outcome: succeeded, retrying, or failed (handled, or failing the run)."""
        if outcome.ok and (size := self.limits.excess(outcome.output, self.limits.step_bytes)) is not None:
            message = f"step {step.id!r}: its output {self.limits.over(size, self.limits.step_bytes)}"
            outcome = Outcome(ok=False, message=message, error_type=OUTPUT_TOO_LARGE, input=outcome.input)
        if outcome.ok:
            unhandled = self._unhandled(step, outcome)
            if unhandled is None:
                self._succeed(step, attempt, outcome)
                return
            outcome = unhandled
        error = {"message": outcome.message, "type": outcome.error_type}
        policy = step.data.retry
        if outcome.retryable and policy is not None and attempt < policy.max_attempts:
            self._retry(step, attempt, outcome, error)
        else:
            self._fail_step(step, attempt, outcome, error)

    @staticmethod
    def _unhandled(step: Step, outcome: Outcome) -> Outcome | None:
        """A wait that ended on a handle no edge takes (a rejection, a timeout): the failure it is."""
        handle = outcome.handle
        default = step.handles[0] if step.handles else None
        if handle is None or step.kind.runs != "wait" or step.edges_on(handle) or handle == default:
            return None
        if handle == "timeout":
            message = (
                f"step {step.id!r} timed out after {step.data.timeout_ms} ms and has no edge on its 'timeout' handle"
            )
        else:
            message = f"step {step.id!r} ended with {handle!r} and no edge handles it"
        return Outcome.failure(message, handle)

    def _succeed(self, step: Step, attempt: int, outcome: Outcome) -> None:
        state = self.steps[step.id]
        duration = self._duration_ms(state.started_at)
        done = _replace(
            state,
            status="succeeded",
            output=outcome.output,
            handle=outcome.handle,
            input=outcome.input,
            completed_at=self.now,
        )
        self._set(step.id, done)
        data = StepSucceededData(status="succeeded", duration_ms=duration, step_type=step.type)
        if outcome.usage is not None:
            data.usage = TokenUsage.model_validate(outcome.usage)  # llm steps only: absent otherwise
        self.emit(data, step.id, attempt)

    def _retry(self, step: Step, attempt: int, outcome: Outcome, error: dict[str, Any]) -> None:
        assert step.data.retry is not None
        next_at = self.now + retry_delay(step.data.retry, attempt)
        state = self.steps[step.id]
        self._set(step.id, _replace(state, status="pending", error=error, input=outcome.input, next_attempt_at=next_at))
        retrying = StepRetryingData(error=error, next_attempt_at=format_time(next_at), step_type=step.type)
        self.emit(retrying, step.id, attempt)
        self.dispatch.append(step.id)

    def _fail_step(self, step: Step, attempt: int, outcome: Outcome, error: dict[str, Any]) -> None:
        state = self.steps[step.id]
        duration = self._duration_ms(state.started_at)
        handled = step.data.on_error == "continue"
        failed_state = _replace(
            state,
            status="failed",
            error=error,
            handled=handled,
            input=outcome.input,
            output={"error": error} if handled else None,
            completed_at=self.now,
        )
        self._set(step.id, failed_state)
        failed = StepFailedData(status="failed", duration_ms=duration, step_type=step.type, error=error)
        failed.handled = handled
        self.emit(failed, step.id, attempt)
        if not handled:
            self.fail(outcome.message, step.id, outcome.error_type)


def _replace(state: StepState, **changes: Any) -> StepState:
    fields = {name: getattr(state, name) for name in state.__slots__}
    fields.update(changes)
    return StepState(**fields)
