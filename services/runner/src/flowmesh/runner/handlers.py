"""The runner's wire: ``fm.rpc.runs.*`` on a router, and its durable consumers.

Every handler is a module-level function typed by its contract and given :class:`RunnerDeps`;
the consumers follow the runtime's one acknowledgement policy (:mod:`flowmesh.runtime.consumers`):
returning acknowledges, :class:`Redeliver` hands the message back after a delay, an unreadable or
never-handleable message is terminated, any other failure is redelivered.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from nats.aio.msg import Msg

from flowmesh.contracts import headers
from flowmesh.contracts.errors import Conflict, InvalidInput, NotFound, RateLimited
from flowmesh.contracts.expressions import ExpressionError, evaluate, expression_source
from flowmesh.contracts.ids import is_uuid
from flowmesh.contracts.models import Page, Run, StepRun
from flowmesh.contracts.models.flows import FlowEvent
from flowmesh.contracts.models.rpc import (
    RunEventsQuery,
    RunListQuery,
    RunRef,
    RunResumeRequest,
    RunRetryRequest,
    RunStepsQuery,
    StartRun,
    StartRunResult,
)
from flowmesh.contracts.models.timers import TimerFired
from flowmesh.contracts.models.work import StepWork
from flowmesh.contracts.models.ws import WsSnapshot
from flowmesh.contracts.subjects import EVENTS_ALL, FlowEventType, RunsOp, tenant_token
from flowmesh.runner import replies, repo
from flowmesh.runner.deps import RunnerDeps
from flowmesh.runtime.consumers import Delivery, Redeliver, Unprocessable
from flowmesh.runtime.logs import bind_log
from flowmesh.runtime.rpc import RpcContext, RpcRouter

log = logging.getLogger(__name__)
EVENTS_PREFIX = EVENTS_ALL.removesuffix(">")

router: RpcRouter[RunnerDeps] = RpcRouter()
"""Every runs operation; served with the service's :class:`RunnerDeps`."""


async def _own_run(deps: RunnerDeps, ctx: RpcContext, run_id: str) -> Run:
    run = None
    if is_uuid(run_id):
        run = await deps.runner.run_of(ctx.tenant, run_id)
    if run is None:
        raise NotFound(f"run {run_id} not found")
    return run


# --- reads ---------------------------------------------------------------------------------------


@router.handler(RunsOp.GET)
async def get(ref: RunRef, ctx: RpcContext, deps: RunnerDeps) -> dict[str, Any]:
    """One run of the caller's tenant (a value too large for a reply is left out: :mod:`.replies`)."""
    return replies.run_reply(await _own_run(deps, ctx, ref.run_id), ctx.reply_budget)


@router.handler(RunsOp.LIST)
async def list_runs(q: RunListQuery, ctx: RpcContext, deps: RunnerDeps) -> dict[str, Any]:
    """A page of the tenant's runs, newest first, within the reply budget (:mod:`.replies`)."""
    page: Page[Run] = q.page_of([], 0)
    if q.flow_id is None or is_uuid(q.flow_id):
        page = q.page_of(*await deps.runner.runs_of(ctx.tenant, q))
    return replies.runs_page(page, ctx.reply_budget)


@router.handler(RunsOp.STEPS)
async def steps(q: RunStepsQuery, ctx: RpcContext, deps: RunnerDeps) -> dict[str, Any]:
    """A page of a run's steps, in the order they started, within the reply budget (:mod:`.replies`)."""
    await _own_run(deps, ctx, q.run_id)
    async with deps.db.reading() as conn:
        items, total = await repo.list_steps(conn, run_id=q.run_id, offset=q.offset, limit=q.page_size)
    page: Page[StepRun] = q.page_of(items, total)
    return replies.steps_page(page, q.run_id, q.offset, ctx.reply_budget)


@router.handler(RunsOp.SNAPSHOT)
async def run_snapshot(ref: RunRef, ctx: RpcContext, deps: RunnerDeps) -> dict[str, Any]:
    """A run, its steps and its last event ``seq``, read at one instant (a WebSocket's first frame)."""
    found = None
    if is_uuid(ref.run_id):
        async with deps.db.snapshot() as conn:
            found = await repo.read_snapshot(conn, tenant=ctx.tenant, run_id=ref.run_id)
    if found is None:
        raise NotFound(f"run {ref.run_id} not found")
    run, seq, step_runs = found
    snap = WsSnapshot(
        run=run,
        steps={st.step_id: st.wire(exclude_none=True, exclude={"run_id", "step_id"}) for st in step_runs},
        seq=seq,
    )
    return replies.snapshot_reply(snap, ctx.reply_budget)


@router.handler(RunsOp.EVENTS)
async def events(q: RunEventsQuery, ctx: RpcContext, deps: RunnerDeps) -> dict[str, Any]:
    """A run's events after the cursor ``after`` (so ``page`` is always 1)."""
    run = await _own_run(deps, ctx, q.run_id)
    async with deps.db.reading() as conn:
        items, total = await repo.list_events(conn, run_id=run.id, after=q.after, limit=q.page_size)
    return {
        "items": [e.wire(exclude_none=True) for e in items],
        "total": total,
        "page": 1,
        "pageSize": q.page_size,
        "hasMore": len(items) < total,
    }


# --- control -------------------------------------------------------------------------------------


@router.handler(RunsOp.START)
async def start(req: StartRun, ctx: RpcContext, deps: RunnerDeps) -> dict[str, Any]:
    """Start a run (201, or 200 with the first run for a repeated idempotency key)."""
    return replies.start_reply(await deps.runner.start_run(ctx.tenant, req), ctx.reply_budget)


@router.handler(RunsOp.CANCEL)
async def cancel(ref: RunRef, ctx: RpcContext, deps: RunnerDeps) -> dict[str, Any]:
    """Cancel a run that has not ended, and its child runs."""
    await _own_run(deps, ctx, ref.run_id)
    await deps.runner.cancel(ref.run_id, tenant=ctx.tenant)
    return replies.run_reply(await _own_run(deps, ctx, ref.run_id), ctx.reply_budget)


@router.handler(RunsOp.RESUME)
async def resume(req: RunResumeRequest, ctx: RpcContext, deps: RunnerDeps) -> dict[str, Any]:
    """A decision on a waiting approval step."""
    await _own_run(deps, ctx, req.run_id)
    by = ctx.subject or ctx.tenant
    await deps.runner.resume(req.run_id, req.step_id, req.decision, req.data, by=by, tenant=ctx.tenant)
    return replies.run_reply(await _own_run(deps, ctx, req.run_id), ctx.reply_budget)


@router.handler(RunsOp.RETRY)
async def retry(req: RunRetryRequest, ctx: RpcContext, deps: RunnerDeps) -> dict[str, Any]:
    """Retry a failed run: reopened in place (``fromFailed``), or as a new run (``fromStart``)."""
    run = await _own_run(deps, ctx, req.run_id)
    if run.status != "failed":
        raise Conflict(f"only a failed run can be retried; run {run.id} is {run.status}")
    if req.mode == "fromStart":
        start_req = StartRun(
            flow_id=run.flow_id,
            input=run.input,
            trigger_type="retry",
            retry_of=run.id,
            version=run.version if req.version == "same" else None,
        )
        return replies.start_reply(await deps.runner.start_run(ctx.tenant, start_req), ctx.reply_budget)
    await deps.runner.reopen(run.id, tenant=ctx.tenant)
    reopened = StartRunResult(run=await _own_run(deps, ctx, run.id), created=False)
    return replies.start_reply(reopened, ctx.reply_budget)


# --- durable consumers ---------------------------------------------------------------------------


async def step_work(work: StepWork, msg: Delivery, deps: RunnerDeps) -> None:
    """Work on a run (shared by every replica): advance it, run a step's attempt, or hear of a child."""
    bind_log(run_id=work.run_id)
    if work.kind == "advance" or work.step_id is None:
        await deps.runner.advance(work.run_id)
    elif work.kind == "child":
        await deps.runner.child_done(work.run_id, work.step_id)
    else:
        delay = await deps.runner.execute(work.run_id, work.step_id, msg.in_progress)
        if delay is not None:
            raise Redeliver(delay, "the step's next attempt is not due yet")


async def start_command(req: StartRun, msg: Delivery, deps: RunnerDeps) -> None:
    """A durable start (schedules, event triggers): de-duplicated by its idempotency key."""
    tenant = msg.headers.get(headers.TENANT, "")
    if not tenant or not req.idempotency_key:
        raise Unprocessable(f"start command for tenant {tenant!r} needs a Flowmesh-Tenant header and an idempotencyKey")
    try:
        await deps.runner.start_run(tenant, req, durable=True)
    except RateLimited as exc:
        # the tenant's runs in flight are at its plan's limit: the start waits its turn
        log.info("start command for tenant %r deferred: %s", tenant, exc.detail)
        raise Redeliver(float(exc.retry_after_s), exc.detail) from exc
    except (NotFound, Conflict, InvalidInput) as exc:
        # it can never succeed (flow gone or deactivated, bad input): dropped, loudly
        raise Unprocessable(f"start command for tenant {tenant!r} refused: {exc.detail}") from exc


async def external_event(payload: Any, msg: Delivery, deps: RunnerDeps) -> None:
    """An event on ``fm.events.{t}.<type>``: resume the ``waitEvent`` steps it matches, start its triggers.

    Deliveries and starts already made are keyed, so a redelivered event does not make them twice.
    """
    key = msg.subject.removeprefix(EVENTS_PREFIX)
    try:
        async with deps.db.reading() as conn:
            waiting = await repo.waiting_for(conn, key=key)
            listeners = await repo.event_triggers_for(conn, key=key)
        for run_id, step_id, attempt in waiting:
            await deps.runner.deliver_event(run_id, step_id, attempt, payload)
        for trigger in listeners:
            await _start_from_event(deps, trigger, payload, msg.seq)
    except RateLimited as exc:
        log.info("event %s deferred: %s", key, exc.detail)
        raise Redeliver(float(exc.retry_after_s), exc.detail) from exc


async def _start_from_event(deps: RunnerDeps, trigger: Any, payload: Any, stream_seq: int) -> None:
    """Start the trigger's flow with the event as input, once per event (keyed by its stream sequence)."""
    if trigger["filter"]:
        try:
            if evaluate(expression_source(trigger["filter"]), {"event": payload}) is not True:
                return
        except ExpressionError as exc:
            log.warning("event trigger %s: filter failed, event skipped: %s", trigger["trigger_id"], exc)
            return
    req = StartRun(
        flow_id=trigger["flow_id"],
        input=payload,
        trigger_type="event",
        trigger_id=trigger["trigger_id"],
        idempotency_key=f"event:{trigger['trigger_id']}:{stream_seq}",
    )
    try:
        await deps.runner.start_run(trigger["tenant_id"], req, durable=True)
    except (NotFound, Conflict, InvalidInput) as exc:
        log.warning("event trigger %s did not start a run: %s", trigger["trigger_id"], exc.detail)


async def flow_announced(event: FlowEvent, msg: Delivery, deps: RunnerDeps) -> None:
    """Keep the registry of event triggers from the flows service's announcements."""
    async with deps.db.transaction() as conn:
        if event.type == FlowEventType.DELETED:
            await repo.drop_event_triggers(conn, flow_id=event.flow_id)
        elif event.type == FlowEventType.TRIGGER_CHANGED and event.trigger is not None:
            trigger = event.trigger
            if trigger.type == "event" and event.trigger_deleted:
                await repo.drop_event_triggers(conn, trigger_id=trigger.id)
            elif trigger.type == "event":
                await repo.put_event_trigger(
                    conn,
                    trigger_id=trigger.id,
                    tenant=event.tenant_id,
                    flow_id=event.flow_id,
                    key=f"{tenant_token(event.tenant_id)}.{trigger.config.get('eventType')}",
                    filter_=trigger.config.get("filter"),
                    enabled=trigger.enabled,
                )


async def timer_fired(fired: TimerFired, msg: Delivery, deps: RunnerDeps) -> None:
    """A durable timer came due (a delay, a wait's or an attempt's timeout, a run's time limit)."""
    run_id = fired.payload.get("runId")
    bind_log(run_id=run_id if isinstance(run_id, str) else None)
    early = await deps.runner.timer_fired(fired)
    if early is not None:
        raise Redeliver(early, "the deadline has not come by our clock")


# --- core NATS -----------------------------------------------------------------------------------


async def flow_changed(msg: Msg, deps: RunnerDeps) -> None:
    """A flow changed (``fm.flows.{t}.*``, every replica): its runnable version is asked again."""
    tenant = (msg.headers or {}).get(headers.TENANT)
    try:
        body = orjson.loads(msg.data)
    except orjson.JSONDecodeError:
        return
    flow_id = body.get("flowId") if isinstance(body, dict) else None
    if isinstance(tenant, str) and isinstance(flow_id, str):
        deps.runner.forget_flow(tenant, flow_id)
