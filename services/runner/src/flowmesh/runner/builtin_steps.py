"""How the runner executes each built-in step type: one :class:`StepRunner` per type, registered here.

Each entry fills the slots its kind's run mode needs (:mod:`flowmesh.runner.kinds`); the kinds
themselves (run mode, handles, timeout policy, validation) are in :mod:`flowmesh.contracts.steps`.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from flowmesh.contracts.expressions import SECRETS_NAME, ExpressionError, evaluate, expression_source, render
from flowmesh.contracts.ids import format_time
from flowmesh.contracts.models.definition import (
    ConditionData,
    DelayData,
    FailData,
    ForeachData,
    HttpData,
    LlmData,
    PublishData,
    SwitchData,
    TransformData,
    WaitEventData,
    case_handle,
)
from flowmesh.contracts.models.runs import FINAL_RUN_STATUSES
from flowmesh.contracts.steps import ENTRY_TYPE
from flowmesh.contracts.subjects import tenant_token
from flowmesh.runner import secrets
from flowmesh.runner.io_steps import run_publish
from flowmesh.runner.kinds import Context, Joined, StepRunner, StepTools, register_runner
from flowmesh.runner.outcome import Child, Outcome

if TYPE_CHECKING:
    from flowmesh.runner.engine import RunState
    from flowmesh.runner.graph import Step, StepState


# --- pure ----------------------------------------------------------------------------------------


def _trigger(step: Step, context: Context) -> Outcome:
    return Outcome(ok=True, output=context["input"])


def _transform(step: Step, context: Context) -> Outcome:
    assert isinstance(step.data, TransformData)
    return Outcome(ok=True, output=render(step.data.output, context))


def _condition(step: Step, context: Context) -> Outcome:
    data = step.data
    assert isinstance(data, ConditionData)
    value = evaluate(expression_source(data.expression), context)
    if not isinstance(value, bool):
        return Outcome.failure(f"condition {data.expression!r} gave {value!r}, not a boolean", "expression")
    return Outcome(ok=True, output={"value": value}, handle="true" if value else "false")


def _switch(step: Step, context: Context) -> Outcome:
    data = step.data
    assert isinstance(data, SwitchData)
    value = evaluate(expression_source(data.expression), context)
    handle = case_handle(value) if value in data.cases else "default"
    return Outcome(ok=True, output={"value": value}, handle=handle)


def _fail(step: Step, context: Context) -> Outcome:
    assert isinstance(step.data, FailData)
    return Outcome.failure(str(render(step.data.message, context)), "fail")


# --- waits ---------------------------------------------------------------------------------------


def _delay(state: RunState, step: Step) -> None:
    """Wait until the delay's time (a durable timer), or go on at once when it has come."""
    data = step.data
    assert isinstance(data, DelayData)
    if data.duration_ms is not None:
        due = state.now + timedelta(milliseconds=data.duration_ms)
    else:
        try:
            value = render(data.until, state.context())
        except ExpressionError as exc:
            state.record(step, 1, Outcome.failure(f"step {step.id!r}: {exc}", exc.error_type))
            return
        found = _parse_time(value)
        if found is None:
            message = f"step {step.id!r}: until gave {value!r}, not an RFC 3339 time with an offset"
            state.record(step, 1, Outcome.failure(message, "configuration"))
            return
        due = found
    due = whole_ms(due)
    waited = {"until": format_time(due)}
    if due <= state.now:
        state.record(step, 1, Outcome(ok=True, output={"firedAt": format_time(state.now)}, input=waited))
        return
    state.wait(step, deadline=due, input=waited)


def _delay_fired(step: Step, state: StepState, fired_at: datetime) -> Outcome:
    return Outcome(ok=True, output={"firedAt": format_time(fired_at)}, input=state.input)


def _approval(state: RunState, step: Step) -> None:
    state.wait(step, deadline=state.deadline_in(step.data.timeout_ms))


def _approval_timed_out(step: Step, state: StepState, fired_at: datetime) -> Outcome:
    return Outcome(ok=True, output={"decision": "timeout"}, handle="timeout")


def _approval_decided(decision: str, data: dict[str, Any], by: str) -> Outcome:
    return Outcome(ok=True, output={**data, "decision": decision, "by": by}, handle=decision)


def _wait_event(state: RunState, step: Step) -> None:
    assert isinstance(step.data, WaitEventData)
    wait_for = f"{tenant_token(state.run.tenant_id)}.{step.data.event_type}"
    state.wait(step, deadline=state.deadline_in(step.data.timeout_ms), wait_for=wait_for)


def _wait_event_timed_out(step: Step, state: StepState, fired_at: datetime) -> Outcome:
    return Outcome(ok=True, output=None, handle="timeout")


def _event_offered(state: RunState, step: Step, payload: Any) -> Outcome | None:
    """The event when ``match`` takes it (a failure when ``match`` cannot be evaluated), else None."""
    data = step.data
    assert isinstance(data, WaitEventData)
    if data.match:
        try:
            matched = evaluate(expression_source(data.match), {**state.context(), "event": payload})
        except ExpressionError as exc:
            return Outcome.failure(f"step {step.id!r}: {exc}", exc.error_type)
        if matched is not True:
            return None
    return Outcome(ok=True, output=payload, handle="event")


# --- I/O -----------------------------------------------------------------------------------------


async def _http(tools: StepTools, state: RunState, step: Step) -> Outcome:
    assert isinstance(step.data, HttpData)
    found = await secrets.resolve(tools.secrets, state.run.tenant_id, secrets.step_secrets(step.data.model_dump()))
    if isinstance(found, Outcome):
        return found
    context = {**state.context(), SECRETS_NAME: dict(found.values)}
    outcome = await tools.http.run(step.data, context, f"{state.run.id}:{step.id}", secrets=found.values.values())
    return found.outcome(outcome)


async def _llm(tools: StepTools, state: RunState, step: Step) -> Outcome:
    assert isinstance(step.data, LlmData)
    if tools.llm is None:
        return Outcome.failure(f"step type {step.type!r} is not available in this runner yet", "unsupported")
    found = await secrets.resolve(tools.secrets, state.run.tenant_id, secrets.step_secrets(step.data.model_dump()))
    if isinstance(found, Outcome):
        return found
    context = {**state.context(), SECRETS_NAME: dict(found.values)}
    return found.outcome(await tools.llm.run(step.data, context, tenant=state.run.tenant_id))


async def _publish(tools: StepTools, state: RunState, step: Step) -> Outcome:
    assert isinstance(step.data, PublishData)
    assert tools.js is not None
    run = state.run
    msg_id = f"{run.id}:{run.retry_count}:{step.id}"
    return await run_publish(tools.js, step.data, state.context(), tenant=run.tenant_id, msg_id=msg_id)


# --- child runs ----------------------------------------------------------------------------------


async def _subflow(tools: StepTools, state: RunState, step: Step) -> Outcome:
    return await tools.children.start_subflow(state, step)


async def _foreach(tools: StepTools, state: RunState, step: Step) -> Outcome:
    return await tools.children.start_foreach(state, step)


def _subflow_joined(step: Step, state: StepState, children: list[Child]) -> Joined:
    done = [c for c in children if c.status == "succeeded"]
    return Joined(Outcome(ok=True, output=done[0].output, input=state.input)) if done else Joined()


def _foreach_joined(step: Step, state: StepState, children: list[Child]) -> Joined:
    """Done when every element's child succeeded (outputs in element order); else start what fits."""
    assert isinstance(step.data, ForeachData)
    done = sorted((c for c in children if c.status == "succeeded"), key=lambda c: c.index)
    total = len((state.input or {}).get("items", []))
    if len(done) == total:
        return Joined(Outcome(ok=True, output=[c.output for c in done], input=state.input))
    running = sum(1 for c in children if c.status not in FINAL_RUN_STATUSES)
    return Joined(more=max(0, min(step.data.concurrency - running, total - len(children))))


# --- helpers -------------------------------------------------------------------------------------


def whole_ms(value: datetime) -> datetime:
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


register_runner(ENTRY_TYPE, StepRunner(compute=_trigger))
register_runner("transform", StepRunner(compute=_transform))
register_runner("condition", StepRunner(compute=_condition))
register_runner("switch", StepRunner(compute=_switch))
register_runner("fail", StepRunner(compute=_fail))
register_runner("delay", StepRunner(wait=_delay, expire=_delay_fired))
register_runner("approval", StepRunner(wait=_approval, expire=_approval_timed_out, decide=_approval_decided))
register_runner("waitEvent", StepRunner(wait=_wait_event, expire=_wait_event_timed_out, on_event=_event_offered))
register_runner("http", StepRunner(attempt=_http))
register_runner("llm", StepRunner(attempt=_llm))
register_runner("publish", StepRunner(attempt=_publish))
register_runner("subflow", StepRunner(attempt=_subflow, join=_subflow_joined))
register_runner("foreach", StepRunner(attempt=_foreach, join=_foreach_joined))
