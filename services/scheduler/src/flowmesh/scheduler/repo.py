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
from typing import TYPE_CHECKING, Any, Final

from flowmesh.runtime.db import Connection, Params, where
from flowmesh.scheduler.domain import Schedule

if TYPE_CHECKING:
    import asyncpg

LOCK_CLASS: Final = 0x5C4E
"""First key of the scheduler's per-flow advisory locks (the two-key space is apart from one-key locks)."""

MARK_SHARDS: Final = 16
"""Rows the applied mark of flow announcements is spread over."""
_SCHEDULE_FIELDS: Final = tuple(f for f in Schedule.__dataclass_fields__)
_SCHEDULE_COLUMNS: Final = ", ".join(_SCHEDULE_FIELDS)


def _schedule(row: asyncpg.Record) -> Schedule:
    return Schedule(**{f: row[f] for f in _SCHEDULE_FIELDS})


def _flow_lock_key(flow_id: str) -> int:
    # a stable 31-bit key per flow: collisions only serialise two flows' updates
    return zlib.crc32(flow_id.encode()) & 0x7FFFFFFF


# --- schedules: the copy of the flows service's triggers --------------------------------------------


async def lock_flows(conn: Connection, *, flow_ids: Iterable[str]) -> None:
    """Serialise changes to these flows' schedules until the transaction ends (in key order: no deadlock)."""
    for key in sorted({_flow_lock_key(f) for f in flow_ids}):
        await conn.execute("SELECT pg_advisory_xact_lock($1, $2)", LOCK_CLASS, key)


async def get_schedules(conn: Connection, *, trigger_ids: Sequence[str]) -> dict[str, Schedule]:
    """The stored schedules among ``trigger_ids``."""
    if not trigger_ids:
        return {}
    rows = await conn.fetch(
        f"SELECT {_SCHEDULE_COLUMNS} FROM scheduler.schedules WHERE trigger_id = ANY($1::uuid[])", list(trigger_ids)
    )
    return {r["trigger_id"]: _schedule(r) for r in rows}


async def schedules_of_flow(conn: Connection, *, flow_id: str) -> list[Schedule]:
    """Every stored schedule of one flow."""
    rows = await conn.fetch(f"SELECT {_SCHEDULE_COLUMNS} FROM scheduler.schedules WHERE flow_id = $1", flow_id)
    return [_schedule(r) for r in rows]


async def known_triggers(conn: Connection, *, after: str | None, upto: str | None) -> list[tuple[str, str]]:
    """``(trigger_id, flow_id)`` of the stored schedules with ids in ``(after, upto]`` (None: unbounded)."""
    p = Params()
    conditions: list[str] = []
    if after is not None:
        conditions.append(f"trigger_id > {p(after)}")
    if upto is not None:
        conditions.append(f"trigger_id <= {p(upto)}")
    rows = await conn.fetch(f"SELECT trigger_id, flow_id FROM scheduler.schedules {where(conditions)}", *p.values)
    return [(r["trigger_id"], r["flow_id"]) for r in rows]


def _save_schedule_sql(*, rearmed: bool) -> str:
    columns = [*_SCHEDULE_FIELDS, "updated_at"]
    changes = [f"{c} = EXCLUDED.{c}" for c in columns if c != "trigger_id"]
    if rearmed:
        changes += ["claimed_by = NULL", "claim_token = NULL", "claim_until = NULL"]
    return (
        f"INSERT INTO scheduler.schedules ({', '.join(columns)}) "
        f"VALUES ({', '.join(f'${i}' for i in range(1, len(columns) + 1))}) "
        f"ON CONFLICT (trigger_id) DO UPDATE SET {', '.join(changes)}"
    )


_SAVE_SCHEDULE: Final = _save_schedule_sql(rearmed=False)
_SAVE_REARMED_SCHEDULE: Final = _save_schedule_sql(rearmed=True)


async def save_schedule(conn: Connection, *, row: Schedule, rearmed: bool, now: datetime) -> None:
    """Insert or update a schedule; a re-armed one loses any claim (that claim must not fire)."""
    await conn.execute(
        _SAVE_REARMED_SCHEDULE if rearmed else _SAVE_SCHEDULE, *(getattr(row, f) for f in _SCHEDULE_FIELDS), now
    )


async def delete_schedules(conn: Connection, *, trigger_ids: Sequence[str]) -> None:
    """Forget schedules whose trigger or flow is gone."""
    if trigger_ids:
        await conn.execute("DELETE FROM scheduler.schedules WHERE trigger_id = ANY($1::uuid[])", list(trigger_ids))


async def applied_seq(conn: Connection) -> int:
    """The highest FLOWS stream sequence applied (0: none yet)."""
    found = await conn.fetchval("SELECT max(applied_seq) FROM scheduler.sync_state")
    return int(found or 0)


async def mark_applied(conn: Connection, *, seq: int) -> None:
    """Record, in the caller's transaction, that the announcement ``seq`` is reflected here.

    The mark is spread over ``MARK_SHARDS`` rows (the highest wins): one row would serialise every
    announcement's commit behind the one before.
    """
    await conn.execute(
        "INSERT INTO scheduler.sync_state AS m (id, applied_seq) VALUES ($1, $2) "
        "ON CONFLICT (id) DO UPDATE SET applied_seq = GREATEST(m.applied_seq, EXCLUDED.applied_seq)",
        seq % MARK_SHARDS,
        seq,
    )


async def reset_applied(conn: Connection, *, seq: int) -> None:
    """Set the applied mark to ``seq`` (the FLOWS stream was recreated and counts from scratch)."""
    await conn.execute("DELETE FROM scheduler.sync_state")
    await conn.execute("INSERT INTO scheduler.sync_state (id, applied_seq) VALUES ($1, $2)", seq % MARK_SHARDS, seq)


# --- claims -------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClaimedTimer:
    """A timer a replica claimed to fire."""

    owner: str
    key: str
    due_at: datetime
    payload: dict[str, Any]
    claim_token: str


_CLAIM_SCHEDULES: Final = (
    "UPDATE scheduler.schedules AS s "
    "SET claimed_by = $1, claim_token = $2, claim_until = GREATEST(s.next_due_at, $3::timestamptz) + $4::interval "
    "FROM (SELECT trigger_id FROM scheduler.schedules "
    "WHERE next_due_at <= $5 AND (claim_until IS NULL OR claim_until < $3::timestamptz) "
    "ORDER BY next_due_at LIMIT $6 FOR UPDATE SKIP LOCKED) AS due "
    f"WHERE s.trigger_id = due.trigger_id RETURNING {', '.join(f's.{f}' for f in _SCHEDULE_FIELDS)}"
)


async def claim_schedules(
    conn: Connection, *, me: str, token: str, now: datetime, horizon: datetime, lease: timedelta, limit: int
) -> list[Schedule]:
    """Claim the runnable schedules due by ``horizon`` that nobody holds (or whose claim lapsed)."""
    rows = await conn.fetch(_CLAIM_SCHEDULES, me, token, now, lease, horizon, limit)
    return [_schedule(r) for r in rows]


async def held_schedules(conn: Connection, *, claims: Sequence[tuple[str, str]]) -> set[str]:
    """Which ``(trigger_id, claim_token)`` claims still stand (no change or other replica since)."""
    if not claims:
        return set()
    rows = await conn.fetch(
        "SELECT trigger_id, claim_token FROM scheduler.schedules WHERE trigger_id = ANY($1::uuid[])",
        [c[0] for c in claims],
    )
    wanted = set(claims)
    return {r["trigger_id"] for r in rows if (r["trigger_id"], r["claim_token"]) in wanted}


_MARK_FIRED: Final = (
    "UPDATE scheduler.schedules AS s SET last_fired_at = COALESCE(u.last, s.last_fired_at), next_due_at = u.next, "
    "claimed_by = NULL, claim_token = NULL, claim_until = NULL "
    "FROM unnest($1::uuid[], $2::uuid[], $3::timestamptz[], $4::timestamptz[]) AS u(id, token, last, next) "
    "WHERE s.trigger_id = u.id AND s.claim_token = u.token"
)


async def mark_fired(conn: Connection, *, fired: Sequence[tuple[str, str, datetime | None, datetime | None]]) -> None:
    """Record fires JetStream acknowledged, ``(trigger_id, claim_token, last_fired_at, next_due_at)``,
    releasing each claim; a claim that no longer stands changes nothing. One statement for all (a
    second's worth of fires is recorded at once, right after they went out)."""
    if not fired:
        return
    ids, tokens, lasts, nexts = (list(c) for c in zip(*fired, strict=True))
    await conn.execute(_MARK_FIRED, ids, tokens, lasts, nexts)


async def release_claims(conn: Connection, *, me: str) -> None:
    """Give back every claim of this replica (stopping): another replica fires them without waiting."""
    for table in ("schedules", "timers"):
        await conn.execute(
            f"UPDATE scheduler.{table} SET claimed_by = NULL, claim_token = NULL, claim_until = NULL "
            "WHERE claimed_by = $1",
            me,
        )


# --- timers -------------------------------------------------------------------------------------------


_SET_TIMER: Final = (
    "INSERT INTO scheduler.timers AS t (owner, key, due_at, payload, updated_at) VALUES ($1, $2, $3, $4, $5) "
    "ON CONFLICT (owner, key) DO UPDATE SET due_at = EXCLUDED.due_at, payload = EXCLUDED.payload, "
    "updated_at = EXCLUDED.updated_at, claimed_by = NULL, claim_token = NULL, claim_until = NULL "
    "WHERE t.due_at <> EXCLUDED.due_at OR t.payload <> EXCLUDED.payload"
)


async def set_timer(
    conn: Connection, *, owner: str, key: str, due_at: datetime, payload: dict[str, Any], now: datetime
) -> None:
    """Arm ``(owner, key)``, or move it: a moved timer loses its claim (the old due time must not fire)."""
    await conn.execute(_SET_TIMER, owner, key, due_at, payload, now)


async def cancel_timer(conn: Connection, *, owner: str, key: str) -> bool:
    """Disarm ``(owner, key)``; whether it was armed."""
    found = await conn.fetchrow("DELETE FROM scheduler.timers WHERE owner = $1 AND key = $2 RETURNING key", owner, key)
    return found is not None


_CLAIM_TIMERS: Final = (
    "UPDATE scheduler.timers AS t "
    "SET claimed_by = $1, claim_token = $2, claim_until = GREATEST(t.due_at, $3::timestamptz) + $4::interval "
    "FROM (SELECT owner, key FROM scheduler.timers "
    "WHERE due_at <= $5 AND (claim_until IS NULL OR claim_until < $3::timestamptz) "
    "ORDER BY due_at LIMIT $6 FOR UPDATE SKIP LOCKED) AS due "
    "WHERE t.owner = due.owner AND t.key = due.key "
    "RETURNING t.owner, t.key, t.due_at, t.payload, t.claim_token"
)


async def claim_timers(
    conn: Connection, *, me: str, token: str, now: datetime, horizon: datetime, lease: timedelta, limit: int
) -> list[ClaimedTimer]:
    """Claim the timers due by ``horizon`` that nobody holds (or whose claim lapsed)."""
    rows = await conn.fetch(_CLAIM_TIMERS, me, token, now, lease, horizon, limit)
    return [
        ClaimedTimer(
            owner=r["owner"], key=r["key"], due_at=r["due_at"], payload=r["payload"], claim_token=r["claim_token"]
        )
        for r in rows
    ]


async def held_timers(conn: Connection, *, claims: Sequence[tuple[str, str, str]]) -> set[tuple[str, str]]:
    """Which ``(owner, key, claim_token)`` claims still stand (not moved, cancelled or taken over)."""
    if not claims:
        return set()
    rows = await conn.fetch(
        "SELECT owner, key, claim_token FROM scheduler.timers "
        "WHERE (owner, key) IN (SELECT * FROM unnest($1::text[], $2::text[]))",
        [o for o, _, _ in claims],
        [k for _, k, _ in claims],
    )
    wanted = set(claims)
    return {(r["owner"], r["key"]) for r in rows if (r["owner"], r["key"], r["claim_token"]) in wanted}


_FORGET_FIRED: Final = (
    "DELETE FROM scheduler.timers AS t USING unnest($1::text[], $2::text[], $3::uuid[]) AS u(owner, key, token) "
    "WHERE t.owner = u.owner AND t.key = u.key AND t.claim_token = u.token"
)


async def forget_fired_timers(conn: Connection, *, fired: Sequence[tuple[str, str, str]]) -> None:
    """Delete timers whose fire JetStream acknowledged, ``(owner, key, claim_token)``, unless re-set since."""
    if not fired:
        return
    owners, keys, tokens = (list(c) for c in zip(*fired, strict=True))
    await conn.execute(_FORGET_FIRED, owners, keys, tokens)
