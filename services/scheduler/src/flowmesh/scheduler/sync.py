"""Keeping ``schedules`` equal to the flows service's schedule triggers.

An announcement on ``fm.flows.{t}.<event>`` only says *what* changed (a trigger, a flow); the
scheduler then reads the current state with ``fm.rpc.flows.schedules`` while holding a per-flow
advisory lock, and reconciles its copy. Two replicas handling two announcements of one flow are
serialised by the lock, and each reads a state at least as new as the change it was told about,
so announcements may arrive late, twice or out of order and the copy still ends up current.

A *rebuild* reconciles every schedule trigger there is, page by page, the same way: on start when
the copy may have missed announcements (the stream dropped some before they were applied, or the
stream or the database was replaced).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Final

from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from flowmesh.contracts.ids import utcnow
from flowmesh.contracts.models.flows import FlowEvent
from flowmesh.contracts.models.schedules import ScheduleSources, ScheduleSourcesQuery
from flowmesh.contracts.streams import FLOWS, SCHEDULER_FLOWS
from flowmesh.contracts.subjects import FlowEventType, FlowsOp
from flowmesh.runtime.db import Connection, Database
from flowmesh.runtime.rpc import RpcClient
from flowmesh.scheduler import domain, repo

log = logging.getLogger(__name__)

PAGE: Final = 200
"""Triggers reconciled per transaction in a rebuild."""
FLOW_EVENTS: Final = frozenset(
    {
        FlowEventType.PUBLISHED,
        FlowEventType.ROLLED_BACK,
        FlowEventType.DELETED,
        FlowEventType.ACTIVATED,
        FlowEventType.DEACTIVATED,
    }
)
"""Announcements that change whether a flow's schedules may fire."""


class Sync:
    """Reconciles the stored schedules with the flows service."""

    def __init__(self, db: Database, flows: RpcClient) -> None:
        self._db = db
        self._flows = flows

    async def _lookup(self, query: ScheduleSourcesQuery) -> ScheduleSources:
        return ScheduleSources.model_validate(await self._flows.call(FlowsOp.SCHEDULES, query, tenant=""))

    async def announced(self, event: FlowEvent, *, seq: int) -> None:
        """Apply one announcement (stream sequence ``seq``): re-read what it names, reconcile, record ``seq``."""
        if event.type == FlowEventType.TRIGGER_CHANGED and event.trigger is not None:
            if event.trigger.type == "schedule":
                await self.refresh_triggers([(event.trigger.id, event.flow_id)], seq=seq)
                return
        elif event.type in FLOW_EVENTS:
            await self.refresh_flow(event.flow_id, seq=seq)
            return
        await self.passed(seq=seq)

    async def passed(self, *, seq: int) -> None:
        """An announcement with nothing for the schedules (another trigger type, malformed): still applied."""
        async with self._db.transaction() as conn:
            await repo.mark_applied(conn, seq=seq)

    async def refresh_triggers(self, refs: Sequence[tuple[str, str]], *, seq: int | None = None) -> None:
        """Reconcile the schedules of these ``(trigger_id, flow_id)`` with the flows service's state."""
        ids = [t for t, _ in refs]
        async with self._db.transaction() as conn:
            await repo.lock_flows(conn, flow_ids=[f for _, f in refs])
            found = await self._lookup(ScheduleSourcesQuery(trigger_ids=ids))
            wanted = {src.trigger.id: domain.from_source(src) for src in found.items}
            stored = await repo.get_schedules(conn, trigger_ids=ids)
            await _apply(conn, ((i, stored.get(i), wanted.get(i)) for i in ids))
            if seq is not None:
                await repo.mark_applied(conn, seq=seq)

    async def refresh_flow(self, flow_id: str, *, seq: int | None = None) -> None:
        """Reconcile the schedules of one flow with its state (active, published, deleted)."""
        async with self._db.transaction() as conn:
            await repo.lock_flows(conn, flow_ids=[flow_id])
            rows = await repo.schedules_of_flow(conn, flow_id=flow_id)
            if rows:
                found = await self._lookup(ScheduleSourcesQuery(flow_ids=[flow_id]))
                state = next((f for f in found.flows if f.flow_id == flow_id), None)
                await _apply(
                    conn, ((r.trigger_id, r, None if state is None else domain.with_flow(r, state)) for r in rows)
                )
            if seq is not None:
                await repo.mark_applied(conn, seq=seq)

    async def rebuild(self) -> int:
        """Reconcile every schedule trigger of every live flow, and every stored schedule; how many."""
        after: str | None = None
        seen = 0
        while True:
            page = await self._lookup(ScheduleSourcesQuery(after=after, limit=PAGE))
            ids = [src.trigger.id for src in page.items]
            upto = ids[-1] if len(ids) == PAGE else None
            async with self._db.reading() as conn:
                known = await repo.known_triggers(conn, after=after, upto=upto)
            refs = sorted({(src.trigger.id, src.flow.flow_id) for src in page.items} | set(known))
            for i in range(0, len(refs), PAGE):
                await self.refresh_triggers(refs[i : i + PAGE])
            seen += len(refs)
            if upto is None:
                return seen
            after = upto

    async def rebuild_if_behind(self, js: JetStreamContext) -> bool:
        """Rebuild when the copy may lack announcements; whether it did.

        Behind means: the FLOWS stream no longer holds some announcement after the last one applied
        here (expired or purged unseen), or it was recreated (its sequence is below ours), or our
        consumer acknowledged announcements this database never recorded (a restored database).
        """
        stream = await js.stream_info(FLOWS.name)
        first, last = stream.state.first_seq, stream.state.last_seq
        try:
            consumer = await js.consumer_info(FLOWS.name, SCHEDULER_FLOWS.durable)
            acked = consumer.ack_floor.stream_seq if consumer.ack_floor else 0
        except NotFoundError:
            acked = 0
        async with self._db.reading() as conn:
            applied = await repo.applied_seq(conn)
        if not (applied + 1 < first or applied > last or (acked or 0) > applied):
            return False
        log.warning(
            "schedules may have missed flow announcements (applied %s, stream %s..%s, acknowledged %s): rebuilding",
            applied,
            first,
            last,
            acked,
        )
        started = utcnow()
        count = await self.rebuild()
        async with self._db.transaction() as conn:
            if applied > last:
                await repo.reset_applied(conn, seq=last)
            else:
                await repo.mark_applied(conn, seq=last)
        log.info("rebuilt %s schedules in %.1fs", count, (utcnow() - started).total_seconds())
        return True


async def _apply(
    conn: Connection, changes: Iterable[tuple[str, domain.Schedule | None, domain.Schedule | None]]
) -> None:
    now = utcnow()
    gone = []
    for trigger_id, stored, wanted in changes:
        outcome = domain.reconcile(stored, wanted)
        if outcome.row is None:
            if stored is not None:
                gone.append(trigger_id)
        elif outcome.changed:
            await repo.save_schedule(conn, row=outcome.row, rearmed=outcome.rearmed, now=now)
    await repo.delete_schedules(conn, trigger_ids=gone)
