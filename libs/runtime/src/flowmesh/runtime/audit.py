"""The audit table every service that owns audited changes keeps in its schema, and its two statements.

An entry is written in the transaction of the change it records (:func:`append`, called from the
service's repo), so both commit or neither does. The table is append-only: nothing here updates or
deletes a row, and the migration that creates it adds a trigger refusing ``UPDATE``, ``DELETE`` and
``TRUNCATE``. Reads (:func:`read`) are keyset pages on (``at``, ``id``), newest first, so the gateway
can merge the pages of several services into one consistent order.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any

from flowmesh.contracts.ids import new_id
from flowmesh.contracts.models.audit import ADMIN_ROLE, AuditAction, AuditEntry, AuditRead, AuditTarget, audit_time
from flowmesh.runtime.db import Params, where

if TYPE_CHECKING:
    import asyncpg


async def append(
    conn: asyncpg.Connection,
    schema: str,
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
    await conn.execute(
        f"INSERT INTO {schema}.audit (id, at, tenant_id, actor, action, target_type, target_id, target_name, details)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        entry.id,
        entry.at,
        tenant,
        actor,
        action,
        target.type,
        target.id,
        target.name,
        entry.details,
    )
    return entry


def scope(*, tenant: str, role: str, q: AuditRead) -> str | None:
    """Whose entries a read may see: the caller's tenant's; for a platform admin, ``q.tenantId``'s, or
    every tenant's (None) without it."""
    return (q.tenant_id or None) if role == ADMIN_ROLE else tenant


async def read(conn: asyncpg.Connection, schema: str, *, tenant: str | None, q: AuditRead) -> list[AuditEntry]:
    """Up to ``q.limit`` entries of ``tenant`` (every tenant's when None), newest first, older than ``q.before``."""
    p = Params()
    conditions: list[str] = []
    if tenant is not None:
        conditions.append(f"tenant_id = {p(tenant)}")
    if q.action is not None:
        conditions.append(f"action = {p(q.action)}")
    if q.target_id is not None:
        conditions.append(f"target_id = {p(q.target_id)}")
    if q.since is not None:
        conditions.append(f"at >= {p(q.since)}")
    if q.until is not None:
        conditions.append(f"at < {p(q.until)}")
    if q.before is not None:
        conditions.append(f"(at, id) < ({p(q.before.at)}::timestamptz, {p(q.before.id)}::uuid)")
    sql = f"SELECT * FROM {schema}.audit {where(conditions)} ORDER BY at DESC, id DESC LIMIT {p(q.limit)}"
    rows = await conn.fetch(sql, *p.values)
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
        for r in rows
    ]
