"""Every SQL statement of the runner. Reads for clients filter by tenant."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, Final

import asyncpg
import orjson
from sqlalchemy import Table, and_, func, or_, select, text, update
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncSession

from flowmesh.contracts.ids import format_time, new_id
from flowmesh.contracts.models import Run, RunEvent, StepRun
from flowmesh.contracts.models.rpc import RunListQuery
from flowmesh.contracts.steps import types_that_run
from flowmesh.runner.engine import Child, Deadline, RunRecord, RunState
from flowmesh.runner.graph import StepState
from flowmesh.runner.tables import event_triggers, run_events, runs, step_runs
from flowmesh.runtime.db import PAGE_TOTAL, create_driver_pool, read_page, read_page_on

OPEN = ("queued", "running", "waiting")
_STEP_FIELDS: tuple[str, ...] = tuple(f for f in StepState.__slots__ if f in step_runs.c)
"""The step columns the engine's :class:`StepState` carries (all of them but the keys and derived ones)."""


_DIALECT = postgresql.dialect()  # type: ignore[no-untyped-call]  # SQLAlchemy's dialect class is untyped


def _pg_type(table: Table, column: str) -> str:
    """The PostgreSQL type of a column, for casts in the statements below (``text``, ``jsonb``, …)."""
    return str(table.c[column].type.compile(dialect=_DIALECT)).lower()


# The statements every change of a run makes, run on the driver connection (executemany). Their
# column lists come from tables.py: a column added there is written here, or the runner fails at
# import (a parameter tuple of the wrong length) and in test_repo_columns.
_STEP_COLUMNS = ("run_id", "step_id", "type", *_STEP_FIELDS, "duration_ms", "updated_at", "lease_until")
# every change of a step row sets its lease: none, unless this change hands the step to a local worker
_UPSERT_STEPS_SQL = (
    f"INSERT INTO runner.step_runs ({', '.join(_STEP_COLUMNS)}) "
    f"VALUES ({', '.join(f'${i}' for i in range(1, len(_STEP_COLUMNS) + 1))}) "
    "ON CONFLICT (run_id, step_id) DO UPDATE SET "
    + ", ".join(f"{c} = EXCLUDED.{c}" for c in (*_STEP_FIELDS, "duration_ms", "updated_at", "lease_until"))
)
_EVENT_COLUMNS: tuple[str, ...] = tuple(run_events.c.keys())
_INSERT_EVENTS_SQL = (
    f"INSERT INTO runner.run_events ({', '.join(_EVENT_COLUMNS)}) "
    f"VALUES ({', '.join(f'${i}' for i in range(1, len(_EVENT_COLUMNS) + 1))})"
)


# --- versions ------------------------------------------------------------------------------------


# --- runs ----------------------------------------------------------------------------------------


def _record(row: RowMapping) -> RunRecord:
    return RunRecord(
        id=row["id"],
        tenant_id=row["tenant_id"],
        flow_id=row["flow_id"],
        version=row["version"],
        status=row["status"],
        trigger_type=row["trigger_type"],
        input=row["input"],
        created_at=row["created_at"],
        retry_count=row["retry_count"],
        parent_run_id=row["parent_run_id"],
        parent_step_id=row["parent_step_id"],
        output=row["output"],
        error=row["error"],
        started_at=row["started_at"],
        completed_at=row["completed_at"],
        last_seq=row["last_seq"],
        deadline_at=row["deadline_at"],
        traceparent=row["traceparent"],
        revision=row["revision"],
    )


def _run(row: Mapping[Any, Any]) -> Run:
    started, completed = row["started_at"], row["completed_at"]
    duration = int((completed - started).total_seconds() * 1000) if started and completed else None
    return Run(
        id=row["id"],
        flow_id=row["flow_id"],
        version=row["version"],
        tenant_id=row["tenant_id"],
        status=row["status"],
        trigger_type=row["trigger_type"],
        trigger_id=row["trigger_id"],
        input=row["input"],
        output=row["output"],
        error=row["error"],
        idempotency_key=row["idempotency_key"],
        parent_run_id=row["parent_run_id"],
        retry_of=row["retry_of"],
        retry_count=row["retry_count"],
        created_at=row["created_at"],
        started_at=started,
        completed_at=completed,
        duration_ms=duration,
    )


async def run_by_key(session: AsyncSession, *, tenant: str, flow_id: str, key: str) -> tuple[Run, str | None] | None:
    """The run an idempotency key made, and the hash of its input."""
    stmt = select(runs).where(runs.c.tenant_id == tenant, runs.c.flow_id == flow_id, runs.c.idempotency_key == key)
    row = (await session.execute(stmt)).mappings().one_or_none()
    return None if row is None else (_run(row), row["input_hash"])


async def lock_run(session: AsyncSession, *, run_id: str, tenant: str | None = None) -> RunRecord | None:
    """A run for changing, its row locked until the transaction ends (one writer per run at a time)."""
    stmt = select(runs).where(runs.c.id == run_id).with_for_update()
    if tenant is not None:
        stmt = stmt.where(runs.c.tenant_id == tenant)
    row = (await session.execute(stmt)).mappings().one_or_none()
    return None if row is None else _record(row)


# --- the change path, on the driver connection -----------------------------------------------------
#
# Every change of a run (a step's result, a timer, an event, a decision) is one transaction of four
# round trips: BEGIN, the run locked with its steps, one statement writing everything, COMMIT.

_RECORD_FIELDS: tuple[str, ...] = tuple(f for f in RunRecord.__dataclass_fields__ if f in runs.c)
_JSON_RUN_FIELDS = frozenset(f for f in _RECORD_FIELDS if _pg_type(runs, f) == "jsonb")


def _select_list(table: Table, columns: tuple[str, ...], alias: str) -> str:
    """Columns as the engine wants them: UUIDs as text (asyncpg would make ``uuid.UUID`` of them)."""
    return ", ".join(f"{alias}.{c}::text AS {c}" if _pg_type(table, c) == "uuid" else f"{alias}.{c}" for c in columns)


_READ_RUN_SQL = f"SELECT {_select_list(runs, _RECORD_FIELDS, 'r')} FROM runner.runs AS r WHERE r.id = $1"
_LOCK_RUN_SQL = _READ_RUN_SQL + " FOR UPDATE"
_LOCK_TENANT_RUN_SQL = (
    f"SELECT {_select_list(runs, _RECORD_FIELDS, 'r')} FROM runner.runs AS r "
    "WHERE r.id = $1 AND r.tenant_id = $2 FOR UPDATE"
)
_STEPS_SQL = (
    f"SELECT s.step_id, {_select_list(step_runs, _STEP_FIELDS, 's')} FROM runner.step_runs AS s WHERE s.run_id = $1"
)
_VERSION_SQL = "SELECT definition, settings FROM runner.versions WHERE flow_id = $1 AND version = $2"


async def lock_for_change(
    conn: Any, *, run_id: str, tenant: str | None = None
) -> tuple[RunRecord, dict[str, StepState]] | None:
    """A run locked until the transaction ends (one writer per run at a time), and its recorded steps."""
    if tenant is None:
        row = await conn.fetchrow(_LOCK_RUN_SQL, run_id)
    else:
        row = await conn.fetchrow(_LOCK_TENANT_RUN_SQL, run_id, tenant)
    return None if row is None else await _with_steps(conn, row)


async def read_for_change(conn: Any, *, run_id: str) -> tuple[RunRecord, dict[str, StepState]] | None:
    """A run and its recorded steps, unlocked, read in that order: should its revision still be the
    one read when a change from it is written, no change came after the run's row was read, so
    the steps read after it are of that revision too (:func:`save_change` checks)."""
    row = await conn.fetchrow(_READ_RUN_SQL, run_id)
    return None if row is None else await _with_steps(conn, row)


async def _with_steps(conn: Any, row: Any) -> tuple[RunRecord, dict[str, StepState]]:
    run_id = row["id"]
    record = RunRecord(**{f: _loads(row[f]) if f in _JSON_RUN_FIELDS else row[f] for f in _RECORD_FIELDS})
    steps = {
        r["step_id"]: StepState(**{f: _loads(r[f]) if f in _JSON_STEP_FIELDS else r[f] for f in _STEP_FIELDS})
        for r in await conn.fetch(_STEPS_SQL, run_id)
    }
    return record, steps


_RUN_FIELDS = tuple(f for f in Run.model_fields if f in runs.c)
_RUN_JSON = frozenset(f for f in _RUN_FIELDS if _pg_type(runs, f) == "jsonb")
_RUN_SELECT = _select_list(runs, _RUN_FIELDS, "r")
_GET_RUN_SQL = f"SELECT {_RUN_SELECT} FROM runner.runs AS r WHERE r.id = $1 AND r.tenant_id = $2"


async def get_run_on(conn: Any, *, tenant: str, run_id: str) -> Run | None:
    """One run of the tenant, read on a driver connection (one statement, no transaction)."""
    row = await conn.fetchrow(_GET_RUN_SQL, run_id, tenant)
    return None if row is None else _run({f: _loads(row[f]) if f in _RUN_JSON else row[f] for f in _RUN_FIELDS})


async def version_on(conn: Any, *, flow_id: str, version: int) -> tuple[Any, Any] | None:
    """The definition and settings of the runner's copy of a frozen version."""
    row = await conn.fetchrow(_VERSION_SQL, flow_id, version)
    return None if row is None else (_loads(row["definition"]), _loads(row["settings"]))


def _loads(value: str | None) -> Any:
    return None if value is None else orjson.loads(value)


async def load_steps(session: AsyncSession, *, run_id: str) -> dict[str, StepState]:
    """Every recorded step of a run."""
    stmt = select(step_runs.c.step_id, *(step_runs.c[f] for f in _STEP_FIELDS)).where(step_runs.c.run_id == run_id)
    return {
        row["step_id"]: StepState(**{f: row[f] for f in _STEP_FIELDS})
        for row in (await session.execute(stmt)).mappings()
    }


async def count_in_flight(session: AsyncSession) -> int:
    """Top-level runs queued or running, every tenant's (an index-only count on ``runs_in_flight``)."""
    # the status test is literal SQL: a partial index serves only a predicate the planner can prove
    in_flight = text("status IN ('queued', 'running')")
    stmt = select(func.count()).select_from(runs).where(runs.c.parent_run_id.is_(None), in_flight)
    return int((await session.execute(stmt)).scalar_one())


async def save(
    session: AsyncSession, state: RunState, leases: dict[str, datetime] | None = None
) -> list[dict[str, Any]]:
    """Write a run state's changes; returns its new events as published payloads, in ``seq`` order.

    ``leases``: steps this change hands to a worker of this process, and until when it answers for them.
    """
    r = state.run
    await session.execute(
        update(runs)
        .where(runs.c.id == r.id)
        .values(
            status=r.status,
            output=r.output,
            error=r.error,
            started_at=r.started_at,
            completed_at=r.completed_at,
            last_seq=r.last_seq,
            deadline_at=r.deadline_at,
            updated_at=state.now,
            revision=runs.c.revision + 1,  # every change counts (see save_change)
        )
    )
    r.revision += 1
    return await write_changes(await driver_of(session), state, leases or {})


async def write_changes(conn: Any, state: RunState, leases: dict[str, datetime]) -> list[dict[str, Any]]:
    """Write a run state's step changes and events on an asyncpg connection (inside its transaction).

    The hot path of every run: two statements, prepared once per connection by asyncpg.
    """
    r = state.run
    if state.changed:
        await conn.executemany(
            _UPSERT_STEPS_SQL,
            [
                (
                    r.id,
                    step_id,
                    state.graph.steps[step_id].type,
                    *_step_values(state.steps[step_id]),
                    state.now,
                    leases.get(step_id),
                )
                for step_id in sorted(state.changed)
            ],
        )
    if not state.events:
        return []
    rows = _event_rows(r, state)
    await conn.executemany(_INSERT_EVENTS_SQL, [_event_values(row, _EVENT_COLUMNS) for row in rows])
    return [_event_payload(r, row) for row in rows]


def _event_rows(r: RunRecord, state: RunState) -> list[dict[str, Any]]:
    return [
        {
            "run_id": r.id,
            "seq": e.seq,
            "id": new_id(),
            "type": e.type,
            "ts": e.ts,
            "step_id": e.step_id,
            "attempt": e.attempt,
            "data": e.data.dump(),
        }
        for e in state.events
    ]


_RUN_COLUMNS: tuple[str, ...] = tuple(runs.c.keys())
_INSERT_RUN_SQL = (
    f"INSERT INTO runner.runs ({', '.join(_RUN_COLUMNS)}) "
    f"VALUES ({', '.join(f'${i}' for i in range(1, len(_RUN_COLUMNS) + 1))}) "
    "ON CONFLICT (tenant_id, flow_id, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING RETURNING id"
)


# a new run, its steps and its events in one statement (one round trip, its own transaction);
# nothing is written when the idempotency key is taken
_N_RUN = len(_RUN_COLUMNS)
_STEP_ARRAYS = tuple((c, _pg_type(step_runs, c)) for c in ("step_id", "type", *_STEP_FIELDS, "duration_ms"))
_LEASED_STEP_ARRAYS = (*_STEP_ARRAYS, ("lease_until", _pg_type(step_runs, "lease_until")))
_EVENT_ARRAYS = tuple((c, _pg_type(run_events, c)) for c in _EVENT_COLUMNS if c != "run_id")


def _unnest(arrays: tuple[tuple[str, str], ...], first: int, alias: str = "x") -> str:
    params = ", ".join(f"${first + i}::{t}[]" for i, (_, t) in enumerate(arrays))
    return f"unnest({params}) AS {alias}({', '.join(c for c, _ in arrays)})"


_S = _N_RUN + 1  # first parameter of the step arrays (with their leases); then updated_at, then the event arrays
_E = _S + len(_LEASED_STEP_ARRAYS) + 1
# with a limit on the tenant's top-level runs in flight ($N+1 + … the last parameter): nothing is
# written when as many are queued or running (counted on a partial index, at most the limit)
_IN_FLIGHT = (
    "(SELECT count(*) FROM (SELECT 1 FROM runner.runs WHERE tenant_id = $2 AND parent_run_id IS NULL "
    "AND status IN ('queued', 'running') LIMIT {limit}) AS f) < {limit}"
)


def _insert_run_sql(limit_param: int | None) -> str:
    if limit_param is None:
        return _INSERT_RUN_SQL
    values = ", ".join(f"${i}" for i in range(1, len(_RUN_COLUMNS) + 1))
    return (
        f"INSERT INTO runner.runs ({', '.join(_RUN_COLUMNS)}) SELECT {values} "
        f"WHERE {_IN_FLIGHT.format(limit=f'${limit_param}::int')} "
        "ON CONFLICT (tenant_id, flow_id, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING RETURNING id"
    )


def _create_run_sql(limit_param: int | None) -> str:
    return (
        f"WITH run AS ({_insert_run_sql(limit_param)}), "
        f"steps AS (INSERT INTO runner.step_runs (run_id, {', '.join(c for c, _ in _LEASED_STEP_ARRAYS)}, updated_at) "
        f"SELECT $1::uuid, x.*, ${_E - 1}::timestamptz FROM {_unnest(_LEASED_STEP_ARRAYS, _S)} "
        "WHERE EXISTS (SELECT 1 FROM run)), "
        f"events AS (INSERT INTO runner.run_events (run_id, {', '.join(c for c, _ in _EVENT_ARRAYS)}) "
        f"SELECT $1::uuid, x.* FROM {_unnest(_EVENT_ARRAYS, _E)} WHERE EXISTS (SELECT 1 FROM run)) "
        "SELECT count(*) FROM run"
    )


_CREATE_RUN_SQL = _create_run_sql(None)
_CREATE_LIMITED_RUN_SQL = _create_run_sql(_E + len(_EVENT_ARRAYS))

_CHANGED_RUN = ("status", "output", "error", "started_at", "completed_at", "last_seq", "deadline_at")
_RUN_ARRAYS = (("id", "uuid"), ("revision", "bigint"), *((c, _pg_type(runs, c)) for c in _CHANGED_RUN))
_BATCH_STEP_ARRAYS = (("run_id", "uuid"), *_LEASED_STEP_ARRAYS)
_BATCH_EVENT_ARRAYS = (("run_id", "uuid"), *_EVENT_ARRAYS)


def _save_sql() -> str:
    """One statement writing the changes of several runs: each run's row, changed steps and new events,
    only if that run's revision is still the one its change was made from (always so under the run's
    lock; for a run held in memory, so only if no other change came between). Returns the ids of the
    runs it changed.

    Parameters: ``$1`` the time, then arrays (one element a run): id, revision, the changed columns;
    the steps' columns with their run's id and leases; the events' columns with their run's id.
    """
    first_run = 2
    steps = first_run + len(_RUN_ARRAYS)
    events = steps + len(_BATCH_STEP_ARRAYS)
    run_set = ", ".join(f"{c} = i.{c}" for c in _CHANGED_RUN)
    step_columns = ", ".join(c for c, _ in _BATCH_STEP_ARRAYS)
    updated = ", ".join(f"{c} = EXCLUDED.{c}" for c, _ in _LEASED_STEP_ARRAYS[1:])
    return (
        f"WITH run AS (UPDATE runner.runs AS r SET {run_set}, updated_at = $1::timestamptz, "
        f"revision = i.revision + 1 FROM {_unnest(_RUN_ARRAYS, first_run, 'i')} "
        "WHERE r.id = i.id AND r.revision = i.revision RETURNING r.id), "
        f"steps AS (INSERT INTO runner.step_runs ({step_columns}, updated_at) "
        f"SELECT x.*, $1::timestamptz FROM {_unnest(_BATCH_STEP_ARRAYS, steps)} "
        "WHERE x.run_id IN (SELECT id FROM run) "
        f"ON CONFLICT (run_id, step_id) DO UPDATE SET {updated}, updated_at = EXCLUDED.updated_at), "
        f"events AS (INSERT INTO runner.run_events ({', '.join(c for c, _ in _BATCH_EVENT_ARRAYS)}) "
        f"SELECT x.* FROM {_unnest(_BATCH_EVENT_ARRAYS, events)} WHERE x.run_id IN (SELECT id FROM run)) "
        "SELECT id::text FROM run"
    )


_SAVE_SQL = _save_sql()


async def save_change(conn: Any, state: RunState, leases: dict[str, datetime]) -> list[dict[str, Any]] | None:
    """Write a run state's changes in one statement: inside the caller's transaction, under the run's
    lock, or on its own for a run held in memory. Returns its new events as published payloads, in
    ``seq`` order, and counts the run's revision up; None (nothing written) when the run's revision
    is no longer the one ``state`` was made from. ``leases``: steps leased to this process, until when."""
    return (await save_changes(conn, [(state, leases)]))[0]


async def save_changes(
    conn: Any, changes: Sequence[tuple[RunState, dict[str, datetime]]]
) -> list[list[dict[str, Any]] | None]:
    """:func:`save_change` for the changes of several runs (each run at most once), in one statement:
    one round trip and one commit for all. Each run is written or not on its own revision."""
    run_rows: list[tuple[Any, ...]] = []
    step_rows: list[tuple[Any, ...]] = []
    event_rows: list[tuple[Any, ...]] = []
    rows_of: list[list[dict[str, Any]]] = []
    for state, leases in changes:
        r = state.run
        run_rows.append(
            (
                r.id,
                r.revision,
                *(_json(getattr(r, c)) if c in _JSON_RUN_FIELDS else getattr(r, c) for c in _CHANGED_RUN),
            )
        )
        step_rows += [
            (
                r.id,
                step_id,
                state.graph.steps[step_id].type,
                *_step_values(state.steps[step_id]),
                leases.get(step_id),
            )
            for step_id in sorted(state.changed)
        ]
        rows = _event_rows(r, state)
        rows_of.append(rows)
        event_rows += [_event_values(row, tuple(c for c, _ in _BATCH_EVENT_ARRAYS)) for row in rows]
    now = max(state.now for state, _ in changes)
    written = {
        row[0]
        for row in await conn.fetch(
            _SAVE_SQL,
            now,
            *_columns(run_rows, len(_RUN_ARRAYS)),
            *_columns(step_rows, len(_BATCH_STEP_ARRAYS)),
            *_columns(event_rows, len(_BATCH_EVENT_ARRAYS)),
        )
    }
    saved: list[list[dict[str, Any]] | None] = []
    for (state, _), rows in zip(changes, rows_of, strict=True):
        r = state.run
        if r.id not in written:
            saved.append(None)
            continue
        r.revision += 1
        saved.append([_event_payload(r, row) for row in rows])
    return saved


def _columns(rows: list[tuple[Any, ...]], width: int) -> list[list[Any]]:
    """Rows as ``width`` column arrays (``unnest`` parameters)."""
    return [list(c) for c in zip(*rows, strict=True)] if rows else [[] for _ in range(width)]


async def create_run(
    conn: Any,
    *,
    record: RunRecord,
    values: dict[str, Any],
    state: RunState,
    leases: dict[str, datetime],
    in_flight_limit: int | None = None,
) -> list[dict[str, Any]] | None:
    """Insert a run with the steps and events its first change made, in one statement (asyncpg).
    ``leases``: steps leased to this process, until when.

    With ``in_flight_limit``, only while the tenant has fewer top-level runs queued or running.
    Concurrent starts each count before the others commit, so the tenant can go over the limit by
    the starts being made at that moment (at most the runners' concurrent starts).

    Returns its events as published payloads, or None when its idempotency key was taken or the
    limit reached.
    """
    steps = [
        (step_id, state.graph.steps[step_id].type, *_step_values(state.steps[step_id]), leases.get(step_id))
        for step_id in sorted(state.changed)
    ]
    rows = _event_rows(record, state)
    events = [_event_values(row, tuple(c for c, _ in _EVENT_ARRAYS)) for row in rows]
    columns = [list(c) for c in zip(*steps, strict=True)] if steps else [[] for _ in _LEASED_STEP_ARRAYS]
    event_columns = [list(c) for c in zip(*events, strict=True)] if events else [[] for _ in _EVENT_ARRAYS]
    args = (*_run_row(record, values), *columns, state.now, *event_columns)
    if in_flight_limit is None:
        created = await conn.fetchval(_CREATE_RUN_SQL, *args)
    else:
        created = await conn.fetchval(_CREATE_LIMITED_RUN_SQL, *args, in_flight_limit)
    return [_event_payload(record, row) for row in rows] if created else None


def _run_row(record: RunRecord, values: dict[str, Any]) -> tuple[Any, ...]:
    row = {
        "id": record.id,
        "tenant_id": record.tenant_id,
        "flow_id": record.flow_id,
        "version": record.version,
        "status": record.status,
        "trigger_type": record.trigger_type,
        "trigger_id": values.get("trigger_id"),
        "input": _json(record.input),
        "output": _json(record.output),
        "error": _json(record.error),
        "idempotency_key": values.get("idempotency_key"),
        "input_hash": values.get("input_hash"),
        "parent_run_id": record.parent_run_id,
        "parent_step_id": record.parent_step_id,
        "parent_index": values.get("parent_index"),
        "retry_of": values.get("retry_of"),
        "retry_count": 0,
        "created_at": record.created_at,
        "started_at": record.started_at,
        "completed_at": record.completed_at,
        "updated_at": record.created_at,
        "last_seq": record.last_seq,
        "published_seq": 0,
        "deadline_at": record.deadline_at,
        "traceparent": record.traceparent,
        "revision": 0,
    }
    return tuple(row[c] for c in _RUN_COLUMNS)  # a column of tables.py with no value here: KeyError


def _event_values(row: dict[str, Any], columns: tuple[str, ...]) -> tuple[Any, ...]:
    """An event row's parameters in ``columns`` order (``data`` as JSON text)."""
    return tuple(_json(row[c]) if c == "data" else row[c] for c in columns)


async def insert_version(
    conn: Any, *, flow_id: str, version: int, tenant: str, definition: Any, input_schema: Any, settings: Any
) -> None:
    """Keep the runner's copy of a frozen version (once; asyncpg)."""
    await conn.execute(
        "INSERT INTO runner.versions (flow_id, version, tenant_id, definition, input_schema, settings) "
        "VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
        flow_id,
        version,
        tenant,
        _json(definition),
        _json(input_schema),
        _json(settings),
    )


def _json(value: Any) -> str | None:
    """A JSONB parameter on the driver connection (SQLAlchemy's codec takes JSON text)."""
    return None if value is None else orjson.dumps(value).decode()


_JSON_STEP_FIELDS = frozenset(f for f in _STEP_FIELDS if _pg_type(step_runs, f) == "jsonb")


def _step_values(state: StepState) -> tuple[Any, ...]:
    """A step's ``_STEP_FIELDS`` then ``duration_ms``, as parameters (JSON columns as JSON text)."""
    fields = (_json(getattr(state, f)) if f in _JSON_STEP_FIELDS else getattr(state, f) for f in _STEP_FIELDS)
    return (*fields, _duration(state))


async def driver_of(session: AsyncSession) -> Any:
    """The asyncpg connection under the session, inside its transaction."""
    connection = await session.connection()
    raw = await connection.get_raw_connection()
    return raw.driver_connection


def _event_payload(run: RunRecord, row: dict[str, Any]) -> dict[str, Any]:
    """The published form of a run event (what ``RunEvent.wire(exclude_none=True)`` gives, built directly)."""
    payload = {
        "id": row["id"],
        "seq": row["seq"],
        "type": row["type"],
        "ts": format_time(row["ts"]),
        "tenantId": run.tenant_id,
        "runId": run.id,
        "flowId": run.flow_id,
        "version": run.version,
    }
    if row["step_id"] is not None:
        payload["stepId"] = row["step_id"]
    if row["attempt"] is not None:
        payload["attempt"] = row["attempt"]
    payload["data"] = row["data"]
    return payload


def _duration(state: StepState) -> int | None:
    if state.started_at and state.completed_at:
        return int((state.completed_at - state.started_at).total_seconds() * 1000)
    return None


_MARK_PUBLISHED_SQL = (
    "WITH u AS (SELECT * FROM unnest($1::uuid[], $2::int[], $3::int[]) AS u(id, first, last)), "
    "free AS (SELECT r.id FROM runner.runs AS r JOIN u ON r.id = u.id "
    "WHERE r.published_seq >= u.first - 1 AND r.published_seq < u.last "
    "ORDER BY r.id FOR UPDATE OF r SKIP LOCKED) "
    "UPDATE runner.runs AS r SET published_seq = u.last FROM u, free WHERE r.id = u.id AND r.id = free.id"
)


async def mark_published(conn: Any, *, spans: dict[str, tuple[int, int]]) -> dict[str, int]:
    """Record that each run's events ``first..last`` reached JetStream; each run's ``published_seq`` after.

    ``published_seq`` moves only over a span that starts right after it (or overlaps it): it says
    every event up to it is in the stream, so it must never jump over an event whose publish failed
    (a later change's events may well have been published; the sweep re-publishes from the hole).

    A run whose row a change is writing right now is skipped (its span stays with the caller for
    the next flush), and the others are locked in id order: this statement never waits for a
    change, so it cannot deadlock with one. (It did: both wrote many runs' rows in their own orders,
    and each deadlock stalled every run of both statements for PostgreSQL's ``deadlock_timeout``.)
    """
    ids = list(spans)
    await conn.execute(
        _MARK_PUBLISHED_SQL,
        ids,
        [first for first, _ in spans.values()],
        [last for _, last in spans.values()],
    )
    rows = await conn.fetch("SELECT id::text AS id, published_seq FROM runner.runs WHERE id = ANY($1::uuid[])", ids)
    return {row["id"]: row["published_seq"] for row in rows}


async def reset_for_retry(session: AsyncSession, *, run_id: str, keep: set[str], now: datetime) -> int:
    """Forget every step of a run but the succeeded ones; returns the new retry count."""
    forget = step_runs.delete().where(step_runs.c.run_id == run_id)
    if keep:
        forget = forget.where(step_runs.c.step_id.not_in(keep))
    await session.execute(forget)
    stmt = (
        update(runs)
        .where(runs.c.id == run_id)
        .values(
            status="queued",
            output=None,
            error=None,
            completed_at=None,
            retry_count=runs.c.retry_count + 1,
            updated_at=now,
        )
        .returning(runs.c.retry_count)
    )
    return int((await session.execute(stmt)).scalar_one())


# --- reads ---------------------------------------------------------------------------------------


async def read_snapshot(session: AsyncSession, *, tenant: str, run_id: str) -> tuple[Run, int, list[StepRun]] | None:
    """A run, its last event ``seq`` and its steps, as one consistent read (call it in a repeatable-read
    transaction: nothing committed between the statements is seen by one and not the other)."""
    found = (await session.execute(select(runs).where(runs.c.id == run_id, runs.c.tenant_id == tenant))).mappings()
    row = found.one_or_none()
    if row is None:
        return None
    steps, _ = await list_steps(session, run_id=run_id, offset=0, limit=10_000)
    return _run(row), row["last_seq"], steps


async def list_runs(conn: Any, *, tenant: str, q: RunListQuery) -> tuple[list[Run], int]:
    """A page of the tenant's runs, newest first, and how many match (driver statements)."""
    where = ["r.tenant_id = $1"]
    args: list[Any] = [tenant]
    for column, op, value in (
        ("flow_id", "=", q.flow_id),
        ("status", "=", q.status),
        ("created_at", ">=", q.since),
        ("created_at", "<", q.until),
    ):
        if value:
            args.append(value)
            where.append(f"r.{column} {op} ${len(args)}")
    rows, total = await read_page_on(
        conn,
        columns=_RUN_SELECT,
        source="runner.runs AS r WHERE " + " AND ".join(where),
        order_by="r.created_at DESC, r.id DESC",
        args=args,
        offset=q.offset,
        limit=q.page_size,
    )
    return [_run({f: _loads(row[f]) if f in _RUN_JSON else row[f] for f in _RUN_FIELDS}) for row in rows], total


_STEP_INTERNAL = frozenset({"handle", "updated_at", "wait_for", "deadline_at", PAGE_TOTAL})
"""Step columns (and the page's window count) that are not part of the :class:`StepRun` clients see."""


async def list_steps(session: AsyncSession, *, run_id: str, offset: int, limit: int) -> tuple[list[StepRun], int]:
    """A page of a run's steps in the order they started, and how many there are (read in a snapshot)."""
    page = (
        select(step_runs)
        .where(step_runs.c.run_id == run_id)
        .order_by(step_runs.c.started_at.asc().nulls_last(), step_runs.c.updated_at, step_runs.c.step_id)
    )
    rows, total = await read_page(session, page, offset=offset, limit=limit)
    return [StepRun(**{k: v for k, v in r.items() if k not in _STEP_INTERNAL}) for r in rows], total


async def list_events(session: AsyncSession, *, run_id: str, after: int, limit: int) -> tuple[list[RunEvent], int]:
    """A run's first events after ``seq``, in order, and how many there are after it (read in a snapshot)."""
    page = (
        select(run_events, runs.c.tenant_id, runs.c.flow_id, runs.c.version)
        .join(runs, runs.c.id == run_events.c.run_id)
        .where(run_events.c.run_id == run_id, run_events.c.seq > after)
        .order_by(run_events.c.seq)
    )
    rows, total = await read_page(session, page, offset=0, limit=limit)
    return [RunEvent(**{k: v for k, v in r.items() if k != PAGE_TOTAL}) for r in rows], total


async def children(session: AsyncSession, *, parent_run_id: str, parent_step_id: str) -> list[Child]:
    """The child runs a step started, by element index."""
    stmt = select(runs.c.id, runs.c.parent_index, runs.c.status, runs.c.output, runs.c.error).where(
        runs.c.parent_run_id == parent_run_id, runs.c.parent_step_id == parent_step_id
    )
    return [
        Child(id=r.id, index=r.parent_index or 0, status=r.status, output=r.output, error=r.error)
        for r in (await session.execute(stmt)).all()
    ]


async def count_children(session: AsyncSession, *, parent_run_id: str, retry_count: int, but: str) -> int:
    """The child runs an attempt (``retry_count``) of a run started, except those of step ``but``."""
    stmt = (
        select(func.count())
        .select_from(runs)
        .where(
            runs.c.parent_run_id == parent_run_id,
            runs.c.parent_step_id != but,
            # the key ChildRuns gives: child:{run}:{retry}:{step}:{index}
            runs.c.idempotency_key.startswith(f"child:{parent_run_id}:{retry_count}:", autoescape=True),
        )
    )
    return int((await session.execute(stmt)).scalar_one())


async def open_children(session: AsyncSession, *, parent_run_id: str, parent_step_id: str | None = None) -> list[str]:
    """Child runs of a run (or of one of its steps) that have not ended."""
    stmt = select(runs.c.id).where(runs.c.parent_run_id == parent_run_id, runs.c.status.in_(OPEN))
    if parent_step_id is not None:
        stmt = stmt.where(runs.c.parent_step_id == parent_step_id)
    return list((await session.execute(stmt)).scalars())


async def stalled_parents(session: AsyncSession, *, older_than: datetime, limit: int) -> list[tuple[str, str]]:
    """Subflow/foreach steps still waiting although a child ended a while ago (its message was lost)."""
    child = runs.alias("child")
    stmt = (
        select(step_runs.c.run_id, step_runs.c.step_id)
        .join(child, (child.c.parent_run_id == step_runs.c.run_id) & (child.c.parent_step_id == step_runs.c.step_id))
        .where(
            step_runs.c.status == "waiting",
            step_runs.c.type.in_(types_that_run("children")),
            child.c.status.not_in(OPEN),
            child.c.updated_at < older_than,
        )
        .distinct()
        .limit(limit)
    )
    return [(r.run_id, r.step_id) for r in (await session.execute(stmt)).all()]


async def waiting_for(session: AsyncSession, *, key: str) -> list[tuple[str, str, int]]:
    """Steps waiting for an event with this subject key: ``(run_id, step_id, attempt)``."""
    stmt = select(step_runs.c.run_id, step_runs.c.step_id, step_runs.c.attempt).where(
        step_runs.c.wait_for == key, step_runs.c.status == "waiting"
    )
    return [(r.run_id, r.step_id, r.attempt) for r in (await session.execute(stmt)).all()]


async def unpublished_events(session: AsyncSession, *, older_than: datetime, limit: int) -> list[RunEvent]:
    """Events a crash kept from JetStream (the runs' ``published_seq`` lags), oldest first."""
    stmt = (
        select(run_events, runs.c.tenant_id, runs.c.flow_id, runs.c.version)
        .join(runs, runs.c.id == run_events.c.run_id)
        .where(
            runs.c.published_seq < runs.c.last_seq,
            runs.c.updated_at < older_than,
            run_events.c.seq > runs.c.published_seq,
        )
        .order_by(run_events.c.run_id, run_events.c.seq)
        .limit(limit)
    )
    return [RunEvent(**r) for r in (await session.execute(stmt)).mappings()]


async def stalled_work(
    session: AsyncSession, *, run_older_than: datetime, step_older_than: datetime, lease_ended: datetime, limit: int
) -> list[tuple[str, str | None, int]]:
    """Work whose message may be lost: queued runs, and dispatched steps nobody finished (a step a
    worker executes in its own process: when its lease ended before ``lease_ended``).

    Returns ``(run_id, step_id or None, retry_count)``; re-sending is safe (recording is guarded).
    """
    queued = select(runs.c.id, runs.c.retry_count).where(runs.c.status == "queued", runs.c.updated_at < run_older_than)
    found: list[tuple[str, str | None, int]] = [
        (r.id, None, r.retry_count) for r in (await session.execute(queued.limit(limit))).all()
    ]
    stalled = and_(step_runs.c.lease_until.is_(None), step_runs.c.updated_at < step_older_than)
    steps = (
        select(step_runs.c.run_id, step_runs.c.step_id, runs.c.retry_count)
        .join(runs, runs.c.id == step_runs.c.run_id)
        .where(
            step_runs.c.status.in_(("running", "pending")),
            or_(stalled, step_runs.c.lease_until < lease_ended),
            runs.c.status.in_(("running", "waiting")),
        )
        .limit(limit)
    )
    found += [(r.run_id, r.step_id, r.retry_count) for r in (await session.execute(steps)).all()]
    return found


async def extend_lease(conn: Any, *, run_id: str, step_id: str, attempt: int, until: datetime) -> None:
    """Keep answering for a step's running attempt (one with a lease) until ``until``."""
    await conn.execute(
        "UPDATE runner.step_runs SET lease_until = $4 WHERE run_id = $1 AND step_id = $2 AND attempt = $3 "
        "AND status = 'running' AND lease_until IS NOT NULL",
        run_id,
        step_id,
        attempt,
        until,
    )


async def overdue(session: AsyncSession, *, before: datetime, limit: int) -> list[Deadline]:
    """Deadlines of open runs and open step attempts that passed before ``before`` (their timer was lost)."""
    run_stmt = (
        select(runs.c.id, runs.c.retry_count)
        .where(runs.c.deadline_at.is_not(None), runs.c.status.in_(OPEN), runs.c.deadline_at < before)
        .order_by(runs.c.deadline_at)
        .limit(limit)
    )
    found = [Deadline(r.id, r.retry_count) for r in (await session.execute(run_stmt)).all()]
    step_stmt = (
        select(step_runs.c.run_id, step_runs.c.step_id, step_runs.c.attempt, runs.c.retry_count)
        .join(runs, runs.c.id == step_runs.c.run_id)
        .where(
            step_runs.c.deadline_at.is_not(None),
            step_runs.c.status.in_(("running", "waiting")),
            step_runs.c.deadline_at < before,
            runs.c.status.in_(OPEN),
        )
        .order_by(step_runs.c.deadline_at)
        .limit(limit)
    )
    found += [Deadline(r.run_id, r.retry_count, r.step_id, r.attempt) for r in (await session.execute(step_stmt)).all()]
    return found


# --- event triggers ----------------------------------------------------------------------------


async def put_event_trigger(
    session: AsyncSession, *, trigger_id: str, tenant: str, flow_id: str, key: str, filter_: str | None, enabled: bool
) -> None:
    """Record (or update) an event trigger."""
    stmt = insert(event_triggers).values(
        trigger_id=trigger_id, tenant_id=tenant, flow_id=flow_id, key=key, filter=filter_, enabled=enabled
    )
    await session.execute(
        stmt.on_conflict_do_update(
            index_elements=[event_triggers.c.trigger_id],
            set_={"key": stmt.excluded.key, "filter": stmt.excluded.filter, "enabled": stmt.excluded.enabled},
        )
    )


async def drop_event_triggers(
    session: AsyncSession, *, trigger_id: str | None = None, flow_id: str | None = None
) -> None:
    """Forget one event trigger, or all of a flow's."""
    stmt = event_triggers.delete()
    if trigger_id is not None:
        stmt = stmt.where(event_triggers.c.trigger_id == trigger_id)
    if flow_id is not None:
        stmt = stmt.where(event_triggers.c.flow_id == flow_id)
    await session.execute(stmt)


async def event_triggers_for(session: AsyncSession, *, key: str) -> list[RowMapping]:
    """Enabled event triggers listening to an event key."""
    stmt = select(event_triggers).where(event_triggers.c.key == key, event_triggers.c.enabled.is_(True))
    return list((await session.execute(stmt)).mappings())


KEYED_PLANS: Final = {"enable_seqscan": "off", "enable_hashjoin": "off", "enable_mergejoin": "off"}
"""Planner settings of the runner's driver pool, whose statements all find runs and steps by key.

The held-change batch (:func:`save_changes`) and the published-events flush join an array of run
ids to ``runs``. Prepared once per connection, their generic plan was made from the statistics of
the moment: on a young or fast-growing table (a fresh install; thousands of runs a minute, between
two autovacuum analyses) PostgreSQL chose a hash join over a sequential scan of every run for each
batch of five, whose cost grew with the table (1.6 ms and ~490 buffers a statement after 3,000
runs, and a throughput falling round after round). With these, every such join is index lookups
whatever the statistics say; a statement with no index to use still runs (as a scan).
"""


async def open_pool(url: str, *, size: int) -> asyncpg.Pool:
    """The runner's driver pool: its hot path's statements, planned as keyed lookups (:data:`KEYED_PLANS`)."""
    return await create_driver_pool(url, size=size, application_name="runner", settings=KEYED_PLANS)
