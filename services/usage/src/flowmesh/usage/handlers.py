"""Request/reply handlers of ``fm.rpc.usage.*``, and the handler of batches of run events."""

from __future__ import annotations

import logging
from typing import Any

import orjson

from flowmesh.contracts.errors import Forbidden, InvalidInput, NotFound
from flowmesh.contracts.ids import is_uuid, utcnow
from flowmesh.contracts.models import FieldError
from flowmesh.contracts.models.audit import AuditEntries, AuditRead
from flowmesh.contracts.models.usage import (
    KEYS_REVEAL_ROLE,
    ApiKeyCreate,
    ApiKeyInfo,
    ApiKeyList,
    ApiKeyRef,
    AssignedPlan,
    FlowStats,
    FlowStatsRequest,
    PlanRef,
    RevealedKey,
    RevealedSecrets,
    RevealKey,
    RevealSecrets,
    SecretCreate,
    SecretInfo,
    SecretList,
    SecretRef,
    TenantPlan,
    TenantQuota,
    UsageExport,
    UsageExportCsv,
    UsageExportQuery,
    UsageQuery,
    UsageSummary,
)
from flowmesh.contracts.subjects import UsageOp
from flowmesh.runtime import audit as audit_log
from flowmesh.runtime.consumers import Delivery
from flowmesh.runtime.rpc import RpcContext, RpcRouter
from flowmesh.usage import domain, repo
from flowmesh.usage.deps import UsageDeps

log = logging.getLogger(__name__)

router: RpcRouter[UsageDeps] = RpcRouter()
"""Every usage operation; served with the service's :class:`UsageDeps`."""


def _admin_only(ctx: RpcContext) -> None:
    if ctx.role != "admin":
        raise Forbidden("only a platform admin (role admin) may change a tenant's plan")


def _runner_only(ctx: RpcContext) -> None:
    if ctx.role != KEYS_REVEAL_ROLE:
        log.warning("refused to reveal a key to a caller with role %r (tenant %r)", ctx.role, ctx.tenant)
        raise Forbidden("only the runner may read a stored key")


# --- plans and quotas ---------------------------------------------------------------------------


@router.handler(UsageOp.PLAN)
async def plan(_: object, ctx: RpcContext, deps: UsageDeps) -> AssignedPlan:
    async with deps.db.reading() as conn:
        found, revision = (await deps.plans.assignments(conn, [ctx.tenant]))[ctx.tenant]
    return AssignedPlan(tenant_id=ctx.tenant, plan=found.name, assigned=revision > 0, limits=found)


@router.handler(UsageOp.PLAN_SET, guard=_admin_only)
async def plan_set(req: PlanRef, ctx: RpcContext, deps: UsageDeps) -> TenantPlan:
    if req.plan not in await deps.plans.plans():
        known = ", ".join(sorted(await deps.plans.plans()))
        raise InvalidInput(
            f"unknown plan {req.plan!r}; plans are {known}",
            errors=[FieldError(path="/plan", message=f"must be one of {known}")],
        )
    async with deps.db.transaction() as conn:
        previous = await repo.own_plan_locked(conn, tenant=req.tenant_id)
        revision = await repo.set_plan(conn, tenant=req.tenant_id, plan=req.plan, now=utcnow())
        details = {"plan": req.plan, "previousPlan": previous, "revision": revision}
        await repo.audit(
            conn,
            tenant=req.tenant_id,
            actor=ctx.subject,
            action="plan.changed",
            target=("tenant", req.tenant_id),
            details=details,
        )
        quotas = await deps.plans.quotas(conn, [req.tenant_id])
    try:
        await deps.snapshots.write(quotas)
    except Exception as exc:  # the database has it; the next metered batch or change writes it again
        log.warning("the quota snapshot of tenant %r was not updated: %s", req.tenant_id, exc)
    log.info("tenant %r is now on plan %s (by %r)", req.tenant_id, req.plan, ctx.subject)
    return TenantPlan(tenant_id=req.tenant_id, plan=req.plan)


@router.handler(UsageOp.QUOTA)
async def quota(_: object, ctx: RpcContext, deps: UsageDeps) -> TenantQuota:
    async with deps.db.reading() as conn:
        return (await deps.plans.quotas(conn, [ctx.tenant]))[0]


# --- reads ----------------------------------------------------------------------------------------


@router.handler(UsageOp.SUMMARY)
async def summary(q: UsageQuery, ctx: RpcContext, deps: UsageDeps) -> UsageSummary:
    now = utcnow()
    period = domain.period_of(q.period, now)
    async with deps.db.reading() as conn:
        counts = await repo.month_counts(conn, tenant=ctx.tenant, month=period.month)
        assigned = await deps.plans.assignments(conn, [ctx.tenant])
    return domain.summary(assigned[ctx.tenant][0], period, counts, now)


@router.handler(UsageOp.EXPORT)
async def export(q: UsageExportQuery, ctx: RpcContext, deps: UsageDeps) -> UsageExport | UsageExportCsv:
    first, last = domain.export_range(q.from_, q.to, utcnow().date())
    async with deps.db.reading() as conn:
        days = await repo.daily_usage(conn, tenant=ctx.tenant, first=first, last=last)
    if q.format == "csv":
        return UsageExportCsv(csv=domain.render_csv(days))
    return UsageExport(tenant_id=ctx.tenant, from_=first, to=last, items=days)


@router.handler(UsageOp.FLOW_STATS)
async def flow_stats(req: FlowStatsRequest, ctx: RpcContext, deps: UsageDeps) -> FlowStats:
    flow_id = req.flow_id
    if not is_uuid(flow_id):
        raise NotFound(f"flow {flow_id} not found")
    async with deps.db.reading() as conn:
        return await repo.flow_stats(conn, tenant=ctx.tenant, flow_id=flow_id)


# --- keys -----------------------------------------------------------------------------------------


@router.handler(UsageOp.KEYS_LIST)
async def keys_list(_: object, ctx: RpcContext, deps: UsageDeps) -> ApiKeyList:
    return ApiKeyList(items=await deps.keys.list(ctx.tenant))


@router.handler(UsageOp.KEYS_PUT)
async def keys_put(req: ApiKeyCreate, ctx: RpcContext, deps: UsageDeps) -> ApiKeyInfo:
    return await deps.keys.put(ctx.tenant, req.provider, req.api_key, actor=ctx.subject)


@router.handler(UsageOp.KEYS_DELETE)
async def keys_delete(req: ApiKeyRef, ctx: RpcContext, deps: UsageDeps) -> dict[str, bool]:
    await deps.keys.delete(ctx.tenant, req.provider, actor=ctx.subject)
    return {"deleted": True}


@router.handler(UsageOp.KEYS_REVEAL, guard=_runner_only)
async def keys_reveal(req: RevealKey, ctx: RpcContext, deps: UsageDeps) -> RevealedKey:
    provider = domain.provider_name(req.provider)
    return RevealedKey(provider=provider, api_key=await deps.keys.reveal(ctx.tenant, provider))


# --- audit ----------------------------------------------------------------------------------------


@router.handler(UsageOp.AUDIT)
async def audit(q: AuditRead, ctx: RpcContext, deps: UsageDeps) -> AuditEntries:
    async with deps.db.reading() as conn:
        items = await repo.read_audit(conn, tenant=audit_log.scope(tenant=ctx.tenant, role=ctx.role, q=q), q=q)
    return AuditEntries(items=items)


# --- tenant secrets -------------------------------------------------------------------------------


def _runner_only_secrets(ctx: RpcContext) -> None:
    if ctx.role != KEYS_REVEAL_ROLE:
        log.warning("refused to reveal secrets to a caller with role %r (tenant %r)", ctx.role, ctx.tenant)
        raise Forbidden("only the runner may read a stored secret")


@router.handler(UsageOp.SECRETS_LIST)
async def secrets_list(_: object, ctx: RpcContext, deps: UsageDeps) -> SecretList:
    return SecretList(items=await deps.secrets.list(ctx.tenant))


@router.handler(UsageOp.SECRETS_PUT)
async def secrets_put(req: SecretCreate, ctx: RpcContext, deps: UsageDeps) -> SecretInfo:
    return await deps.secrets.put(ctx.tenant, req.name, req.value, actor=ctx.subject)


@router.handler(UsageOp.SECRETS_DELETE)
async def secrets_delete(req: SecretRef, ctx: RpcContext, deps: UsageDeps) -> dict[str, bool]:
    await deps.secrets.delete(ctx.tenant, req.name, actor=ctx.subject)
    return {"deleted": True}


@router.handler(UsageOp.SECRETS_REVEAL, guard=_runner_only_secrets)
async def secrets_reveal(req: RevealSecrets, ctx: RpcContext, deps: UsageDeps) -> RevealedSecrets:
    return await deps.secrets.reveal(ctx.tenant, req.names)


async def meter_batch(batch: list[Delivery], deps: UsageDeps) -> None:
    """Meter a batch of run events in one transaction; the consumer acknowledges them once it committed.

    Raising hands the whole batch back for redelivery: the events are recorded by id, so those
    already counted are not counted twice.
    """
    payloads: list[Any] = []
    for m in batch:
        if not m.subject.endswith(domain.METERED_SUFFIXES):
            continue  # started, waiting, retrying, skipped …: they count for nothing
        try:
            payloads.append(orjson.loads(m.data))
        except orjson.JSONDecodeError:
            payloads.append(None)  # counted as malformed, acknowledged with the rest
    await deps.meter.meter(payloads)
