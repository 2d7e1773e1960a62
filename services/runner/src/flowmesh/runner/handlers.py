"""Request/reply handlers of ``fm.rpc.runs.*`` and the consumer of ``fm.work.steps``."""

from __future__ import annotations

import logging
from typing import Any

from faststream import AckPolicy
from faststream.nats import ConsumerConfig, DeliverPolicy, JStream, PullSub
from pydantic import ValidationError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from flowmesh.contracts import headers
from flowmesh.contracts.errors import Conflict, InvalidInput, NotFound, RateLimited
from flowmesh.contracts.expressions import ExpressionError, evaluate, expression_source
from flowmesh.contracts.ids import is_uuid
from flowmesh.contracts.models import Page, Run, RunEvent, StepRun
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
from flowmesh.contracts.streams import (
    EVENTS,
    FLOWS,
    RUN_CMDS,
    RUNNER_EVENTS,
    RUNNER_FLOWS,
    RUNNER_STARTS,
    RUNNER_STEPS,
    RUNNER_TIMERS,
    STEP_WORK,
    TIMERS,
)
from flowmesh.contracts.subjects import (
    EVENTS_ALL,
    FLOWS_EVENTS_ALL,
    RUN_START_CMD,
    FlowEventType,
    RunsOp,
    tenant_token,
    timer_fired,
)
from flowmesh.contracts.subjects import STEP_WORK as STEP_WORK_SUBJECT
from flowmesh.runner import repo
from flowmesh.runner.engine import TIMER_OWNER
from flowmesh.runner.shell import Runner
from flowmesh.runtime.nats import Message
from flowmesh.runtime.rpc import RpcContext, RpcServer

log = logging.getLogger(__name__)
EVENTS_PREFIX = EVENTS_ALL.removesuffix(">")


async def _start_from_event(runner: Runner, trigger: Any, payload: Any, stream_seq: int) -> None:
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
        await runner.start_run(trigger["tenant_id"], req, durable=True)
    except (NotFound, Conflict, InvalidInput) as exc:
        log.warning("event trigger %s did not start a run: %s", trigger["trigger_id"], exc.detail)


async def _own_run(sessions: async_sessionmaker[AsyncSession], ctx: RpcContext, run_id: str) -> Run:
    run = None
    if is_uuid(run_id):
        async with sessions() as s:
            run = await repo.get_run(s, tenant=ctx.tenant, run_id=run_id)
    if run is None:
        raise NotFound(f"run {run_id} not found")
    return run


def register(
    rpc: RpcServer, sessions: async_sessionmaker[AsyncSession], runner: Runner, *, workers: int, ack_wait_s: float
) -> None:
    """Serve every runs operation, and execute step work from the shared durable consumer."""

    @rpc.handler(RunsOp.START)
    async def start(ctx: RpcContext, body: Any) -> StartRunResult:
        return await runner.start_run(ctx.tenant, StartRun.model_validate(body))

    @rpc.handler(RunsOp.GET)
    async def get(ctx: RpcContext, body: Any) -> Run:
        return await _own_run(sessions, ctx, RunRef.model_validate(body).run_id)

    @rpc.handler(RunsOp.LIST)
    async def list_(ctx: RpcContext, body: Any) -> Page[Run]:
        q = RunListQuery.model_validate(body)
        if q.flow_id is not None and not is_uuid(q.flow_id):
            return q.page_of([], 0)
        async with sessions() as s:
            items, total = await repo.list_runs(s, tenant=ctx.tenant, q=q)
        return q.page_of(items, total)

    @rpc.handler(RunsOp.STEPS)
    async def steps(ctx: RpcContext, body: Any) -> Page[StepRun]:
        q = RunStepsQuery.model_validate(body)
        await _own_run(sessions, ctx, q.run_id)
        async with sessions() as s:
            items, total = await repo.list_steps(s, run_id=q.run_id, offset=q.offset, limit=q.page_size)
        return q.page_of(items, total)

    @rpc.handler(RunsOp.SNAPSHOT)
    async def snapshot(ctx: RpcContext, body: Any) -> WsSnapshot:
        run_id = RunRef.model_validate(body).run_id
        found = None
        if is_uuid(run_id):
            async with sessions() as s:
                await s.connection(execution_options={"isolation_level": "REPEATABLE READ"})
                found = await repo.read_snapshot(s, tenant=ctx.tenant, run_id=run_id)
        if found is None:
            raise NotFound(f"run {run_id} not found")
        run, seq, steps = found
        return WsSnapshot(
            run=run,
            steps={st.step_id: st.wire(exclude_none=True, exclude={"run_id", "step_id"}) for st in steps},
            seq=seq,
        )

    @rpc.handler(RunsOp.EVENTS)
    async def events(ctx: RpcContext, body: Any) -> dict[str, Any]:
        q = RunEventsQuery.model_validate(body)
        run = await _own_run(sessions, ctx, q.run_id)
        async with sessions() as s:
            items: list[RunEvent] = await repo.list_events(s, run_id=run.id, after=q.after, limit=q.page_size)
            total = await repo.count_events(s, run_id=run.id, after=q.after)
        # a cursor page: ``after`` is the cursor, so ``page`` is always 1
        return {
            "items": [e.wire(exclude_none=True) for e in items],
            "total": total,
            "page": 1,
            "pageSize": q.page_size,
            "hasMore": len(items) < total,
        }

    @rpc.handler(RunsOp.CANCEL)
    async def cancel(ctx: RpcContext, body: Any) -> Run:
        ref = RunRef.model_validate(body)
        await _own_run(sessions, ctx, ref.run_id)

        await runner.cancel(ref.run_id, tenant=ctx.tenant)
        return await _own_run(sessions, ctx, ref.run_id)

    @rpc.handler(RunsOp.RESUME)
    async def resume(ctx: RpcContext, body: Any) -> Run:
        req = RunResumeRequest.model_validate(body)
        await _own_run(sessions, ctx, req.run_id)

        by = ctx.subject or ctx.tenant
        await runner.resume(req.run_id, req.step_id, req.decision, req.data, by=by, tenant=ctx.tenant)
        return await _own_run(sessions, ctx, req.run_id)

    @rpc.handler(RunsOp.RETRY)
    async def retry(ctx: RpcContext, body: Any) -> StartRunResult:
        req = RunRetryRequest.model_validate(body)
        run = await _own_run(sessions, ctx, req.run_id)
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
            return await runner.start_run(ctx.tenant, start_req)
        await runner.reopen(run.id, tenant=ctx.tenant)
        return StartRunResult(run=await _own_run(sessions, ctx, run.id), created=False)

    # no queue group: every replica keeps its own cache; no reply: the message is a JetStream
    # publish whose reply subject awaits the stream's acknowledgement, not ours
    @rpc.broker.subscriber(FLOWS_EVENTS_ALL, no_reply=True)
    async def flow_changed(body: dict[str, Any], msg: Message) -> None:
        tenant = (msg.headers or {}).get(headers.TENANT)
        flow_id = body.get("flowId")
        if isinstance(tenant, str) and isinstance(flow_id, str):
            runner.forget_flow(tenant, flow_id)

    @rpc.broker.subscriber(
        RUN_START_CMD,
        stream=JStream(RUN_CMDS.name, declare=False),
        durable=RUNNER_STARTS.durable,
        pull_sub=PullSub(batch_size=16, timeout=1.0),
        max_workers=16,
        ack_policy=AckPolicy.MANUAL,
    )
    async def start_command(body: dict[str, Any], msg: Message) -> None:
        """Durable starts (schedules, events): de-duplicated by their idempotency key."""
        tenant = (msg.headers or {}).get(headers.TENANT, "")
        try:
            req = StartRun.model_validate(body)
            if not tenant or not req.idempotency_key:
                raise InvalidInput("a start command needs a Flowmesh-Tenant header and an idempotencyKey")
            await runner.start_run(tenant, req, durable=True)
        except RateLimited as exc:
            # the tenant's runs in flight are at its plan's limit: the start waits its turn
            log.info("start command for tenant %r deferred: %s", tenant, exc.detail)
            await msg.nack(delay=float(exc.retry_after_s))
            return
        except (NotFound, Conflict, InvalidInput, ValidationError) as exc:
            # it can never succeed (flow gone or deactivated, bad input): drop it, loudly
            log.warning("start command for tenant %r refused: %s", tenant, exc)
        except Exception as exc:
            log.warning("start command for tenant %r failed, will retry: %s", tenant, exc)
            await msg.nack(delay=1.0)
            return
        await msg.ack()

    @rpc.broker.subscriber(
        EVENTS_ALL,
        stream=JStream(EVENTS.name, declare=False),
        durable=RUNNER_EVENTS.durable,
        pull_sub=PullSub(batch_size=16, timeout=1.0),
        max_workers=16,
        ack_policy=AckPolicy.MANUAL,
        config=ConsumerConfig(deliver_policy=DeliverPolicy.NEW, ack_wait=ack_wait_s),
    )
    async def external_event(body: Any, msg: Message) -> None:
        """An event on ``fm.events.{t}.<type>``: resume every ``waitEvent`` step waiting for it that matches."""
        key = msg.raw_message.subject.removeprefix(EVENTS_PREFIX)
        try:
            async with sessions() as s:
                waiting = await repo.waiting_for(s, key=key)
                listeners = await repo.event_triggers_for(s, key=key)
            for run_id, step_id, attempt in waiting:
                await runner.deliver_event(run_id, step_id, attempt, body)
            for trigger in listeners:
                await _start_from_event(runner, trigger, body, msg.raw_message.metadata.sequence.stream)
        except RateLimited as exc:
            # a tenant's runs in flight are at its plan's limit: the event comes back (starts and
            # deliveries made before are keyed, so they are not made twice)
            log.info("event %s deferred: %s", key, exc.detail)
            await msg.nack(delay=float(exc.retry_after_s))
            return
        except Exception:
            log.exception("delivering event %s failed; it will be redelivered", key)
            await msg.nack(delay=1.0)
            return
        await msg.ack()

    @rpc.broker.subscriber(
        FLOWS_EVENTS_ALL,
        stream=JStream(FLOWS.name, declare=False),
        durable=RUNNER_FLOWS.durable,
        pull_sub=PullSub(batch_size=16, timeout=1.0),
        ack_policy=AckPolicy.MANUAL,
    )
    async def registry(body: dict[str, Any], msg: Message) -> None:
        """Keep the registry of event triggers from the flows service's announcements."""
        try:
            event = FlowEvent.model_validate(body)
            async with sessions.begin() as s:
                if event.type == FlowEventType.DELETED:
                    await repo.drop_event_triggers(s, flow_id=event.flow_id)
                elif event.type == FlowEventType.TRIGGER_CHANGED and event.trigger is not None:
                    trigger = event.trigger
                    if trigger.type == "event" and event.trigger_deleted:
                        await repo.drop_event_triggers(s, trigger_id=trigger.id)
                    elif trigger.type == "event":
                        await repo.put_event_trigger(
                            s,
                            trigger_id=trigger.id,
                            tenant=event.tenant_id,
                            flow_id=event.flow_id,
                            key=f"{tenant_token(event.tenant_id)}.{trigger.config.get('eventType')}",
                            filter_=trigger.config.get("filter"),
                            enabled=trigger.enabled,
                        )
        except ValidationError as exc:
            log.warning("ignoring a malformed flow announcement: %s", exc)
        except Exception:
            log.exception("updating the event trigger registry failed; it will be redelivered")
            await msg.nack(delay=1.0)
            return
        await msg.ack()

    @rpc.broker.subscriber(
        timer_fired(TIMER_OWNER),
        stream=JStream(TIMERS.name, declare=False),
        durable=RUNNER_TIMERS.durable,
        pull_sub=PullSub(batch_size=16, timeout=1.0),
        max_workers=16,
        ack_policy=AckPolicy.MANUAL,
        config=ConsumerConfig(ack_wait=ack_wait_s),
    )
    async def timer(body: dict[str, Any], msg: Message) -> None:
        """A durable timer came due (a delay, a wait's or an attempt's timeout, a run's time limit)."""
        try:
            early = await runner.timer_fired(TimerFired.model_validate(body))
        except ValidationError as exc:
            log.warning("ignoring a malformed fired timer: %s", exc)
            await msg.ack()
            return
        except Exception:
            log.exception("handling a fired timer failed; it will be redelivered")
            await msg.nack(delay=1.0)
            return
        if early is None:
            await msg.ack()
        else:
            await msg.nack(delay=early)

    # --- work --------------------------------------------------------------------------------------

    @rpc.broker.subscriber(
        STEP_WORK_SUBJECT,
        stream=JStream(STEP_WORK.name, declare=False),  # provisioned by the runtime from the contracts
        durable=RUNNER_STEPS.durable,
        pull_sub=PullSub(batch_size=16, timeout=1.0),
        max_workers=workers,
        ack_policy=AckPolicy.MANUAL,
        config=ConsumerConfig(ack_wait=ack_wait_s, max_ack_pending=RUNNER_STEPS.max_ack_pending),
    )
    async def work(body: Any, msg: Message) -> None:
        try:
            item = StepWork.model_validate(body)
        except ValidationError as exc:
            log.warning("ignoring malformed step work: %s", exc)
            await msg.ack()
            return
        try:
            if item.kind == "advance" or item.step_id is None:
                await runner.advance(item.run_id)
                await msg.ack()
                return
            if item.kind == "child":
                await runner.child_done(item.run_id, item.step_id)
                await msg.ack()
                return
            delay = await runner.execute(item.run_id, item.step_id, msg.in_progress)
        except Exception:
            log.exception("work on run %s step %s failed; it will be redelivered", item.run_id, item.step_id)
            await msg.nack(delay=1.0)
            return
        if delay is None:
            await msg.ack()
        else:
            await msg.nack(delay=delay)
