"""Every SQL statement of the scheduler.

Schedules and timers are claimed the same way: a replica takes what comes due within its
lookahead with ``FOR UPDATE SKIP LOCKED`` (so replicas never take the same row at once), stamps it
with a claim token and a lease, fires it from memory on time, then writes the outcome only where
its token still stands. Anything that changes a row (a trigger edit, a timer re-set) clears the
token, so a claim made before the change neither fires (checked just before publishing) nor
overwrites it.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final

from sqlalchemy import DateTime, delete, func, literal, or_, select, text, tuple_, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncSession

from flowmesh.scheduler.domain import Schedule
from flowmesh.scheduler.tables import schedules, sync_state, timers

LOCK_CLASS: Final = 0x5C4E
"""First key of the scheduler's per-flow advisory locks (the two-key space is apart from one-key locks)."""

MARK_SHARDS: Final = 16
"""Rows the applied mark of flow announcements is spread over."""
_SCHEDULE_FIELDS: Final = tuple(f for f in Schedule.__dataclass_fields__)


def _schedule(row: RowMapping) -> Schedule:
    return Schedule(**{f: row[f] for f in _SCHEDULE_FIELDS})


def _at(value: datetime) -> Any:
    # a time as a typed parameter where no column lends it one (inside GREATEST)
    return literal(value, DateTime(timezone=True))


def _flow_lock_key(flow_id: str) -> int:
    # a stable 31-bit key per flow: collisions only serialise two flows' updates
    return zlib.crc32(flow_id.encode()) & 0x7FFFFFFF


# --- schedules: the copy of the flows service's triggers --------------------------------------------


async def lock_flows(session: AsyncSession, *, flow_ids: Iterable[str]) -> None:
    """Serialise changes to these flows' schedules until the transaction ends (in key order: no deadlock)."""
    for key in sorted({_flow_lock_key(f) for f in flow_ids}):
        await session.execute(text("SELECT pg_advisory_xact_lock(:c, :k)"), {"c": LOCK_CLASS, "k": key})


async def get_schedules(session: AsyncSession, *, trigger_ids: Sequence[str]) -> dict[str, Schedule]:
    """The stored schedules among ``trigger_ids``."""
    if not trigger_ids:
        return {}
    rows = await session.execute(select(schedules).where(schedules.c.trigger_id.in_(trigger_ids)))
    return {r["trigger_id"]: _schedule(r) for r in rows.mappings()}


async def schedules_of_flow(session: AsyncSession, *, flow_id: str) -> list[Schedule]:
    """Every stored schedule of one flow."""
    rows = await session.execute(select(schedules).where(schedules.c.flow_id == flow_id))
    return [_schedule(r) for r in rows.mappings()]


async def known_triggers(session: AsyncSession, *, after: str | None, upto: str | None) -> list[tuple[str, str]]:
    """``(trigger_id, flow_id)`` of the stored schedules with ids in ``(after, upto]`` (None: unbounded)."""
    stmt = select(schedules.c.trigger_id, schedules.c.flow_id)
    if after is not None:
        stmt = stmt.where(schedules.c.trigger_id > after)
    if upto is not None:
        stmt = stmt.where(schedules.c.trigger_id <= upto)
    return [(r.trigger_id, r.flow_id) for r in await session.execute(stmt)]


async def save_schedule(session: AsyncSession, *, row: Schedule, rearmed: bool, now: datetime) -> None:
    """Insert or update a schedule; a re-armed one loses any claim (that claim must not fire)."""
    values: dict[str, Any] = {f: getattr(row, f) for f in _SCHEDULE_FIELDS}
    values["updated_at"] = now
    stmt = insert(schedules).values(**values)
    changes: dict[str, Any] = {k: stmt.excluded[k] for k in values if k != "trigger_id"}
    if rearmed:
        changes.update(claimed_by=None, claim_token=None, claim_until=None)
    await session.execute(stmt.on_conflict_do_update(index_elements=[schedules.c.trigger_id], set_=changes))


async def delete_schedules(session: AsyncSession, *, trigger_ids: Sequence[str]) -> None:
    """Forget schedules whose trigger or flow is gone."""
    if trigger_ids:
        await session.execute(delete(schedules).where(schedules.c.trigger_id.in_(trigger_ids)))


async def applied_seq(session: AsyncSession) -> int:
    """The highest FLOWS stream sequence applied (0: none yet)."""
    found = await session.scalar(select(func.max(sync_state.c.applied_seq)))
    return int(found or 0)


async def mark_applied(session: AsyncSession, *, seq: int) -> None:
    """Record, in the caller's transaction, that the announcement ``seq`` is reflected here.

    The mark is spread over ``MARK_SHARDS`` rows (the highest wins): one row would serialise every
    announcement's commit behind the one before.
    """
    stmt = insert(sync_state).values(id=seq % MARK_SHARDS, applied_seq=seq)
    await session.execute(
        stmt.on_conflict_do_update(
            index_elements=[sync_state.c.id],
            set_={"applied_seq": func.greatest(sync_state.c.applied_seq, stmt.excluded.applied_seq)},
        )
    )


async def reset_applied(session: AsyncSession, *, seq: int) -> None:
    """Set the applied mark to ``seq`` (the FLOWS stream was recreated and counts from scratch)."""
    await session.execute(delete(sync_state))
    await session.execute(insert(sync_state).values(id=seq % MARK_SHARDS, applied_seq=seq))


# --- claims -------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClaimedTimer:
    """A timer a replica claimed to fire."""

    owner: str
    key: str
    due_at: datetime
    payload: dict[str, Any]
    claim_token: str


async def claim_schedules(
    session: AsyncSession, *, me: str, token: str, now: datetime, horizon: datetime, lease: timedelta, limit: int
) -> list[Schedule]:
    """Claim the runnable schedules due by ``horizon`` that nobody holds (or whose claim lapsed)."""
    due = (
        select(schedules.c.trigger_id)
        .where(
            schedules.c.next_due_at <= horizon,
            or_(schedules.c.claim_until.is_(None), schedules.c.claim_until < now),
        )
        .order_by(schedules.c.next_due_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
        .subquery()
    )
    stmt = (
        update(schedules)
        .where(schedules.c.trigger_id == due.c.trigger_id)
        .values(claimed_by=me, claim_token=token, claim_until=func.greatest(schedules.c.next_due_at, _at(now)) + lease)
        .returning(*schedules.c)
    )
    return [_schedule(r) for r in (await session.execute(stmt)).mappings()]


async def held_schedules(session: AsyncSession, *, claims: Sequence[tuple[str, str]]) -> set[str]:
    """Which ``(trigger_id, claim_token)`` claims still stand (no change or other replica since)."""
    if not claims:
        return set()
    rows = await session.execute(
        select(schedules.c.trigger_id, schedules.c.claim_token).where(
            schedules.c.trigger_id.in_([c[0] for c in claims])
        )
    )
    wanted = set(claims)
    return {r.trigger_id for r in rows if (r.trigger_id, r.claim_token) in wanted}


_MARK_FIRED = text(
    "UPDATE scheduler.schedules AS s SET last_fired_at = COALESCE(u.last, s.last_fired_at), next_due_at = u.next, "
    "claimed_by = NULL, claim_token = NULL, claim_until = NULL "
    "FROM unnest(CAST(:ids AS uuid[]), CAST(:tokens AS uuid[]), CAST(:lasts AS timestamptz[]), "
    "CAST(:nexts AS timestamptz[])) AS u(id, token, last, next) "
    "WHERE s.trigger_id = u.id AND s.claim_token = u.token"
)


async def mark_fired(
    session: AsyncSession, *, fired: Sequence[tuple[str, str, datetime | None, datetime | None]]
) -> None:
    """Record fires JetStream acknowledged, ``(trigger_id, claim_token, last_fired_at, next_due_at)``,
    releasing each claim; a claim that no longer stands changes nothing. One statement for all (a
    second's worth of fires is recorded at once, right after they went out)."""
    if not fired:
        return
    ids, tokens, lasts, nexts = (list(c) for c in zip(*fired, strict=True))
    await session.execute(_MARK_FIRED, {"ids": ids, "tokens": tokens, "lasts": lasts, "nexts": nexts})


async def release_claims(session: AsyncSession, *, me: str) -> None:
    """Give back every claim of this replica (stopping): another replica fires them without waiting."""
    cleared = {"claimed_by": None, "claim_token": None, "claim_until": None}
    await session.execute(update(schedules).where(schedules.c.claimed_by == me).values(**cleared))
    await session.execute(update(timers).where(timers.c.claimed_by == me).values(**cleared))


# --- timers -------------------------------------------------------------------------------------------


async def set_timer(
    session: AsyncSession, *, owner: str, key: str, due_at: datetime, payload: dict[str, Any], now: datetime
) -> None:
    """Arm ``(owner, key)``, or move it: a moved timer loses its claim (the old due time must not fire)."""
    stmt = insert(timers).values(owner=owner, key=key, due_at=due_at, payload=payload, updated_at=now)
    changed = or_(timers.c.due_at != stmt.excluded.due_at, timers.c.payload != stmt.excluded.payload)
    await session.execute(
        stmt.on_conflict_do_update(
            index_elements=[timers.c.owner, timers.c.key],
            set_={
                "due_at": stmt.excluded.due_at,
                "payload": stmt.excluded.payload,
                "updated_at": stmt.excluded.updated_at,
                "claimed_by": None,
                "claim_token": None,
                "claim_until": None,
            },
            where=changed,
        )
    )


async def cancel_timer(session: AsyncSession, *, owner: str, key: str) -> bool:
    """Disarm ``(owner, key)``; whether it was armed."""
    result = await session.execute(
        delete(timers).where(timers.c.owner == owner, timers.c.key == key).returning(timers.c.key)
    )
    return result.first() is not None


async def claim_timers(
    session: AsyncSession, *, me: str, token: str, now: datetime, horizon: datetime, lease: timedelta, limit: int
) -> list[ClaimedTimer]:
    """Claim the timers due by ``horizon`` that nobody holds (or whose claim lapsed)."""
    due = (
        select(timers.c.owner, timers.c.key)
        .where(timers.c.due_at <= horizon, or_(timers.c.claim_until.is_(None), timers.c.claim_until < now))
        .order_by(timers.c.due_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
        .subquery()
    )
    stmt = (
        update(timers)
        .where(timers.c.owner == due.c.owner, timers.c.key == due.c.key)
        .values(claimed_by=me, claim_token=token, claim_until=func.greatest(timers.c.due_at, _at(now)) + lease)
        .returning(timers.c.owner, timers.c.key, timers.c.due_at, timers.c.payload, timers.c.claim_token)
    )
    return [ClaimedTimer(**r) for r in (await session.execute(stmt)).mappings()]


async def held_timers(session: AsyncSession, *, claims: Sequence[tuple[str, str, str]]) -> set[tuple[str, str]]:
    """Which ``(owner, key, claim_token)`` claims still stand (not moved, cancelled or taken over)."""
    if not claims:
        return set()
    rows = await session.execute(
        select(timers.c.owner, timers.c.key, timers.c.claim_token).where(
            tuple_(timers.c.owner, timers.c.key).in_([(o, k) for o, k, _ in claims])
        )
    )
    wanted = set(claims)
    return {(r.owner, r.key) for r in rows if (r.owner, r.key, r.claim_token) in wanted}


_FORGET_FIRED = text(
    "DELETE FROM scheduler.timers AS t USING unnest(CAST(:owners AS text[]), CAST(:keys AS text[]), "
    "CAST(:tokens AS uuid[])) AS u(owner, key, token) "
    "WHERE t.owner = u.owner AND t.key = u.key AND t.claim_token = u.token"
)


async def forget_fired_timers(session: AsyncSession, *, fired: Sequence[tuple[str, str, str]]) -> None:
    """Delete timers whose fire JetStream acknowledged, ``(owner, key, claim_token)``, unless re-set since."""
    if not fired:
        return
    owners, keys, tokens = (list(c) for c in zip(*fired, strict=True))
    await session.execute(_FORGET_FIRED, {"owners": owners, "keys": keys, "tokens": tokens})
