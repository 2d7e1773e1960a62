"""``/api/v1/audit``: the audit log, merged from the services that record it (flows, usage)."""

from __future__ import annotations

import asyncio
from typing import Final

from aiohttp import web

from flowmesh.contracts.errors import Forbidden
from flowmesh.contracts.models.audit import AuditCursor, AuditEntries, AuditEntry, AuditPage, AuditQuery, AuditRead
from flowmesh.contracts.subjects import FlowsOp, UsageOp
from flowmesh.gateway import keys
from flowmesh.gateway.body import read_query
from flowmesh.gateway.openapi.operation import Operation
from flowmesh.gateway.routes.common import call, json_response

routes = web.RouteTableDef()

SOURCES: Final = (FlowsOp.AUDIT, UsageOp.AUDIT)
"""The services that keep an audit table; each keeps the entries of the changes it owns."""


def merge(pages: list[list[AuditEntry]], page_size: int) -> AuditPage:
    """One page from the services' pages, newest first by (``at``, ``id``).

    Each service was asked for ``page_size + 1`` entries after the same cursor, so the first
    ``page_size`` of the merge are exactly the next entries of the whole log, and whether any
    service had more says whether there is a next page.
    """
    merged = sorted((e for page in pages for e in page), key=lambda e: (e.at, e.id), reverse=True)
    items = merged[:page_size]
    more = len(merged) > page_size
    next_ = AuditCursor(at=items[-1].at, id=items[-1].id).encode() if more else None
    return AuditPage(items=items, page_size=page_size, next=next_)


@routes.get("/api/v1/audit")
@Operation(
    "listAudit",
    "The audit log: who changed what, newest first",
    tag="audit",
    responses={200: AuditPage},
    errors=(403,),
    notes={403: "`tenantId` names another tenant and the token's role is not `admin`."},
    description=(
        "Every creation, change, publication, rollback, deletion, activation and deactivation of flows and "
        "triggers, every provider key stored or removed, every plan change and every secret stored or removed, "
        "each recorded in the transaction of the change (a refused change records nothing). `actor` is the `sub` "
        "of the token that made it; `details` never holds a secret or a key. Entries are kept for ever and "
        "cannot be changed. Pages are newest first: pass a page's `next` as `cursor` for the one after "
        "(absent on the last page). A platform admin (`role: admin`) sees every tenant's entries, or one "
        "tenant's with `tenantId`; anyone else sees their own tenant's only."
    ),
    query=AuditQuery,
)
async def list_audit(request: web.Request) -> web.Response:
    """The audit log of the caller's tenant (every tenant's for a platform admin), newest first."""
    q = read_query(request, AuditQuery)
    principal = request[keys.PRINCIPAL]
    if q.tenant_id is not None and q.tenant_id != principal.tenant and not principal.is_admin:
        raise Forbidden("only a platform admin (role admin) may read another tenant's audit log")
    read = AuditRead(
        tenant_id=q.tenant_id,
        action=q.action,
        target_id=q.target_id,
        since=q.since,
        until=q.until,
        before=AuditCursor.decode(q.cursor) if q.cursor else None,
        limit=q.page_size + 1,
    )
    replies = await asyncio.gather(*(call(request, op, read) for op in SOURCES))
    page = merge([AuditEntries.model_validate(r).items for r in replies], q.page_size)
    return json_response(page.wire(exclude_none=True))
