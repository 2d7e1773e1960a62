"""Request/reply handlers of ``fm.rpc.flows.*``: parse the contract model, call domain and repo."""

from __future__ import annotations

from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from flowmesh.contracts.errors import Conflict, NotFound
from flowmesh.contracts.ids import is_uuid, new_id, utcnow
from flowmesh.contracts.models import (
    Flow,
    FlowCreate,
    FlowDeleteRequest,
    FlowListQuery,
    FlowPatchRequest,
    FlowRef,
    FlowReplaceRequest,
    FlowUpdate,
    Page,
)
from flowmesh.contracts.subjects import FlowsOp
from flowmesh.flows import domain, repo
from flowmesh.runtime.rpc import RpcContext, RpcServer


async def _locked(session: AsyncSession, ctx: RpcContext, flow_id: str) -> Flow:
    flow = None
    if is_uuid(flow_id):
        flow = await repo.get_flow(session, tenant=ctx.tenant, flow_id=flow_id, for_update=True)
    if flow is None:
        raise NotFound(f"flow {flow_id} not found")
    return flow


def register(rpc: RpcServer, sessions: async_sessionmaker[AsyncSession]) -> None:
    """Serve every flows operation on ``rpc``, with sessions from ``sessions``."""

    @rpc.handler(FlowsOp.CREATE)
    async def create(ctx: RpcContext, body: Any) -> Flow:
        flow = FlowCreate.model_validate(body)
        async with sessions.begin() as s:
            return await repo.insert_flow(
                s, flow_id=new_id(), tenant=ctx.tenant, values=domain.draft_values(flow), now=utcnow()
            )

    @rpc.handler(FlowsOp.LIST)
    async def list_(ctx: RpcContext, body: Any) -> Page[Any]:
        q = FlowListQuery.model_validate(body)
        async with sessions() as s:
            items, total = await repo.list_flows(
                s, tenant=ctx.tenant, status=q.status, q=q.q, offset=q.offset, limit=q.page_size
            )
        return Page(
            items=items, total=total, page=q.page, page_size=q.page_size, has_more=q.offset + len(items) < total
        )

    @rpc.handler(FlowsOp.GET)
    async def get(ctx: RpcContext, body: Any) -> Flow:
        ref = FlowRef.model_validate(body)
        async with sessions() as s:
            flow = await repo.get_flow(s, tenant=ctx.tenant, flow_id=ref.flow_id) if is_uuid(ref.flow_id) else None
        if flow is None:
            raise NotFound(f"flow {ref.flow_id} not found")
        return flow

    @rpc.handler(FlowsOp.UPDATE)
    async def update(ctx: RpcContext, body: Any) -> Flow:
        req = FlowPatchRequest.model_validate(body)
        values = domain.patch_values(FlowUpdate.model_validate(req.patch))
        async with sessions.begin() as s:
            flow = await _locked(s, ctx, req.flow_id)
            domain.check_if_match(req.if_match, flow.revision)
            if not values:
                return flow
            return await repo.update_flow(s, tenant=ctx.tenant, flow_id=flow.id, values=values, now=utcnow())

    @rpc.handler(FlowsOp.REPLACE)
    async def replace(ctx: RpcContext, body: Any) -> Flow:
        req = FlowReplaceRequest.model_validate(body)
        async with sessions.begin() as s:
            flow = await _locked(s, ctx, req.flow_id)
            domain.check_if_match(req.if_match, flow.revision)
            return await repo.update_flow(
                s, tenant=ctx.tenant, flow_id=flow.id, values=domain.draft_values(req.flow), now=utcnow()
            )

    @rpc.handler(FlowsOp.DELETE)
    async def delete(ctx: RpcContext, body: Any) -> None:
        req = FlowDeleteRequest.model_validate(body)
        async with sessions.begin() as s:
            flow = await _locked(s, ctx, req.flow_id)
            domain.check_if_match(req.if_match, flow.revision)
            if flow.latest_version is not None and not req.force:
                raise Conflict(
                    f"flow {flow.id} has published versions; deactivate it, or delete with ?force=true "
                    "(keeps its run history)"
                )
            await repo.delete_flow(s, tenant=ctx.tenant, flow_id=flow.id, now=utcnow())
