"""Arming and cancelling the runner's durable timers on the scheduler, after a change committed.

Best effort: a deadline is in the run's row already, so a timer lost here (scheduler down, runner
killed) is enforced by the sweep instead, a little late; a cancel that is lost leaves a timer that
fires stale and changes nothing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Iterable
from typing import Final

from flowmesh.contracts.models.timers import TimerRef, TimerSet
from flowmesh.contracts.subjects import SchedulerOp
from flowmesh.runner.engine import TIMER_OWNER, TimerOp
from flowmesh.runtime.rpc import RpcClient

log = logging.getLogger(__name__)

TIMER_RPC_TIMEOUT_S: Final = 2.0


class TimerCalls:
    """Sends a committed change's timer operations to the scheduler, in the background."""

    def __init__(self, scheduler: RpcClient) -> None:
        self.scheduler = scheduler
        self._tasks: set[asyncio.Future[None]] = set()

    def send(self, ops: Iterable[TimerOp]) -> None:
        """Arm and cancel ``ops`` in the background (they are all sent at once)."""
        wanted = list(ops)
        if wanted:
            background(self._tasks, asyncio.gather(*(self._send(op) for op in wanted)))

    async def stop(self) -> None:
        """Wait a little for calls in flight."""
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)

    async def _send(self, op: TimerOp) -> None:
        ref = {"owner": TIMER_OWNER, "key": op.deadline.key}
        try:
            if op.due_at is None:
                await self.scheduler.call(
                    SchedulerOp.TIMER_CANCEL, TimerRef(**ref), tenant="", timeout=TIMER_RPC_TIMEOUT_S
                )
            else:
                payload = op.deadline.payload().wire(exclude_none=True)
                body = TimerSet(**ref, due_at=op.due_at, payload=payload)
                await self.scheduler.call(SchedulerOp.TIMER_SET, body, tenant="", timeout=TIMER_RPC_TIMEOUT_S)
        except Exception as exc:
            if op.due_at is None:
                log.info("cancelling timer %s failed (if it fires, it is stale): %s", op.deadline.key, exc)
            else:
                log.warning("arming timer %s failed (the sweep enforces its deadline): %s", op.deadline.key, exc)


def background(tasks: set[asyncio.Future[None]], work: Awaitable[object]) -> None:
    """Run ``work`` in the background, kept in ``tasks`` until it is done (so it is not collected)."""
    task = asyncio.ensure_future(_discard(work))
    tasks.add(task)
    task.add_done_callback(tasks.discard)


async def _discard(work: Awaitable[object]) -> None:
    await work
