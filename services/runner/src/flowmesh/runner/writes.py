"""Changes of runs held in memory, written together: one statement and one commit for many runs.

A step's result in a chain is written from the run its worker holds (``Runner._change_held``): one
statement, guarded by the run's revision. With many runs in flight, those statements queue for
PostgreSQL one by one, each with its own round trip and commit. ``HeldWrites`` sends what is
waiting as one statement (:func:`repo.save_changes`): a change that arrives while no write is in
flight goes at once (a lone chain waits for nothing), the ones arriving meanwhile go together in the
next. Each run is written or not on its own revision, exactly as alone.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import datetime
from typing import Any, Final

import asyncpg

from flowmesh.runner import repo
from flowmesh.runner.engine import RunState

log = logging.getLogger(__name__)

MAX_BATCH: Final = 64
"""Changes in one statement at most."""
WRITERS: Final = 2
"""Statements in flight at once (each on a connection of its own)."""

Saved = list[dict[str, Any]] | None
_Pending = tuple[RunState, dict[str, datetime], "asyncio.Future[Saved]"]


class HeldWrites:
    """Writes held changes of runs in batches (see the module's text)."""

    def __init__(self, pool: Callable[[], asyncpg.Pool | None]) -> None:
        self._pool = pool
        self._pending: list[_Pending] = []
        self._writers = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self.statements = 0
        """Statements sent so far (for tests and metrics)."""

    async def save(self, state: RunState, leases: dict[str, datetime]) -> Saved:
        """:func:`repo.save_change` of ``state``, in a statement shared with other runs' changes."""
        future: asyncio.Future[Saved] = asyncio.get_running_loop().create_future()
        self._pending.append((state, leases, future))
        if self._writers < WRITERS:
            self._writers += 1
            task = asyncio.create_task(self._write())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return await future

    async def _write(self) -> None:
        try:
            while self._pending:
                await self._write_batch(self._take())
        finally:
            self._writers -= 1

    def _take(self) -> list[_Pending]:
        """The next batch: waiting changes, oldest first, each run once (a second change of a run waits)."""
        batch: list[_Pending] = []
        runs: set[str] = set()
        rest: list[_Pending] = []
        for pending in self._pending:
            run_id = pending[0].run.id
            if len(batch) < MAX_BATCH and run_id not in runs:
                runs.add(run_id)
                batch.append(pending)
            else:
                rest.append(pending)
        self._pending = rest
        # rows are locked in the batch's order: in one order (the runs' ids) for every statement,
        # two statements sharing runs wait for each other, never deadlock
        return sorted(batch, key=lambda pending: pending[0].run.id)

    async def _write_batch(self, batch: list[_Pending]) -> None:
        pool = self._pool()
        try:
            if pool is None:
                raise RuntimeError("the runner is not started")
            self.statements += 1
            async with pool.acquire() as conn:
                saved = await repo.save_changes(conn, [(state, leases) for state, leases, _ in batch])
        except asyncpg.DeadlockDetectedError:
            # two statements wrote the same runs in another order (a run's work sent twice): none
            # of these changes was written; each is applied again under its run's lock
            log.info("held changes of %d runs met another write: applied under their locks", len(batch))
            saved = [None] * len(batch)
        except asyncio.CancelledError:
            for _, _, future in batch:
                future.cancel()
            raise
        except Exception as exc:
            for _, _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, _, future), result in zip(batch, saved, strict=True):
            if not future.done():
                future.set_result(result)
