"""A flows handler is a plain function: called here without NATS, with a dependencies object."""

from __future__ import annotations

import uuid

import pytest

from flowmesh.contracts.errors import NotFound
from flowmesh.contracts.models import FlowCreate, FlowListQuery, FlowRef
from flowmesh.flows import handlers, repo
from flowmesh.flows.deps import FlowsDeps
from flowmesh.runtime.outbox import OutboxRelay
from flowmesh.runtime.rpc import RpcContext
from flowmesh.runtime.service import ServiceRuntime


async def test_handlers_are_called_directly_with_their_contract_models(flows_service: ServiceRuntime) -> None:
    deps = FlowsDeps(flows_service.db, OutboxRelay(flows_service.db, repo.SCHEMA))
    ctx = RpcContext(tenant=f"t-{uuid.uuid4().hex[:12]}", role="member", subject="", traceparent=None)
    created = await handlers.create(FlowCreate(name="alone"), ctx, deps)
    got = await handlers.get(FlowRef(flow_id=created.id), ctx, deps)
    assert got.name == "alone" and got.tenant_id == ctx.tenant
    listed = await handlers.list_(FlowListQuery(), ctx, deps)
    assert [f.id for f in listed.items] == [created.id] and listed.total == 1
    with pytest.raises(NotFound):
        await handlers.get(FlowRef(flow_id=str(uuid.uuid4())), ctx, deps)
    catalog = await handlers.catalog(None, ctx, deps)
    assert {item["type"] for item in catalog["items"]} >= {"http"}
