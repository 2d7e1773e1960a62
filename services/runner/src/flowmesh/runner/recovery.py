"""Recovery: the periodic sweep that finds what a crash or a lost message left behind, and re-sends it.

Every runner replica sweeps; what it re-sends is de-duplicated (events by id, work by message id)
and acting on it is guarded (a result is recorded once, a stale deadline changes nothing), so two
replicas sweeping at once do no harm.
"""

from __future__ import annotations

import contextlib
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from flowmesh.contracts.errors import NotFound
from flowmesh.contracts.ids import utcnow
from flowmesh.contracts.models import RunEvent
from flowmesh.contracts.models.work import StepWork
from flowmesh.runner import repo
from flowmesh.runner.commands import Expire
from flowmesh.runner.engine import RunRecord
from flowmesh.runner.publisher import CHILD_DONE, EventPublisher, Work
from flowmesh.runtime.db import Database

if TYPE_CHECKING:
    from datetime import datetime

    from flowmesh.runner.shell import Runner

UNPUBLISHED_AFTER = timedelta(seconds=2)
"""Events unrecorded this long after their change are re-published (the publisher had its chance)."""
BATCH = 500


class Recovery:
    """The sweep: late deadlines, unpublished events, stalled work, parents not told of their children."""

    def __init__(self, db: Database, runner: Runner, publisher: EventPublisher) -> None:
        self.db = db
        self.runner = runner
        self.publisher = publisher

    async def sweep(
        self, *, stalled_run: timedelta, stalled_step: timedelta, overdue: timedelta = timedelta(seconds=10)
    ) -> int:
        """Re-publish what a crash kept from JetStream: events, and work of runs that stopped moving.

        Also enforces deadlines ``overdue`` past due whose timer never came (lost on the way to the
        scheduler, or the scheduler was down): a lost timer delays a timeout, never loses it.
        Returns how many things it acted on.
        """
        now = utcnow()
        late = await self._expire_overdue(now - overdue)
        async with self.db.reading() as conn:
            events = await repo.unpublished_events(conn, older_than=now - UNPUBLISHED_AFTER, limit=2 * BATCH)
            stalled = await repo.stalled_work(
                conn, run_older_than=now - stalled_run, step_older_than=now - stalled_step, lease_ended=now, limit=BATCH
            )
        await self._republish(events, now)
        async with self.db.reading() as conn:
            parents = await repo.stalled_parents(conn, older_than=now - stalled_run, limit=BATCH)
        work = [
            Work(StepWork(run_id=run_id, step_id=step_id, kind="child"), f"{run_id}:{step_id}:sweep{CHILD_DONE}")
            for run_id, step_id in parents
        ]
        work += [
            Work(
                StepWork(run_id=run_id, step_id=step_id, kind="advance" if step_id is None else "attempt"),
                f"{run_id}:{rc}:{step_id or 'start'}:sweep",
            )
            for run_id, step_id, rc in stalled
        ]
        await self.publisher.resend_work(work)
        return late + len(events) + len(work)

    async def _expire_overdue(self, before: datetime) -> int:
        """Act on deadlines whose timer never came; returns how many there were."""
        async with self.db.reading() as conn:
            late = await repo.overdue(conn, before=before, limit=BATCH)
        for deadline in late:
            with contextlib.suppress(NotFound):
                await self.runner.apply(deadline.run_id, Expire(deadline))
        return len(late)

    async def _republish(self, events: list[RunEvent], now: datetime) -> None:
        """Publish events again, run by run, in ``seq`` order (their ids de-duplicate them)."""
        by_run: dict[str, list[dict[str, Any]]] = {}
        first: dict[str, RunEvent] = {}
        for e in events:
            by_run.setdefault(e.run_id, []).append(e.wire(exclude_none=True))
            first.setdefault(e.run_id, e)
        for run_id, evs in by_run.items():
            head = first[run_id]
            record = RunRecord(
                id=run_id,
                tenant_id=head.tenant_id,
                flow_id=head.flow_id,
                version=head.version,
                status="",
                trigger_type="",
                input=None,
                created_at=now,
            )
            await self.publisher.publish(record, evs, [])
