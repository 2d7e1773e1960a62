"""Every SQL statement of the flows service. Every query filters by tenant."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any, Final

import asyncpg

from flowmesh.contracts.models import Flow, FlowSummary, FlowVersion, Trigger
from flowmesh.contracts.models.audit import AuditAction, AuditEntry, AuditRead, AuditTarget
from flowmesh.contracts.models.schedules import FlowState, ScheduleSource
from flowmesh.flows.domain import status_of
from flowmesh.runtime import audit as audit_log
from flowmesh.runtime.db import Connection, Params, read_page_on, where
from flowmesh.runtime.outbox import enqueue

SCHEMA: Final = "flows"
"""The service's schema: its tables, its outbox and its audit log."""

_SUMMARY_COLUMNS: Final = (
    "id::text AS id, tenant_id, name, description, revision, active, active_version, latest_version, created_at,"
    " updated_at"
)
"""A flow without its documents (definition, input schema, settings): what a list shows. The id is read
as text, not through the pool's UUID codec, which calls Python once a row (20 µs more a 20-row page)."""

_FLOW_CHANGES: Final = frozenset(
    ("name", "description", "definition", "input_schema", "settings", "active", "active_version", "latest_version")
)
"""The columns of a flow :func:`update_flow` may set."""

_TRIGGER_CHANGES: Final = frozenset(("name", "config", "enabled"))
"""The columns of a trigger :func:`update_trigger` may set."""


def _assignments(p: Params, values: Mapping[str, Any], columns: frozenset[str]) -> list[str]:
    """``column = $n`` of each of ``values``, whose names must be among ``columns`` (they are written
    into the statement, their values travel as parameters)."""
    unknown = values.keys() - columns
    if unknown:
        raise ValueError(f"not a column that may change: {', '.join(sorted(unknown))}")
    return [f"{column} = {p(value)}" for column, value in values.items()]


def _summary_fields(row: asyncpg.Record) -> dict[str, Any]:
    return {
        "id": row["id"],
        "tenant_id": row["tenant_id"],
        "name": row["name"],
        "description": row["description"],
        "status": status_of(row["latest_version"]),
        "active": row["active"],
        "active_version": row["active_version"],
        "latest_version": row["latest_version"],
        "revision": row["revision"],
        "created_at": row["created_at"],
        "updated_at": row["updated_at"],
    }


def _flow(row: asyncpg.Record) -> Flow:
    return Flow(
        **_summary_fields(row),
        definition=row["definition"],
        input_schema=row["input_schema"],
        settings=row["settings"],
    )


async def insert_flow(conn: Connection, *, flow_id: str, tenant: str, values: dict[str, Any], now: datetime) -> Flow:
    """Insert a new draft flow (``values``: name, description, definition, input_schema, settings)."""
    row = await conn.fetchrow(
        "INSERT INTO flows.flows (id, tenant_id, name, description, definition, input_schema, settings, revision,"
        " active, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, 1, true, $8, $8) RETURNING *",
        flow_id,
        tenant,
        values["name"],
        values["description"],
        values["definition"],
        values["input_schema"],
        values["settings"],
        now,
    )
    return _flow(row)


async def count_flows_locked(conn: Connection, *, tenant: str) -> int:
    """The tenant's flows (not deleted); other counts of this tenant wait until the transaction ends."""
    await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended($1::text, 0))", "flows.count:" + tenant)
    return int(
        await conn.fetchval("SELECT count(*) FROM flows.flows WHERE tenant_id = $1 AND deleted_at IS NULL", tenant)
    )


_GET_FLOW: Final = "SELECT * FROM flows.flows WHERE id = $1 AND tenant_id = $2 AND deleted_at IS NULL"
_GET_FLOW_LOCKED: Final = _GET_FLOW + " FOR UPDATE"


async def get_flow(conn: Connection, *, tenant: str, flow_id: str, for_update: bool = False) -> Flow | None:
    """A live (not deleted) flow of the tenant, optionally locked for the rest of the transaction."""
    row = await conn.fetchrow(_GET_FLOW_LOCKED if for_update else _GET_FLOW, flow_id, tenant)
    return None if row is None else _flow(row)


async def list_flows(
    conn: Connection, *, tenant: str, status: str | None, q: str | None, offset: int, limit: int
) -> tuple[list[FlowSummary], int]:
    """One page of the tenant's flows, newest update first, and the total matching (one statement)."""
    p = Params()
    conditions = [f"tenant_id = {p(tenant)}", "deleted_at IS NULL"]
    if status == "draft":
        conditions.append("latest_version IS NULL")
    elif status == "published":
        conditions.append("latest_version IS NOT NULL")
    if q:
        escaped = q.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        conditions.append(f"name ILIKE {p('%' + escaped + '%')} ESCAPE '\\'")
    rows, total = await read_page_on(
        conn,
        columns=_SUMMARY_COLUMNS,
        source=f"flows.flows {where(conditions)}",
        order_by="updated_at DESC, id DESC",
        args=p.values,
        offset=offset,
        limit=limit,
    )
    return [FlowSummary(**_summary_fields(r)) for r in rows], total


async def update_flow(conn: Connection, *, tenant: str, flow_id: str, values: dict[str, Any], now: datetime) -> Flow:
    """Apply changes to a flow (already read under lock), bumping its revision."""
    p = Params(flow_id, tenant)
    changes = ["revision = revision + 1", f"updated_at = {p(now)}", *_assignments(p, values, _FLOW_CHANGES)]
    row = await conn.fetchrow(
        f"UPDATE flows.flows SET {', '.join(changes)} WHERE id = $1 AND tenant_id = $2 RETURNING *", *p.values
    )
    return _flow(row)


async def delete_flow(conn: Connection, *, tenant: str, flow_id: str, now: datetime) -> None:
    """Delete a flow from every view, deactivated; its versions stay for the history of its runs."""
    await conn.execute(
        "UPDATE flows.flows SET deleted_at = $3, active = false, revision = revision + 1, updated_at = $3"
        " WHERE id = $1 AND tenant_id = $2",
        flow_id,
        tenant,
        now,
    )


_VERSION_COLUMNS: Final = "flow_id, version, definition, input_schema, settings, created_at"


def _version(row: asyncpg.Record) -> FlowVersion:
    return FlowVersion(
        flow_id=row["flow_id"],
        version=row["version"],
        definition=row["definition"],
        input_schema=row["input_schema"],
        settings=row["settings"],
        created_at=row["created_at"],
    )


async def insert_version(conn: Connection, *, flow: Flow, version: int, now: datetime) -> FlowVersion:
    """Freeze the flow's draft as ``version``."""
    row = await conn.fetchrow(
        "INSERT INTO flows.flow_versions (flow_id, version, tenant_id, definition, input_schema, settings, created_at)"
        f" VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING {_VERSION_COLUMNS}",
        flow.id,
        version,
        flow.tenant_id,
        flow.definition,
        flow.input_schema,
        flow.settings,
        now,
    )
    return _version(row)


async def get_version(conn: Connection, *, tenant: str, flow_id: str, version: int) -> FlowVersion | None:
    """One version of a flow of the tenant."""
    row = await conn.fetchrow(
        f"SELECT {_VERSION_COLUMNS} FROM flows.flow_versions WHERE flow_id = $1 AND tenant_id = $2 AND version = $3",
        flow_id,
        tenant,
        version,
    )
    return None if row is None else _version(row)


async def list_versions(
    conn: Connection, *, tenant: str, flow_id: str, offset: int, limit: int
) -> tuple[list[FlowVersion], int]:
    """A page of a flow's versions, newest first, and how many there are (one statement)."""
    p = Params()
    conditions = [f"flow_id = {p(flow_id)}", f"tenant_id = {p(tenant)}"]
    rows, total = await read_page_on(
        conn,
        columns=_VERSION_COLUMNS,
        source=f"flows.flow_versions {where(conditions)}",
        order_by="version DESC",
        args=p.values,
        offset=offset,
        limit=limit,
    )
    return [_version(r) for r in rows], total


async def published_flow_ids(conn: Connection, *, tenant: str, ids: set[str]) -> set[str]:
    """Which of ``ids`` are live flows of the tenant with a published version."""
    if not ids:
        return set()
    rows = await conn.fetch(
        "SELECT id FROM flows.flows WHERE id = ANY($1::uuid[]) AND tenant_id = $2"
        " AND deleted_at IS NULL AND latest_version IS NOT NULL",
        list(ids),
        tenant,
    )
    return {r["id"] for r in rows}


def _trigger(row: asyncpg.Record) -> Trigger:
    return Trigger(
        id=row["id"],
        flow_id=row["flow_id"],
        type=row["type"],
        name=row["name"],
        config=row["config"],
        enabled=row["enabled"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


async def insert_trigger(
    conn: Connection, *, trigger_id: str, tenant: str, flow_id: str, values: dict[str, Any], now: datetime
) -> Trigger:
    """Add a trigger to a flow (``values``: type, name, config, enabled; a webhook's token_hash and
    signing_secret, when it has them)."""
    row = await conn.fetchrow(
        "INSERT INTO flows.triggers (id, tenant_id, flow_id, type, name, config, enabled, token_hash, signing_secret,"
        " created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $10) RETURNING *",
        trigger_id,
        tenant,
        flow_id,
        values["type"],
        values["name"],
        values["config"],
        values["enabled"],
        values.get("token_hash"),
        values.get("signing_secret"),
        now,
    )
    return _trigger(row)


async def count_triggers(conn: Connection, *, tenant: str, flow_id: str) -> int:
    """How many triggers a flow has."""
    return int(
        await conn.fetchval(
            "SELECT count(*) FROM flows.triggers WHERE tenant_id = $1 AND flow_id = $2", tenant, flow_id
        )
    )


async def list_triggers(conn: Connection, *, tenant: str, flow_id: str) -> list[Trigger]:
    """A flow's triggers, oldest first."""
    rows = await conn.fetch(
        "SELECT * FROM flows.triggers WHERE tenant_id = $1 AND flow_id = $2 ORDER BY created_at, id", tenant, flow_id
    )
    return [_trigger(r) for r in rows]


_GET_TRIGGER: Final = (
    "SELECT t.* FROM flows.triggers t JOIN flows.flows f ON f.id = t.flow_id"
    " WHERE t.id = $1 AND t.tenant_id = $2 AND f.deleted_at IS NULL"
)
_GET_TRIGGER_LOCKED: Final = _GET_TRIGGER + " FOR UPDATE OF t"


async def get_trigger(conn: Connection, *, tenant: str, trigger_id: str, for_update: bool = False) -> Trigger | None:
    """A trigger of a live flow of the tenant."""
    row = await conn.fetchrow(_GET_TRIGGER_LOCKED if for_update else _GET_TRIGGER, trigger_id, tenant)
    return None if row is None else _trigger(row)


async def update_trigger(
    conn: Connection, *, tenant: str, trigger_id: str, values: dict[str, Any], now: datetime
) -> Trigger:
    """Change a trigger."""
    p = Params(trigger_id, tenant)
    changes = [f"updated_at = {p(now)}", *_assignments(p, values, _TRIGGER_CHANGES)]
    row = await conn.fetchrow(
        f"UPDATE flows.triggers SET {', '.join(changes)} WHERE id = $1 AND tenant_id = $2 RETURNING *", *p.values
    )
    return _trigger(row)


async def delete_trigger(conn: Connection, *, tenant: str, trigger_id: str) -> None:
    """Remove a trigger (its token stops working at once)."""
    await conn.execute("DELETE FROM flows.triggers WHERE id = $1 AND tenant_id = $2", trigger_id, tenant)


async def webhook_by_token_hash(conn: Connection, *, token_hash: str) -> tuple[Trigger, asyncpg.Record] | None:
    """The webhook trigger of a token, with its flow's tenant, state and signing secret."""
    row = await conn.fetchrow(
        "SELECT t.*, f.active, f.latest_version, f.deleted_at"
        " FROM flows.triggers t JOIN flows.flows f ON f.id = t.flow_id"
        " WHERE t.token_hash = $1 AND t.type = 'webhook'",
        token_hash,
    )
    return None if row is None else (_trigger(row), row)


async def announce(conn: Connection, *, tenant: str, subject: str, payload: dict[str, Any], msg_id: str) -> None:
    """Queue a flow announcement in the outbox, inside the caller's transaction."""
    await enqueue(conn, SCHEMA, subject=subject, payload=payload, tenant=tenant, msg_id=msg_id)


async def audit(
    conn: Connection,
    *,
    tenant: str,
    actor: str,
    action: AuditAction,
    target: AuditTarget,
    details: dict[str, Any] | None = None,
    now: datetime,
) -> AuditEntry:
    """Record a change in the audit log, inside the caller's transaction (the change's own)."""
    return await audit_log.append(
        conn, SCHEMA, tenant=tenant, actor=actor, action=action, target=target, details=details, now=now
    )


async def read_audit(conn: Connection, *, tenant: str | None, q: AuditRead) -> list[AuditEntry]:
    """A page of audit entries of ``tenant`` (every tenant's when None), newest first."""
    return await audit_log.read(conn, SCHEMA, tenant=tenant, q=q)


def _flow_state(row: asyncpg.Record) -> FlowState:
    return FlowState(
        flow_id=row["flow_id"],
        tenant_id=row["flow_tenant_id"],
        active=row["flow_active"],
        published=row["flow_active_version"] is not None,
        updated_at=row["flow_updated_at"],
    )


_FLOW_STATE_COLUMNS: Final = (
    "f.tenant_id AS flow_tenant_id, f.active AS flow_active, f.active_version AS flow_active_version,"
    " f.updated_at AS flow_updated_at"
)
"""A flow's state beside a row of one of its triggers (whose ``flow_id`` names the flow)."""

_SCHEDULE_SOURCES: Final = (
    f"SELECT t.*, {_FLOW_STATE_COLUMNS} FROM flows.triggers t JOIN flows.flows f ON f.id = t.flow_id"
    " WHERE t.type = 'schedule' AND f.deleted_at IS NULL"
)


async def schedule_sources(
    conn: Connection, *, trigger_ids: list[str] | None, after: str | None, limit: int
) -> list[ScheduleSource]:
    """For the scheduler, across tenants: the schedule triggers of live flows named by ``trigger_ids``,
    or (without ids) a page of all of them in id order after ``after``; each with its flow's state."""
    if trigger_ids is not None:
        if not trigger_ids:
            return []
        rows = await conn.fetch(_SCHEDULE_SOURCES + " AND t.id = ANY($1::uuid[])", trigger_ids)
    elif after is not None:
        rows = await conn.fetch(_SCHEDULE_SOURCES + " AND t.id > $1 ORDER BY t.id LIMIT $2", after, limit)
    else:
        rows = await conn.fetch(_SCHEDULE_SOURCES + " ORDER BY t.id LIMIT $1", limit)
    return [ScheduleSource(trigger=_trigger(r), flow=_flow_state(r)) for r in rows]


async def flow_states(conn: Connection, *, flow_ids: list[str]) -> list[FlowState]:
    """For the scheduler, across tenants: the state of the live flows among ``flow_ids``."""
    if not flow_ids:
        return []
    rows = await conn.fetch(
        "SELECT id AS flow_id, tenant_id AS flow_tenant_id, active AS flow_active,"
        " active_version AS flow_active_version, updated_at AS flow_updated_at"
        " FROM flows.flows WHERE id = ANY($1::uuid[]) AND deleted_at IS NULL",
        flow_ids,
    )
    return [_flow_state(r) for r in rows]
