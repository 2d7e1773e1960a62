"""The scheduler's wire: timers over request/reply, and the flow announcements it keeps schedules from."""

from __future__ import annotations

import logging
from datetime import UTC

from flowmesh.contracts.ids import utcnow
from flowmesh.contracts.models.flows import FlowEvent
from flowmesh.contracts.models.timers import TimerCancelled, TimerRef, TimerSet
from flowmesh.contracts.subjects import SchedulerOp
from flowmesh.runtime.consumers import Delivery
from flowmesh.runtime.rpc import RpcContext, RpcRouter
from flowmesh.scheduler import repo
from flowmesh.scheduler.deps import SchedulerDeps

log = logging.getLogger(__name__)

router: RpcRouter[SchedulerDeps] = RpcRouter()
"""The timer operations; served with the service's :class:`SchedulerDeps`."""


@router.handler(SchedulerOp.TIMER_SET, tenant_required=False)
async def timer_set(timer: TimerSet, _: RpcContext, deps: SchedulerDeps) -> TimerSet:
    """Arm or move a timer; stored (committed) before the reply, so it survives any crash after."""
    due_at = timer.due_at if timer.due_at.tzinfo is not None else timer.due_at.replace(tzinfo=UTC)
    async with deps.db.transaction() as conn:
        await repo.set_timer(conn, owner=timer.owner, key=timer.key, due_at=due_at, payload=timer.payload, now=utcnow())
    if due_at <= utcnow() + deps.dispatcher.lookahead:
        deps.dispatcher.wake()
    return timer.model_copy(update={"due_at": due_at})


@router.handler(SchedulerOp.TIMER_CANCEL, tenant_required=False)
async def timer_cancel(ref: TimerRef, _: RpcContext, deps: SchedulerDeps) -> TimerCancelled:
    """Disarm a timer (whether it was armed or not)."""
    async with deps.db.transaction() as conn:
        return TimerCancelled(cancelled=await repo.cancel_timer(conn, owner=ref.owner, key=ref.key))


async def flow_announced(event: FlowEvent, msg: Delivery, deps: SchedulerDeps) -> None:
    """A flow or trigger changed: reconcile the schedules it may concern (shared durable consumer)."""
    await deps.sync.announced(event, seq=msg.seq)


async def unreadable_announcement(msg: Delivery, deps: SchedulerDeps) -> None:
    """An announcement that cannot be read is passed over, but its place in the stream is recorded.

    The sequence is how the scheduler knows, at start, whether it missed announcements.
    """
    await deps.sync.passed(seq=msg.seq)
