"""The scheduler's wire: timers over request/reply, and the flow announcements it keeps schedules from."""

from __future__ import annotations

import logging
from datetime import UTC
from typing import Any

from faststream import AckPolicy
from faststream.nats import JStream, PullSub
from pydantic import ValidationError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from flowmesh.contracts.ids import utcnow
from flowmesh.contracts.models.flows import FlowEvent
from flowmesh.contracts.models.timers import TimerCancelled, TimerRef, TimerSet
from flowmesh.contracts.streams import FLOWS, SCHEDULER_FLOWS
from flowmesh.contracts.subjects import FLOWS_EVENTS_ALL, SchedulerOp
from flowmesh.runtime.nats import Message
from flowmesh.runtime.rpc import RpcContext, RpcServer
from flowmesh.scheduler import repo
from flowmesh.scheduler.dispatcher import Dispatcher
from flowmesh.scheduler.sync import Sync

log = logging.getLogger(__name__)


def register(
    rpc: RpcServer,
    sessions: async_sessionmaker[AsyncSession],
    sync: Sync,
    dispatcher: Dispatcher,
    *,
    event_workers: int,
) -> None:
    """Serve the timer operations and consume flow announcements (shared durable consumer)."""

    @rpc.handler(SchedulerOp.TIMER_SET, tenant_required=False)
    async def timer_set(_: RpcContext, body: Any) -> TimerSet:
        """Arm or move a timer; stored (committed) before the reply, so it survives any crash after."""
        timer = TimerSet.model_validate(body)
        due_at = timer.due_at if timer.due_at.tzinfo is not None else timer.due_at.replace(tzinfo=UTC)
        async with sessions.begin() as s:
            await repo.set_timer(
                s, owner=timer.owner, key=timer.key, due_at=due_at, payload=timer.payload, now=utcnow()
            )
        if due_at <= utcnow() + dispatcher.lookahead:
            dispatcher.wake()
        return timer.model_copy(update={"due_at": due_at})

    @rpc.handler(SchedulerOp.TIMER_CANCEL, tenant_required=False)
    async def timer_cancel(_: RpcContext, body: Any) -> TimerCancelled:
        ref = TimerRef.model_validate(body)
        async with sessions.begin() as s:
            return TimerCancelled(cancelled=await repo.cancel_timer(s, owner=ref.owner, key=ref.key))

    @rpc.broker.subscriber(
        FLOWS_EVENTS_ALL,
        stream=JStream(FLOWS.name, declare=False),
        durable=SCHEDULER_FLOWS.durable,
        pull_sub=PullSub(batch_size=16, timeout=1.0),
        max_workers=event_workers,
        ack_policy=AckPolicy.MANUAL,
    )
    async def flow_announced(body: dict[str, Any], msg: Message) -> None:
        """A flow or trigger changed: reconcile the schedules it may concern."""
        seq = msg.raw_message.metadata.sequence.stream
        try:
            try:
                event = FlowEvent.model_validate(body)
            except ValidationError as exc:
                log.warning("ignoring a malformed flow announcement: %s", exc)
                await sync.passed(seq=seq)
            else:
                await sync.announced(event, seq=seq)
        except Exception as exc:
            log.warning("applying flow announcement %s failed, it will be redelivered: %s", seq, exc)
            await msg.nack(delay=1.0)
            return
        await msg.ack()
