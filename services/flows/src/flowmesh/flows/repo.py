"""Every SQL statement of the flows service. Every query filters by tenant."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

import asyncpg
from sqlalchemy import delete, func, select, update
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncSession

from flowmesh.contracts.models import Flow, FlowSummary, FlowVersion, Trigger
from flowmesh.contracts.models.audit import AuditAction, AuditEntry, AuditRead, AuditTarget
from flowmesh.contracts.models.schedules import FlowState, ScheduleSource
from flowmesh.flows.domain import status_of
from flowmesh.flows.tables import audit as audit_table
from flowmesh.flows.tables import flow_versions, flows, outbox, triggers
from flowmesh.runtime import audit as audit_log
from flowmesh.runtime.db import read_page, read_page_on
from flowmesh.runtime.outbox import enqueue

_SUMMARY_COLUMNS = [c for c in flows.c if c.name not in ("definition", "input_schema", "settings", "deleted_at")]
# the driver's statements read UUIDs as text (asyncpg would make ``uuid.UUID`` of them)
_SUMMARY_SELECT = ", ".join(f"{c.name}::text AS {c.name}" if c.name == "id" else c.name for c in _SUMMARY_COLUMNS)


def _summary_fields(row: Mapping[Any, Any]) -> dict[str, Any]:
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


def _flow(row: RowMapping) -> Flow:
    return Flow(
        **_summary_fields(row),
        definition=row["definition"],
        input_schema=row["input_schema"],
        settings=row["settings"],
    )


async def insert_flow(
    session: AsyncSession, *, flow_id: str, tenant: str, values: dict[str, Any], now: datetime
) -> Flow:
    """Insert a new draft flow."""
    stmt = (
        flows.insert()
        .values(id=flow_id, tenant_id=tenant, revision=1, active=True, created_at=now, updated_at=now, **values)
        .returning(*flows.c)
    )
    return _flow((await session.execute(stmt)).mappings().one())


async def count_flows_locked(session: AsyncSession, *, tenant: str) -> int:
    """The tenant's flows (not deleted); other counts of this tenant wait until the transaction ends."""
    await session.execute(select(func.pg_advisory_xact_lock(func.hashtextextended("flows.count:" + tenant, 0))))
    stmt = select(func.count()).select_from(flows).where(flows.c.tenant_id == tenant, flows.c.deleted_at.is_(None))
    return int((await session.execute(stmt)).scalar_one())


async def get_flow(session: AsyncSession, *, tenant: str, flow_id: str, for_update: bool = False) -> Flow | None:
    """A live (not deleted) flow of the tenant, optionally locked for the rest of the transaction."""
    stmt = select(flows).where(flows.c.id == flow_id, flows.c.tenant_id == tenant, flows.c.deleted_at.is_(None))
    if for_update:
        stmt = stmt.with_for_update()
    row = (await session.execute(stmt)).mappings().one_or_none()
    return None if row is None else _flow(row)


async def list_flows(
    conn: asyncpg.Pool | asyncpg.Connection, *, tenant: str, status: str | None, q: str | None, offset: int, limit: int
) -> tuple[list[FlowSummary], int]:
    """One page of the tenant's flows, newest update first, and the total matching (driver statements)."""
    where = ["tenant_id = $1", "deleted_at IS NULL"]
    args: list[Any] = [tenant]
    if status == "draft":
        where.append("latest_version IS NULL")
    elif status == "published":
        where.append("latest_version IS NOT NULL")
    if q:
        args.append("%" + q.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%")
        where.append(f"name ILIKE ${len(args)} ESCAPE '\\'")
    rows, total = await read_page_on(
        conn,
        columns=_SUMMARY_SELECT,
        source="flows.flows WHERE " + " AND ".join(where),
        order_by="updated_at DESC, id DESC",
        args=args,
        offset=offset,
        limit=limit,
    )
    return [FlowSummary(**_summary_fields(r)) for r in rows], total


async def update_flow(
    session: AsyncSession, *, tenant: str, flow_id: str, values: dict[str, Any], now: datetime
) -> Flow:
    """Apply changes to a flow (already read under lock), bumping its revision."""
    stmt = (
        update(flows)
        .where(flows.c.id == flow_id, flows.c.tenant_id == tenant)
        .values(revision=flows.c.revision + 1, updated_at=now, **values)
        .returning(*flows.c)
    )
    return _flow((await session.execute(stmt)).mappings().one())


async def delete_flow(session: AsyncSession, *, tenant: str, flow_id: str, now: datetime) -> None:
    """Delete a flow from every view, deactivated; its versions stay for the history of its runs."""
    await session.execute(
        update(flows)
        .where(flows.c.id == flow_id, flows.c.tenant_id == tenant)
        .values(deleted_at=now, active=False, revision=flows.c.revision + 1, updated_at=now)
    )


def _version(row: RowMapping) -> FlowVersion:
    return FlowVersion(
        flow_id=row["flow_id"],
        version=row["version"],
        definition=row["definition"],
        input_schema=row["input_schema"],
        settings=row["settings"],
        created_at=row["created_at"],
    )


async def insert_version(session: AsyncSession, *, flow: Flow, version: int, now: datetime) -> FlowVersion:
    """Freeze the flow's draft as ``version``."""
    stmt = (
        flow_versions.insert()
        .values(
            flow_id=flow.id,
            version=version,
            tenant_id=flow.tenant_id,
            definition=flow.definition,
            input_schema=flow.input_schema,
            settings=flow.settings,
            created_at=now,
        )
        .returning(*flow_versions.c)
    )
    return _version((await session.execute(stmt)).mappings().one())


async def get_version(session: AsyncSession, *, tenant: str, flow_id: str, version: int) -> FlowVersion | None:
    """One version of a flow of the tenant."""
    stmt = select(flow_versions).where(
        flow_versions.c.flow_id == flow_id, flow_versions.c.tenant_id == tenant, flow_versions.c.version == version
    )
    row = (await session.execute(stmt)).mappings().one_or_none()
    return None if row is None else _version(row)


async def list_versions(
    session: AsyncSession, *, tenant: str, flow_id: str, offset: int, limit: int
) -> tuple[list[FlowVersion], int]:
    """A page of a flow's versions, newest first, and how many there are (read in a snapshot)."""
    where = (flow_versions.c.flow_id == flow_id, flow_versions.c.tenant_id == tenant)
    page = select(flow_versions).where(*where).order_by(flow_versions.c.version.desc())
    rows, total = await read_page(session, page, offset=offset, limit=limit)
    return [_version(r) for r in rows], total


async def published_flow_ids(session: AsyncSession, *, tenant: str, ids: set[str]) -> set[str]:
    """Which of ``ids`` are live flows of the tenant with a published version."""
    if not ids:
        return set()
    stmt = select(flows.c.id).where(
        flows.c.id.in_(ids),
        flows.c.tenant_id == tenant,
        flows.c.deleted_at.is_(None),
        flows.c.latest_version.is_not(None),
    )
    return set((await session.execute(stmt)).scalars())


def _trigger(row: RowMapping) -> Trigger:
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
    session: AsyncSession, *, trigger_id: str, tenant: str, flow_id: str, values: dict[str, Any], now: datetime
) -> Trigger:
    """Add a trigger to a flow."""
    stmt = (
        triggers.insert()
        .values(id=trigger_id, tenant_id=tenant, flow_id=flow_id, created_at=now, updated_at=now, **values)
        .returning(*triggers.c)
    )
    return _trigger((await session.execute(stmt)).mappings().one())


async def count_triggers(session: AsyncSession, *, tenant: str, flow_id: str) -> int:
    """How many triggers a flow has."""
    stmt = (
        select(func.count()).select_from(triggers).where(triggers.c.tenant_id == tenant, triggers.c.flow_id == flow_id)
    )
    return int((await session.execute(stmt)).scalar_one())


async def list_triggers(session: AsyncSession, *, tenant: str, flow_id: str) -> list[Trigger]:
    """A flow's triggers, oldest first."""
    stmt = (
        select(triggers)
        .where(triggers.c.tenant_id == tenant, triggers.c.flow_id == flow_id)
        .order_by(triggers.c.created_at, triggers.c.id)
    )
    return [_trigger(r) for r in (await session.execute(stmt)).mappings()]


async def get_trigger(
    session: AsyncSession, *, tenant: str, trigger_id: str, for_update: bool = False
) -> Trigger | None:
    """A trigger of a live flow of the tenant."""
    stmt = (
        select(triggers)
        .join(flows, flows.c.id == triggers.c.flow_id)
        .where(triggers.c.id == trigger_id, triggers.c.tenant_id == tenant, flows.c.deleted_at.is_(None))
    )
    if for_update:
        stmt = stmt.with_for_update(of=triggers)
    row = (await session.execute(stmt)).mappings().one_or_none()
    return None if row is None else _trigger(row)


async def update_trigger(
    session: AsyncSession, *, tenant: str, trigger_id: str, values: dict[str, Any], now: datetime
) -> Trigger:
    """Change a trigger."""
    stmt = (
        update(triggers)
        .where(triggers.c.id == trigger_id, triggers.c.tenant_id == tenant)
        .values(updated_at=now, **values)
        .returning(*triggers.c)
    )
    return _trigger((await session.execute(stmt)).mappings().one())


async def delete_trigger(session: AsyncSession, *, tenant: str, trigger_id: str) -> None:
    """Remove a trigger (its token stops working at once)."""
    await session.execute(delete(triggers).where(triggers.c.id == trigger_id, triggers.c.tenant_id == tenant))


async def webhook_by_token_hash(session: AsyncSession, *, token_hash: str) -> tuple[Trigger, RowMapping] | None:
    """The webhook trigger of a token, with its flow's tenant, state and signing secret."""
    stmt = (
        select(triggers, flows.c.active, flows.c.latest_version, flows.c.deleted_at)
        .join(flows, flows.c.id == triggers.c.flow_id)
        .where(triggers.c.token_hash == token_hash, triggers.c.type == "webhook")
    )
    row = (await session.execute(stmt)).mappings().one_or_none()
    return None if row is None else (_trigger(row), row)


async def announce(session: AsyncSession, *, tenant: str, subject: str, payload: dict[str, Any], msg_id: str) -> None:
    """Queue a flow announcement in the outbox, inside the caller's transaction."""
    await enqueue(session, outbox, subject=subject, payload=payload, tenant=tenant, msg_id=msg_id)


async def audit(
    session: AsyncSession,
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
        session, audit_table, tenant=tenant, actor=actor, action=action, target=target, details=details, now=now
    )


async def read_audit(session: AsyncSession, *, tenant: str | None, q: AuditRead) -> list[AuditEntry]:
    """A page of audit entries of ``tenant`` (every tenant's when None), newest first."""
    return await audit_log.read(session, audit_table, tenant=tenant, q=q)


def _flow_state(row: RowMapping) -> FlowState:
    return FlowState(
        flow_id=row["flow_id"],
        tenant_id=row["flow_tenant_id"],
        active=row["flow_active"],
        published=row["flow_active_version"] is not None,
        updated_at=row["flow_updated_at"],
    )


_FLOW_STATE_COLUMNS = (
    flows.c.id.label("flow_id"),
    flows.c.tenant_id.label("flow_tenant_id"),
    flows.c.active.label("flow_active"),
    flows.c.active_version.label("flow_active_version"),
    flows.c.updated_at.label("flow_updated_at"),
)


async def schedule_sources(
    session: AsyncSession, *, trigger_ids: list[str] | None, after: str | None, limit: int
) -> list[ScheduleSource]:
    """For the scheduler, across tenants: the schedule triggers of live flows named by ``trigger_ids``,
    or (without ids) a page of all of them in id order after ``after``; each with its flow's state."""
    stmt = (
        select(triggers, *_FLOW_STATE_COLUMNS[1:])
        .join(flows, flows.c.id == triggers.c.flow_id)
        .where(triggers.c.type == "schedule", flows.c.deleted_at.is_(None))
    )
    if trigger_ids is not None:
        if not trigger_ids:
            return []
        stmt = stmt.where(triggers.c.id.in_(trigger_ids))
    else:
        if after is not None:
            stmt = stmt.where(triggers.c.id > after)
        stmt = stmt.order_by(triggers.c.id).limit(limit)
    rows = (await session.execute(stmt)).mappings().all()
    return [ScheduleSource(trigger=_trigger(r), flow=_flow_state(r)) for r in rows]


async def flow_states(session: AsyncSession, *, flow_ids: list[str]) -> list[FlowState]:
    """For the scheduler, across tenants: the state of the live flows among ``flow_ids``."""
    if not flow_ids:
        return []
    stmt = select(*_FLOW_STATE_COLUMNS).where(flows.c.id.in_(flow_ids), flows.c.deleted_at.is_(None))
    return [_flow_state(r) for r in (await session.execute(stmt)).mappings()]
