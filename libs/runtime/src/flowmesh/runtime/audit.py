"""The audit table every service that owns audited changes keeps in its schema, and its two statements.

An entry is written in the transaction of the change it records (:func:`append`, called from the
service's repo), so both commit or neither does. The table is append-only: nothing here updates or
deletes a row, and the migration that creates it adds a trigger refusing ``UPDATE``, ``DELETE`` and
``TRUNCATE``. Reads (:func:`read`) are keyset pages on (``at``, ``id``), newest first, so the gateway
can merge the pages of several services into one consistent order.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Column, DateTime, MetaData, Table, Text, literal, select, tuple_
from sqlalchemy.dialects.postgresql import JSONB, UUID
from sqlalchemy.ext.asyncio import AsyncSession

from flowmesh.contracts.ids import new_id
from flowmesh.contracts.models.audit import ADMIN_ROLE, AuditAction, AuditEntry, AuditRead, AuditTarget, audit_time


def audit_table(metadata: MetaData) -> Table:
    """The ``audit`` table in a service's schema (created by that service's migration)."""
    return Table(
        "audit",
        metadata,
        Column("id", UUID(as_uuid=False), primary_key=True),
        Column("at", DateTime(timezone=True), nullable=False),
        Column("tenant_id", Text, nullable=False),
        Column("actor", Text, nullable=False),
        Column("action", Text, nullable=False),
        Column("target_type", Text, nullable=False),
        Column("target_id", Text, nullable=False),
        Column("target_name", Text),
        Column("details", JSONB, nullable=False),
    )


async def append(
    session: AsyncSession,
    table: Table,
    *,
    tenant: str,
    actor: str,
    action: AuditAction,
    target: AuditTarget,
    details: dict[str, Any] | None = None,
    now: datetime,
) -> AuditEntry:
    """Record one change inside the caller's transaction; the entry as written."""
    entry = AuditEntry(
        id=new_id(),
        at=audit_time(now),
        tenant_id=tenant,
        actor=actor,
        action=action,
        target=target,
        details=details or {},
    )
    await session.execute(
        table.insert().values(
            id=entry.id,
            at=entry.at,
            tenant_id=tenant,
            actor=actor,
            action=action,
            target_type=target.type,
            target_id=target.id,
            target_name=target.name,
            details=entry.details,
        )
    )
    return entry


def scope(*, tenant: str, role: str, q: AuditRead) -> str | None:
    """Whose entries a read may see: the caller's tenant's; for a platform admin, ``q.tenantId``'s, or
    every tenant's (None) without it."""
    return (q.tenant_id or None) if role == ADMIN_ROLE else tenant


async def read(session: AsyncSession, table: Table, *, tenant: str | None, q: AuditRead) -> list[AuditEntry]:
    """Up to ``q.limit`` entries of ``tenant`` (every tenant's when None), newest first, older than ``q.before``."""
    c = table.c
    stmt = select(table).order_by(c.at.desc(), c.id.desc()).limit(q.limit)
    if tenant is not None:
        stmt = stmt.where(c.tenant_id == tenant)
    if q.action is not None:
        stmt = stmt.where(c.action == q.action)
    if q.target_id is not None:
        stmt = stmt.where(c.target_id == q.target_id)
    if q.since is not None:
        stmt = stmt.where(c.at >= q.since)
    if q.until is not None:
        stmt = stmt.where(c.at < q.until)
    if q.before is not None:
        before = tuple_(literal(q.before.at, c.at.type), literal(q.before.id, c.id.type))
        stmt = stmt.where(tuple_(c.at, c.id) < before)
    return [
        AuditEntry(
            id=r["id"],
            at=r["at"],
            tenant_id=r["tenant_id"],
            actor=r["actor"],
            action=r["action"],
            target=AuditTarget(type=r["target_type"], id=r["target_id"], name=r["target_name"]),
            details=r["details"],
        )
        for r in (await session.execute(stmt)).mappings()
    ]
