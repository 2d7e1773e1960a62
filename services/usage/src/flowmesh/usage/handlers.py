"""Request/reply handlers of ``fm.rpc.usage.*``, and the handler of batches of run events."""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import orjson
from nats.aio.msg import Msg
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from flowmesh.contracts.errors import Forbidden, InvalidInput, NotFound
from flowmesh.contracts.ids import is_uuid, utcnow
from flowmesh.contracts.models import FieldError
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
    RevealKey,
    TenantPlan,
    TenantQuota,
    UsageExport,
    UsageExportCsv,
    UsageExportQuery,
    UsageQuery,
    UsageSummary,
)
from flowmesh.contracts.subjects import UsageOp
from flowmesh.runtime.rpc import RpcContext, RpcServer
from flowmesh.usage import domain, repo
from flowmesh.usage.consumer import Handler
from flowmesh.usage.keys import KeyStore
from flowmesh.usage.meter import Meter
from flowmesh.usage.quota import PlanBook, QuotaSnapshots

log = logging.getLogger(__name__)


def register(
    rpc: RpcServer,
    sessions: async_sessionmaker[AsyncSession],
    *,
    plans: PlanBook,
    snapshots: QuotaSnapshots,
    keys: KeyStore,
) -> None:
    """Serve every usage operation."""

    # --- plans and quotas ---------------------------------------------------------------------------

    @rpc.handler(UsageOp.PLAN)
    async def plan(ctx: RpcContext, _: Any) -> AssignedPlan:
        async with sessions() as s:
            found, revision = (await plans.assignments(s, [ctx.tenant]))[ctx.tenant]
        return AssignedPlan(tenant_id=ctx.tenant, plan=found.name, assigned=revision > 0)

    @rpc.handler(UsageOp.PLAN_SET)
    async def plan_set(ctx: RpcContext, body: Any) -> TenantPlan:
        if ctx.role != "admin":
            raise Forbidden("only a platform admin (role admin) may change a tenant's plan")
        req = PlanRef.model_validate(body)
        if req.plan not in await plans.plans():
            known = ", ".join(sorted(await plans.plans()))
            raise InvalidInput(
                f"unknown plan {req.plan!r}; plans are {known}",
                errors=[FieldError(path="/plan", message=f"must be one of {known}")],
            )
        async with sessions.begin() as s:
            await repo.set_plan(s, tenant=req.tenant_id, plan=req.plan, now=utcnow())
            quotas = await plans.quotas(s, [req.tenant_id])
        try:
            await snapshots.write(quotas)
        except Exception as exc:  # the database has it; the next metered batch or change writes it again
            log.warning("the quota snapshot of tenant %r was not updated: %s", req.tenant_id, exc)
        log.info("tenant %r is now on plan %s (by %r)", req.tenant_id, req.plan, ctx.subject)
        return TenantPlan(tenant_id=req.tenant_id, plan=req.plan)

    @rpc.handler(UsageOp.QUOTA)
    async def quota(ctx: RpcContext, _: Any) -> TenantQuota:
        async with sessions() as s:
            return (await plans.quotas(s, [ctx.tenant]))[0]

    # --- reads ----------------------------------------------------------------------------------------

    @rpc.handler(UsageOp.SUMMARY)
    async def summary(ctx: RpcContext, body: Any) -> UsageSummary:
        now = utcnow()
        period = domain.period_of(UsageQuery.model_validate(body).period, now)
        async with sessions() as s:
            counts = await repo.month_counts(s, tenant=ctx.tenant, month=period.month)
            assigned = await plans.assignments(s, [ctx.tenant])
        return domain.summary(assigned[ctx.tenant][0], period, counts, now)

    @rpc.handler(UsageOp.EXPORT)
    async def export(ctx: RpcContext, body: Any) -> UsageExport | UsageExportCsv:
        q = UsageExportQuery.model_validate(body)
        first, last = domain.export_range(q.from_, q.to, utcnow().date())
        async with sessions() as s:
            days = await repo.daily_usage(s, tenant=ctx.tenant, first=first, last=last)
        if q.format == "csv":
            return UsageExportCsv(csv=domain.render_csv(days))
        return UsageExport(tenant_id=ctx.tenant, from_=first, to=last, items=days)

    @rpc.handler(UsageOp.FLOW_STATS)
    async def flow_stats(ctx: RpcContext, body: Any) -> FlowStats:
        flow_id = FlowStatsRequest.model_validate(body).flow_id
        if not is_uuid(flow_id):
            raise NotFound(f"flow {flow_id} not found")
        async with sessions() as s:
            return await repo.flow_stats(s, tenant=ctx.tenant, flow_id=flow_id)

    # --- keys -----------------------------------------------------------------------------------------

    @rpc.handler(UsageOp.KEYS_LIST)
    async def keys_list(ctx: RpcContext, _: Any) -> ApiKeyList:
        return ApiKeyList(items=await keys.list(ctx.tenant))

    @rpc.handler(UsageOp.KEYS_PUT)
    async def keys_put(ctx: RpcContext, body: Any) -> ApiKeyInfo:
        req = ApiKeyCreate.model_validate(body)
        return await keys.put(ctx.tenant, req.provider, req.api_key)

    @rpc.handler(UsageOp.KEYS_DELETE)
    async def keys_delete(ctx: RpcContext, body: Any) -> dict[str, bool]:
        await keys.delete(ctx.tenant, ApiKeyRef.model_validate(body).provider)
        return {"deleted": True}

    @rpc.handler(UsageOp.KEYS_REVEAL)
    async def keys_reveal(ctx: RpcContext, body: Any) -> RevealedKey:
        if ctx.role != KEYS_REVEAL_ROLE:
            log.warning("refused to reveal a key to a caller with role %r (tenant %r)", ctx.role, ctx.tenant)
            raise Forbidden("only the runner may read a stored key")
        provider = domain.provider_name(RevealKey.model_validate(body).provider)
        return RevealedKey(provider=provider, api_key=await keys.reveal(ctx.tenant, provider))


def metering(meter: Meter) -> Handler:
    """The handler of batches of run events: metered in one transaction, acknowledged after it committed."""

    async def handle(msgs: list[Msg]) -> None:
        payloads: list[Any] = []
        for m in msgs:
            if not m.subject.endswith(domain.METERED_SUFFIXES):
                continue  # started, waiting, retrying, skipped …: they count for nothing
            try:
                payloads.append(orjson.loads(m.data))
            except orjson.JSONDecodeError:
                payloads.append(None)  # counted as malformed, acknowledged with the rest
        try:
            await meter.meter(payloads)
        except Exception:
            log.exception("metering a batch of %d run events failed; it will be redelivered", len(msgs))
            for m in msgs:
                with contextlib.suppress(Exception):
                    await m.nak(delay=1.0)
            return
        for m in msgs:
            await m.ack()

    return handle
