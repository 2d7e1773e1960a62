"""The flows service over ``fm.rpc.flows.*`` against real NATS and PostgreSQL."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from flowmesh.contracts.errors import Conflict, InvalidInput, NotFound, PreconditionFailed
from flowmesh.contracts.subjects import FlowsOp
from flowmesh.runtime.rpc import RpcClient
from flowmesh.runtime.service import ServiceRuntime

CANVAS = {
    "nodes": [
        {
            "id": "start",
            "type": "trigger",
            "position": {"x": 0, "y": 0},
            "data": {},
            "width": 120,
            "selected": False,
            "measured": {"width": 120, "height": 40},
        },
        {"id": "t", "type": "transform", "data": {"output": {"v": "{{ input.v }}"}}, "style": {"color": "red"}},
    ],
    "edges": [{"id": "e", "source": "start", "target": "t", "markerEnd": {"type": "arrowclosed"}}],
    "viewport": {"x": 1, "y": 2, "zoom": 1},
}


async def create(rpc: RpcClient, tenant: str, **body: object) -> dict:  # type: ignore[type-arg]
    return await rpc.call(FlowsOp.CREATE, {"name": "flow", **body}, tenant=tenant)  # type: ignore[no-any-return]


async def test_create_then_get_returns_the_draft_with_canvas_keys_unchanged(rpc: RpcClient, tenant: str) -> None:
    flow = await create(rpc, tenant, name="orders", description="d", definition=CANVAS, inputSchema={"type": "object"})
    assert flow["status"] == "draft" and flow["active"] is True and flow["revision"] == 1
    assert flow["activeVersion"] is None and flow["latestVersion"] is None
    got = await rpc.call(FlowsOp.GET, {"flowId": flow["id"]}, tenant=tenant)
    assert got["definition"] == CANVAS
    assert got["inputSchema"] == {"type": "object"}
    assert got["name"] == "orders" and got["tenantId"] == tenant


async def test_list_is_paginated_newest_update_first(rpc: RpcClient, tenant: str) -> None:
    ids = [(await create(rpc, tenant, name=f"f{i}"))["id"] for i in range(5)]
    first = await rpc.call(FlowsOp.LIST, {"page": 1, "pageSize": 2}, tenant=tenant)
    assert first["total"] == 5 and first["hasMore"] is True and first["pageSize"] == 2
    assert [f["id"] for f in first["items"]] == ids[::-1][:2]
    last = await rpc.call(FlowsOp.LIST, {"page": 3, "pageSize": 2}, tenant=tenant)
    assert [f["id"] for f in last["items"]] == [ids[0]] and last["hasMore"] is False
    assert "definition" not in first["items"][0]
    # an update moves a flow to the front
    await rpc.call(FlowsOp.UPDATE, {"flowId": ids[0], "patch": {"description": "new"}}, tenant=tenant)
    again = await rpc.call(FlowsOp.LIST, {"pageSize": 1}, tenant=tenant)
    assert again["items"][0]["id"] == ids[0]


async def test_list_filters_by_name_and_status(rpc: RpcClient, tenant: str) -> None:
    await create(rpc, tenant, name="Invoice sync")
    await create(rpc, tenant, name="100% done")
    await create(rpc, tenant, name="other")
    assert (await rpc.call(FlowsOp.LIST, {"q": "invoice"}, tenant=tenant))["total"] == 1
    assert (await rpc.call(FlowsOp.LIST, {"q": "%"}, tenant=tenant))["total"] == 1
    assert (await rpc.call(FlowsOp.LIST, {"status": "draft"}, tenant=tenant))["total"] == 3
    assert (await rpc.call(FlowsOp.LIST, {"status": "published"}, tenant=tenant))["total"] == 0


async def test_another_tenant_sees_nothing_and_changes_nothing(rpc: RpcClient, tenant: str) -> None:
    flow = await create(rpc, tenant)
    other = tenant + "-other"
    ref = {"flowId": flow["id"]}
    calls = [
        (FlowsOp.GET, ref),
        (FlowsOp.UPDATE, {**ref, "patch": {"name": "stolen"}}),
        (FlowsOp.REPLACE, {**ref, "flow": {"name": "stolen"}}),
        (FlowsOp.DELETE, ref),
    ]
    for subject, body in calls:
        with pytest.raises(NotFound):
            await rpc.call(subject, body, tenant=other)
    assert (await rpc.call(FlowsOp.LIST, {}, tenant=other))["total"] == 0
    assert (await rpc.call(FlowsOp.GET, ref, tenant=tenant))["name"] == "flow"


async def test_if_match_guards_updates(rpc: RpcClient, tenant: str) -> None:
    flow = await create(rpc, tenant)
    ref = {"flowId": flow["id"]}
    updated = await rpc.call(FlowsOp.UPDATE, {**ref, "ifMatch": '"1"', "patch": {"name": "a"}}, tenant=tenant)
    assert updated["revision"] == 2 and updated["name"] == "a"
    with pytest.raises(PreconditionFailed, match='"2"'):
        await rpc.call(FlowsOp.UPDATE, {**ref, "ifMatch": '"1"', "patch": {"name": "b"}}, tenant=tenant)
    with pytest.raises(PreconditionFailed):
        await rpc.call(FlowsOp.REPLACE, {**ref, "ifMatch": 'W/"2"', "flow": {"name": "b"}}, tenant=tenant)
    with pytest.raises(PreconditionFailed):
        await rpc.call(FlowsOp.DELETE, {**ref, "ifMatch": '"9"'}, tenant=tenant)
    star = await rpc.call(FlowsOp.UPDATE, {**ref, "ifMatch": "*", "patch": {"name": "c"}}, tenant=tenant)
    assert star["revision"] == 3
    listed = await rpc.call(FlowsOp.UPDATE, {**ref, "ifMatch": '"1", "3"', "patch": {"name": "d"}}, tenant=tenant)
    assert listed["name"] == "d"


async def test_patch_changes_only_given_fields_and_put_replaces_the_draft(rpc: RpcClient, tenant: str) -> None:
    flow = await create(rpc, tenant, description="keep", definition=CANVAS)
    ref = {"flowId": flow["id"]}
    patched = await rpc.call(FlowsOp.UPDATE, {**ref, "patch": {"name": "renamed"}}, tenant=tenant)
    assert patched["description"] == "keep" and patched["definition"] == CANVAS
    cleared = await rpc.call(FlowsOp.UPDATE, {**ref, "patch": {"description": None}}, tenant=tenant)
    assert cleared["description"] is None
    replaced = await rpc.call(FlowsOp.REPLACE, {**ref, "flow": {"name": "whole"}}, tenant=tenant)
    assert replaced["definition"] == {"nodes": [], "edges": []} and replaced["name"] == "whole"


async def test_concurrent_updates_with_the_same_etag_let_exactly_one_win(rpc: RpcClient, tenant: str) -> None:
    flow = await create(rpc, tenant)
    body = {"flowId": flow["id"], "ifMatch": '"1"'}
    results = await asyncio.gather(
        *(rpc.call(FlowsOp.UPDATE, {**body, "patch": {"name": f"n{i}"}}, tenant=tenant) for i in range(5)),
        return_exceptions=True,
    )
    assert sum(isinstance(r, dict) for r in results) == 1
    assert sum(isinstance(r, PreconditionFailed) for r in results) == 4


async def test_bad_messages_get_validation_errors_and_change_nothing(rpc: RpcClient, tenant: str) -> None:
    with pytest.raises(InvalidInput) as err:
        await rpc.call(FlowsOp.CREATE, {"name": ""}, tenant=tenant)
    assert err.value.errors and err.value.errors[0].path == "/name"
    with pytest.raises(InvalidInput):
        await rpc.call(FlowsOp.CREATE, {"name": "x"}, tenant="")
    flow = await create(rpc, tenant)
    with pytest.raises(InvalidInput):
        await rpc.call(FlowsOp.UPDATE, {"flowId": flow["id"], "patch": {"name": None}}, tenant=tenant)
    with pytest.raises(NotFound):
        await rpc.call(FlowsOp.GET, {"flowId": "not-a-uuid"}, tenant=tenant)
    assert (await rpc.call(FlowsOp.LIST, {}, tenant=tenant))["total"] == 1


async def test_delete_hides_a_draft_and_refuses_a_published_flow_unless_forced(
    rpc: RpcClient, tenant: str, flows_service: ServiceRuntime
) -> None:
    draft = await create(rpc, tenant)
    assert await rpc.call(FlowsOp.DELETE, {"flowId": draft["id"]}, tenant=tenant) is None
    with pytest.raises(NotFound):
        await rpc.call(FlowsOp.GET, {"flowId": draft["id"]}, tenant=tenant)

    published = await create(rpc, tenant)
    async with flows_service.db.transaction() as conn:  # publishing arrives with P2; stand in for it in the table
        await conn.execute(
            "UPDATE flows.flows SET latest_version = 1, active_version = 1 WHERE id = $1", published["id"]
        )
    with pytest.raises(Conflict, match="force=true"):
        await rpc.call(FlowsOp.DELETE, {"flowId": published["id"]}, tenant=tenant)
    await rpc.call(FlowsOp.DELETE, {"flowId": published["id"], "force": True}, tenant=tenant)
    with pytest.raises(NotFound):
        await rpc.call(FlowsOp.GET, {"flowId": published["id"]}, tenant=tenant)
    async with flows_service.db.reading() as conn:
        active = await conn.fetchval("SELECT active FROM flows.flows WHERE id = $1", published["id"])
    assert active is False


async def test_flow_versions_are_immutable_in_the_database(
    rpc: RpcClient, tenant: str, flows_service: ServiceRuntime
) -> None:
    flow = await create(rpc, tenant)
    async with flows_service.db.transaction() as conn:
        await conn.execute(
            "INSERT INTO flows.flow_versions (flow_id, version, tenant_id, definition, settings, created_at) "
            "VALUES ($1, 1, $2, '{}', '{}', now())",
            flow["id"],
            tenant,
        )
    with pytest.raises(asyncpg.PostgresError, match="immutable"):
        async with flows_service.db.transaction() as conn:
            await conn.execute(
                "UPDATE flows.flow_versions SET definition = '{\"x\": 1}' WHERE flow_id = $1", flow["id"]
            )
