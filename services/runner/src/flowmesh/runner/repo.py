"""Every SQL statement of the runner. Reads for clients filter by tenant.

Two pools run them. The runner's driver pool (:func:`open_pool`) has no codecs (JSON travels as
text, UUIDs come back as :class:`uuid.UUID` unless cast to text): a run's start and every change,
the reads of the runs the engine changes, and the API's runs. The service's own pool
(:class:`flowmesh.runtime.db.Database`: JSON as Python values, UUIDs as text) runs the rest: the
API's pages of steps and events, the sweep, child runs and event triggers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, Final

import asyncpg
import orjson

from flowmesh.contracts.ids import format_time, new_id
from flowmesh.contracts.models import Run, RunEvent, StepRun
from flowmesh.contracts.models.rpc import RunListQuery
from flowmesh.contracts.steps import types_that_run
from flowmesh.runner.engine import Child, Deadline, RunRecord, RunState
from flowmesh.runner.graph import StepState
from flowmesh.runtime.db import Connection, Params, create_driver_pool, read_page_on, where

# The columns of the runner's tables as its migrations make them, with their PostgreSQL types (for
# the casts of the statements below). The statements that write whole rows take their column lists
# from here: a column a migration adds is declared here too, or test_repo_columns fails.
_TIME = "timestamp with time zone"
_RUNS: Final = {
    "id": "uuid",
    "tenant_id": "text",
    "flow_id": "uuid",
    "version": "integer",
    "status": "text",
    "trigger_type": "text",
    "trigger_id": "text",
    "input": "jsonb",
    "output": "jsonb",
    "error": "jsonb",
    "idempotency_key": "text",
    "input_hash": "text",
    "parent_run_id": "uuid",
    "parent_step_id": "text",
    "parent_index": "integer",
    "retry_of": "uuid",
    "retry_count": "integer",
    "created_at": _TIME,
    "started_at": _TIME,
    "completed_at": _TIME,
    "updated_at": _TIME,
    "last_seq": "integer",
    "published_seq": "integer",
    "deadline_at": _TIME,
    "traceparent": "text",
    "revision": "bigint",
}
_STEP_RUNS: Final = {
    "run_id": "uuid",
    "step_id": "text",
    "type": "text",
    "status": "text",
    "handle": "text",
    "handled": "boolean",
    "attempt": "integer",
    "input": "jsonb",
    "output": "jsonb",
    "error": "jsonb",
    "started_at": _TIME,
    "completed_at": _TIME,
    "duration_ms": "integer",
    "next_attempt_at": _TIME,
    "updated_at": _TIME,
    "wait_for": "text",
    "deadline_at": _TIME,
    # a step executed by the worker that made it ready, with no work message: until when that worker
    # answers for it (extended while the attempt runs; the sweep re-sends the step's work after it)
    "lease_until": _TIME,
}
_RUN_EVENTS: Final = {
    "run_id": "uuid",
    "seq": "integer",
    "id": "uuid",
    "type": "text",
    "ts": _TIME,
    "step_id": "text",
    "attempt": "integer",
    "data": "jsonb",
}

_STEP_FIELDS: tuple[str, ...] = tuple(f for f in StepState.__slots__ if f in _STEP_RUNS)
"""The step columns the engine's :class:`StepState` carries (all of them but the keys and derived ones)."""
_EVENT_COLUMNS: tuple[str, ...] = tuple(_RUN_EVENTS)


# --- runs ----------------------------------------------------------------------------------------


def _run(row: Mapping[str, Any] | asyncpg.Record) -> Run:
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


# --- the change path, on the driver connection -----------------------------------------------------
#
# Every change of a run (a step's result, a timer, an event, a decision) is one transaction of four
# round trips: BEGIN, the run locked with its steps, one statement writing everything, COMMIT.

_RECORD_FIELDS: tuple[str, ...] = tuple(f for f in RunRecord.__dataclass_fields__ if f in _RUNS)
_JSON_RUN_FIELDS = frozenset(f for f in _RECORD_FIELDS if _RUNS[f] == "jsonb")


def _select_list(table: Mapping[str, str], columns: tuple[str, ...], alias: str) -> str:
    """Columns as the engine wants them: UUIDs as text (asyncpg would make ``uuid.UUID`` of them)."""
    return ", ".join(f"{alias}.{c}::text AS {c}" if table[c] == "uuid" else f"{alias}.{c}" for c in columns)


_READ_RUN_SQL = f"SELECT {_select_list(_RUNS, _RECORD_FIELDS, 'r')} FROM runner.runs AS r WHERE r.id = $1"
_LOCK_RUN_SQL = _READ_RUN_SQL + " FOR UPDATE"
_LOCK_TENANT_RUN_SQL = (
    f"SELECT {_select_list(_RUNS, _RECORD_FIELDS, 'r')} FROM runner.runs AS r "
    "WHERE r.id = $1 AND r.tenant_id = $2 FOR UPDATE"
)
_STEPS_SQL = (
    f"SELECT s.step_id, {_select_list(_STEP_RUNS, _STEP_FIELDS, 's')} FROM runner.step_runs AS s WHERE s.run_id = $1"
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


_RUN_FIELDS = tuple(f for f in Run.model_fields if f in _RUNS)
_RUN_JSON = frozenset(f for f in _RUN_FIELDS if _RUNS[f] == "jsonb")
_RUN_SELECT = _select_list(_RUNS, _RUN_FIELDS, "r")
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


_RUN_COLUMNS: tuple[str, ...] = tuple(_RUNS)
_INSERT_RUN_SQL = (
    f"INSERT INTO runner.runs ({', '.join(_RUN_COLUMNS)}) "
    f"VALUES ({', '.join(f'${i}' for i in range(1, len(_RUN_COLUMNS) + 1))}) "
    "ON CONFLICT (tenant_id, flow_id, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING RETURNING id"
)


# a new run, its steps and its events in one statement (one round trip, its own transaction);
# nothing is written when the idempotency key is taken
_N_RUN = len(_RUN_COLUMNS)
_STEP_RECORD = tuple((c, _STEP_RUNS[c]) for c in ("step_id", "type", *_STEP_FIELDS, "duration_ms", "lease_until"))
"""The columns of a step row as :func:`_step_record` gives them (all but ``run_id`` and ``updated_at``)."""
_EVENT_RECORD = tuple((c, t) for c, t in _RUN_EVENTS.items() if c != "run_id")
"""The columns of an event row as :func:`_event_rows` gives them (and ``run_id``)."""


def _unnest(arrays: tuple[tuple[str, str], ...], first: int, alias: str = "x") -> str:
    params = ", ".join(f"${first + i}::{t}[]" for i, (_, t) in enumerate(arrays))
    return f"unnest({params}) AS {alias}({', '.join(c for c, _ in arrays)})"


def _records(columns: tuple[tuple[str, str], ...], param: int, alias: str = "x") -> str:
    """Rows given as one parameter, a JSON array of objects (:func:`_records_json`).

    Steps and events go this way, not as one array a column: asyncpg encodes an array parameter
    element by element in Python (with a type check each), about a third of the runner's time in a
    start's statement; orjson writes the whole batch at once and PostgreSQL reads it in C
    (``jsonb_to_recordset``: a JSONB column of a row is taken as it is, not parsed again).
    """
    return f"jsonb_to_recordset(${param}::jsonb) AS {alias}({', '.join(f'{c} {t}' for c, t in columns)})"


def _records_json(rows: list[dict[str, Any]]) -> str:
    """Rows as the JSON text of :func:`_records`."""
    return orjson.dumps(rows).decode()


def _columns_of(columns: tuple[tuple[str, str], ...], alias: str = "x") -> str:
    return ", ".join(f"{alias}.{c}" for c, _ in columns)


_S = _N_RUN + 1  # the steps (with their leases), then updated_at, then the events
_E = _S + 2
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
        f"steps AS (INSERT INTO runner.step_runs (run_id, {', '.join(c for c, _ in _STEP_RECORD)}, updated_at) "
        f"SELECT $1::uuid, {_columns_of(_STEP_RECORD)}, ${_S + 1}::timestamptz FROM {_records(_STEP_RECORD, _S)} "
        "WHERE EXISTS (SELECT 1 FROM run)), "
        f"events AS (INSERT INTO runner.run_events (run_id, {', '.join(c for c, _ in _EVENT_RECORD)}) "
        f"SELECT $1::uuid, {_columns_of(_EVENT_RECORD)} FROM {_records(_EVENT_RECORD, _E)} "
        "WHERE EXISTS (SELECT 1 FROM run)) "
        "SELECT count(*) FROM run"
    )


_CREATE_RUN_SQL = _create_run_sql(None)
_CREATE_LIMITED_RUN_SQL = _create_run_sql(_E + 1)

_CHANGED_RUN = ("status", "output", "error", "started_at", "completed_at", "last_seq", "deadline_at")
_RUN_ARRAYS = (("id", "uuid"), ("revision", "bigint"), *((c, _RUNS[c]) for c in _CHANGED_RUN))
_BATCH_STEP_RECORD = (("run_id", "uuid"), *_STEP_RECORD)
_BATCH_EVENT_RECORD = (("run_id", "uuid"), *_EVENT_RECORD)


def _save_sql() -> str:
    """One statement writing the changes of several runs: each run's row, changed steps and new events,
    only if that run's revision is still the one its change was made from (always so under the run's
    lock; for a run held in memory, so only if no other change came between). Returns the ids of the
    runs it changed.

    Parameters: ``$1`` the time, then arrays (one element a run): id, revision, the changed columns;
    then the steps with their run's id and leases, and the events with their run's id (each
    :func:`_records`).
    """
    first_run = 2
    steps = first_run + len(_RUN_ARRAYS)
    events = steps + 1
    run_set = ", ".join(f"{c} = i.{c}" for c in _CHANGED_RUN)
    step_columns = ", ".join(c for c, _ in _BATCH_STEP_RECORD)
    updated = ", ".join(f"{c} = EXCLUDED.{c}" for c, _ in _STEP_RECORD[1:])
    return (
        f"WITH run AS (UPDATE runner.runs AS r SET {run_set}, updated_at = $1::timestamptz, "
        f"revision = i.revision + 1 FROM {_unnest(_RUN_ARRAYS, first_run, 'i')} "
        "WHERE r.id = i.id AND r.revision = i.revision RETURNING r.id), "
        f"steps AS (INSERT INTO runner.step_runs ({step_columns}, updated_at) "
        f"SELECT {_columns_of(_BATCH_STEP_RECORD)}, $1::timestamptz FROM {_records(_BATCH_STEP_RECORD, steps)} "
        "WHERE x.run_id IN (SELECT id FROM run) "
        f"ON CONFLICT (run_id, step_id) DO UPDATE SET {updated}, updated_at = EXCLUDED.updated_at), "
        f"events AS (INSERT INTO runner.run_events ({', '.join(c for c, _ in _BATCH_EVENT_RECORD)}) "
        f"SELECT {_columns_of(_BATCH_EVENT_RECORD)} FROM {_records(_BATCH_EVENT_RECORD, events)} "
        "WHERE x.run_id IN (SELECT id FROM run)) "
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
    step_rows: list[dict[str, Any]] = []
    event_rows: list[dict[str, Any]] = []
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
        step_rows += [_step_record(state, step_id, leases, run_id=r.id) for step_id in sorted(state.changed)]
        rows = _event_rows(r, state)
        rows_of.append(rows)
        event_rows += rows
    now = max(state.now for state, _ in changes)
    written = {
        row[0]
        for row in await conn.fetch(
            _SAVE_SQL,
            now,
            *_columns(run_rows, len(_RUN_ARRAYS)),
            _records_json(step_rows),
            _records_json(event_rows),
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
    steps = [_step_record(state, step_id, leases) for step_id in sorted(state.changed)]
    rows = _event_rows(record, state)
    args = (*_run_row(record, values), _records_json(steps), state.now, _records_json(rows))
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
    return tuple(row[c] for c in _RUN_COLUMNS)  # a column of _RUNS with no value here: KeyError


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
    """A JSONB parameter on the driver pool (no codec: JSON text)."""
    return None if value is None else orjson.dumps(value).decode()


_JSON_STEP_FIELDS = frozenset(f for f in _STEP_FIELDS if _STEP_RUNS[f] == "jsonb")


def _step_record(
    state: RunState, step_id: str, leases: dict[str, datetime], *, run_id: str | None = None
) -> dict[str, Any]:
    """A changed step's row (:data:`_STEP_RECORD`, with ``run_id`` when given) for :func:`_records`."""
    step = state.steps[step_id]
    row = {f: getattr(step, f) for f in _STEP_FIELDS}
    row["step_id"] = step_id
    row["type"] = state.graph.steps[step_id].type
    row["duration_ms"] = _duration(step)
    row["lease_until"] = leases.get(step_id)
    if run_id is not None:
        row["run_id"] = run_id
    return row


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


_FORGET_STEPS_SQL = "DELETE FROM runner.step_runs WHERE run_id = $1 AND step_id <> ALL($2::text[])"
_REQUEUE_SQL = (
    "UPDATE runner.runs SET status = 'queued', output = NULL, error = NULL, completed_at = NULL, "
    "retry_count = retry_count + 1, updated_at = $2 WHERE id = $1 RETURNING retry_count"
)


async def reset_for_retry(conn: Connection, *, run_id: str, keep: set[str], now: datetime) -> int:
    """Forget every step of a run but the succeeded ones; returns the new retry count (driver pool,
    in the transaction that holds the run's lock)."""
    await conn.execute(_FORGET_STEPS_SQL, run_id, sorted(keep))
    return int(await conn.fetchval(_REQUEUE_SQL, run_id, now))


# --- reads ---------------------------------------------------------------------------------------
#
# On the service's pool, but for the API's runs (:func:`get_run_on`, :func:`list_runs`): those are
# read on the driver pool, with the engine's column list.

_RUN_BY_KEY_SQL = (
    f"SELECT {', '.join(_RUN_FIELDS)}, input_hash FROM runner.runs "
    "WHERE tenant_id = $1 AND flow_id = $2 AND idempotency_key = $3"
)
_SNAPSHOT_RUN_SQL = f"SELECT {', '.join(_RUN_FIELDS)}, last_seq FROM runner.runs WHERE id = $1 AND tenant_id = $2"
# the status test is literal SQL: a partial index serves only a predicate the planner can prove
_IN_FLIGHT_SQL = "SELECT count(*) FROM runner.runs WHERE parent_run_id IS NULL AND status IN ('queued', 'running')"


async def run_by_key(conn: Connection, *, tenant: str, flow_id: str, key: str) -> tuple[Run, str | None] | None:
    """The run an idempotency key made, and the hash of its input."""
    row = await conn.fetchrow(_RUN_BY_KEY_SQL, tenant, flow_id, key)
    return None if row is None else (_run(row), row["input_hash"])


async def count_in_flight(conn: Connection) -> int:
    """Top-level runs queued or running, every tenant's (an index-only count on ``runs_in_flight``)."""
    return int(await conn.fetchval(_IN_FLIGHT_SQL))


async def read_snapshot(conn: Connection, *, tenant: str, run_id: str) -> tuple[Run, int, list[StepRun]] | None:
    """A run, its last event ``seq`` and its steps, as one consistent read (call it in a repeatable-read
    transaction: nothing committed between the statements is seen by one and not the other)."""
    row = await conn.fetchrow(_SNAPSHOT_RUN_SQL, run_id, tenant)
    if row is None:
        return None
    steps, _ = await list_steps(conn, run_id=run_id, offset=0, limit=10_000)
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


_STEP_RUN_FIELDS = tuple(f for f in StepRun.model_fields if f in _STEP_RUNS)
"""The step columns clients see (:class:`StepRun`): not the handle, the wait, the deadline, the lease."""
_STEP_RUN_COLUMNS = ", ".join(_STEP_RUN_FIELDS)
_EVENT_SELECT = ", ".join((*(f"e.{c}" for c in _EVENT_COLUMNS), "r.tenant_id", "r.flow_id", "r.version"))
"""A run event's columns with its run's, as :class:`RunEvent` has them."""
_EVENT_FIELDS = (*_EVENT_COLUMNS, "tenant_id", "flow_id", "version")


def _event(row: asyncpg.Record) -> RunEvent:
    return RunEvent(**{f: row[f] for f in _EVENT_FIELDS})


async def list_steps(conn: Connection, *, run_id: str, offset: int, limit: int) -> tuple[list[StepRun], int]:
    """A page of a run's steps in the order they started, and how many there are (read in a snapshot)."""
    rows, total = await read_page_on(
        conn,
        columns=_STEP_RUN_COLUMNS,
        source="runner.step_runs WHERE run_id = $1",
        order_by="started_at ASC NULLS LAST, updated_at, step_id",
        args=[run_id],
        offset=offset,
        limit=limit,
    )
    return [StepRun(**{f: r[f] for f in _STEP_RUN_FIELDS}) for r in rows], total


async def list_events(conn: Connection, *, run_id: str, after: int, limit: int) -> tuple[list[RunEvent], int]:
    """A run's first events after ``seq``, in order, and how many there are after it (read in a snapshot)."""
    rows, total = await read_page_on(
        conn,
        columns=_EVENT_SELECT,
        source="runner.run_events AS e JOIN runner.runs AS r ON r.id = e.run_id WHERE e.run_id = $1 AND e.seq > $2",
        order_by="e.seq",
        args=[run_id, after],
        offset=0,
        limit=limit,
    )
    return [_event(r) for r in rows], total


_CHILDREN_SQL = (
    "SELECT id, parent_index, status, output, error FROM runner.runs WHERE parent_run_id = $1 AND parent_step_id = $2"
)
# the key ChildRuns gives: child:{run}:{retry}:{step}:{index}
_COUNT_CHILDREN_SQL = (
    "SELECT count(*) FROM runner.runs WHERE parent_run_id = $1 AND parent_step_id <> $2 "
    "AND starts_with(idempotency_key, $3)"
)
_OPEN_CHILDREN_SQL = (
    "SELECT id FROM runner.runs WHERE parent_run_id = $1 AND status IN ('queued', 'running', 'waiting')"
)
_OPEN_CHILDREN_OF_STEP_SQL = _OPEN_CHILDREN_SQL + " AND parent_step_id = $2"
_STALLED_PARENTS_SQL = (
    "SELECT DISTINCT s.run_id, s.step_id FROM runner.step_runs AS s JOIN runner.runs AS child "
    "ON child.parent_run_id = s.run_id AND child.parent_step_id = s.step_id "
    "WHERE s.status = 'waiting' AND s.type = ANY($1::text[]) "
    "AND child.status NOT IN ('queued', 'running', 'waiting') AND child.updated_at < $2 LIMIT $3"
)
_WAITING_FOR_SQL = "SELECT run_id, step_id, attempt FROM runner.step_runs WHERE wait_for = $1 AND status = 'waiting'"
_UNPUBLISHED_SQL = (
    f"SELECT {_EVENT_SELECT} FROM runner.run_events AS e JOIN runner.runs AS r ON r.id = e.run_id "
    "WHERE r.published_seq < r.last_seq AND r.updated_at < $1 AND e.seq > r.published_seq "
    "ORDER BY e.run_id, e.seq LIMIT $2"
)
_QUEUED_SQL = "SELECT id, retry_count FROM runner.runs WHERE status = 'queued' AND updated_at < $1 LIMIT $2"
_STALLED_STEPS_SQL = (
    "SELECT s.run_id, s.step_id, r.retry_count FROM runner.step_runs AS s JOIN runner.runs AS r ON r.id = s.run_id "
    "WHERE s.status IN ('running', 'pending') "
    "AND ((s.lease_until IS NULL AND s.updated_at < $1) OR s.lease_until < $2) "
    "AND r.status IN ('running', 'waiting') LIMIT $3"
)


async def children(conn: Connection, *, parent_run_id: str, parent_step_id: str) -> list[Child]:
    """The child runs a step started, by element index."""
    return [
        Child(id=r["id"], index=r["parent_index"] or 0, status=r["status"], output=r["output"], error=r["error"])
        for r in await conn.fetch(_CHILDREN_SQL, parent_run_id, parent_step_id)
    ]


async def count_children(conn: Connection, *, parent_run_id: str, retry_count: int, but: str) -> int:
    """The child runs an attempt (``retry_count``) of a run started, except those of step ``but``."""
    return int(await conn.fetchval(_COUNT_CHILDREN_SQL, parent_run_id, but, f"child:{parent_run_id}:{retry_count}:"))


async def open_children(conn: Connection, *, parent_run_id: str, parent_step_id: str | None = None) -> list[str]:
    """Child runs of a run (or of one of its steps) that have not ended."""
    if parent_step_id is None:
        rows = await conn.fetch(_OPEN_CHILDREN_SQL, parent_run_id)
    else:
        rows = await conn.fetch(_OPEN_CHILDREN_OF_STEP_SQL, parent_run_id, parent_step_id)
    return [r["id"] for r in rows]


async def stalled_parents(conn: Connection, *, older_than: datetime, limit: int) -> list[tuple[str, str]]:
    """Subflow/foreach steps still waiting although a child ended a while ago (its message was lost)."""
    rows = await conn.fetch(_STALLED_PARENTS_SQL, list(types_that_run("children")), older_than, limit)
    return [(r["run_id"], r["step_id"]) for r in rows]


async def waiting_for(conn: Connection, *, key: str) -> list[tuple[str, str, int]]:
    """Steps waiting for an event with this subject key: ``(run_id, step_id, attempt)``."""
    return [(r["run_id"], r["step_id"], r["attempt"]) for r in await conn.fetch(_WAITING_FOR_SQL, key)]


async def unpublished_events(conn: Connection, *, older_than: datetime, limit: int) -> list[RunEvent]:
    """Events a crash kept from JetStream (the runs' ``published_seq`` lags), oldest first."""
    return [_event(r) for r in await conn.fetch(_UNPUBLISHED_SQL, older_than, limit)]


async def stalled_work(
    conn: Connection, *, run_older_than: datetime, step_older_than: datetime, lease_ended: datetime, limit: int
) -> list[tuple[str, str | None, int]]:
    """Work whose message may be lost: queued runs, and dispatched steps nobody finished (a step a
    worker executes in its own process: when its lease ended before ``lease_ended``).

    Returns ``(run_id, step_id or None, retry_count)``; re-sending is safe (recording is guarded).
    """
    found: list[tuple[str, str | None, int]] = [
        (r["id"], None, r["retry_count"]) for r in await conn.fetch(_QUEUED_SQL, run_older_than, limit)
    ]
    steps = await conn.fetch(_STALLED_STEPS_SQL, step_older_than, lease_ended, limit)
    found += [(r["run_id"], r["step_id"], r["retry_count"]) for r in steps]
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


_OVERDUE_RUNS_SQL = (
    "SELECT id, retry_count FROM runner.runs WHERE deadline_at IS NOT NULL "
    "AND status IN ('queued', 'running', 'waiting') AND deadline_at < $1 ORDER BY deadline_at LIMIT $2"
)
_OVERDUE_STEPS_SQL = (
    "SELECT s.run_id, s.step_id, s.attempt, r.retry_count FROM runner.step_runs AS s "
    "JOIN runner.runs AS r ON r.id = s.run_id "
    "WHERE s.deadline_at IS NOT NULL AND s.status IN ('running', 'waiting') AND s.deadline_at < $1 "
    "AND r.status IN ('queued', 'running', 'waiting') ORDER BY s.deadline_at LIMIT $2"
)


async def overdue(conn: Connection, *, before: datetime, limit: int) -> list[Deadline]:
    """Deadlines of open runs and open step attempts that passed before ``before`` (their timer was lost)."""
    found = [Deadline(r["id"], r["retry_count"]) for r in await conn.fetch(_OVERDUE_RUNS_SQL, before, limit)]
    steps = await conn.fetch(_OVERDUE_STEPS_SQL, before, limit)
    found += [Deadline(r["run_id"], r["retry_count"], r["step_id"], r["attempt"]) for r in steps]
    return found


# --- event triggers ----------------------------------------------------------------------------


async def put_event_trigger(
    conn: Connection, *, trigger_id: str, tenant: str, flow_id: str, key: str, filter_: str | None, enabled: bool
) -> None:
    """Record (or update) an event trigger."""
    await conn.execute(
        "INSERT INTO runner.event_triggers (trigger_id, tenant_id, flow_id, key, filter, enabled) "
        "VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (trigger_id) "
        "DO UPDATE SET key = EXCLUDED.key, filter = EXCLUDED.filter, enabled = EXCLUDED.enabled",
        trigger_id,
        tenant,
        flow_id,
        key,
        filter_,
        enabled,
    )


async def drop_event_triggers(conn: Connection, *, trigger_id: str | None = None, flow_id: str | None = None) -> None:
    """Forget one event trigger, or all of a flow's."""
    p = Params()
    conditions = []
    if trigger_id is not None:
        conditions.append(f"trigger_id = {p(trigger_id)}")
    if flow_id is not None:
        conditions.append(f"flow_id = {p(flow_id)}")
    await conn.execute(f"DELETE FROM runner.event_triggers {where(conditions)}", *p.values)


async def event_triggers_for(conn: Connection, *, key: str) -> list[asyncpg.Record]:
    """Enabled event triggers listening to an event key."""
    rows: list[asyncpg.Record] = await conn.fetch(
        "SELECT trigger_id, tenant_id, flow_id, key, filter, enabled FROM runner.event_triggers "
        "WHERE key = $1 AND enabled IS true",
        key,
    )
    return rows


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
