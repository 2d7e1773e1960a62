"""Every SQL statement of the flows service. Every query filters by tenant."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncSession

from flowmesh.contracts.models import Flow, FlowSummary
from flowmesh.flows.domain import status_of
from flowmesh.flows.tables import flows

_SUMMARY_COLUMNS = [c for c in flows.c if c.name not in ("definition", "input_schema", "settings", "deleted_at")]


def _summary_fields(row: RowMapping) -> dict[str, Any]:
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


async def get_flow(session: AsyncSession, *, tenant: str, flow_id: str, for_update: bool = False) -> Flow | None:
    """A live (not deleted) flow of the tenant, optionally locked for the rest of the transaction."""
    stmt = select(flows).where(flows.c.id == flow_id, flows.c.tenant_id == tenant, flows.c.deleted_at.is_(None))
    if for_update:
        stmt = stmt.with_for_update()
    row = (await session.execute(stmt)).mappings().one_or_none()
    return None if row is None else _flow(row)


async def list_flows(
    session: AsyncSession, *, tenant: str, status: str | None, q: str | None, offset: int, limit: int
) -> tuple[list[FlowSummary], int]:
    """One page of the tenant's flows, newest update first, and the total matching."""
    where = [flows.c.tenant_id == tenant, flows.c.deleted_at.is_(None)]
    if status == "draft":
        where.append(flows.c.latest_version.is_(None))
    elif status == "published":
        where.append(flows.c.latest_version.is_not(None))
    if q:
        escaped = q.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        where.append(flows.c.name.ilike(f"%{escaped}%", escape="\\"))
    page = (
        select(*_SUMMARY_COLUMNS)
        .where(*where)
        .order_by(flows.c.updated_at.desc(), flows.c.id.desc())
        .offset(offset)
        .limit(limit)
    )
    rows = (await session.execute(page)).mappings().all()
    total = (await session.execute(select(func.count()).select_from(flows).where(*where))).scalar_one()
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
