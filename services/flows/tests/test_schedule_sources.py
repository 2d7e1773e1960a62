"""``fm.rpc.flows.schedules``: what the scheduler reads to keep its copy of cron triggers (no tenant)."""

from __future__ import annotations

from typing import Any

from flowmesh.contracts.subjects import FlowsOp
from flowmesh.contracts.testing import chain
from flowmesh.runtime.rpc import RpcClient

FLOW = chain(1)


async def flow(rpc: RpcClient, tenant: str, *, publish: bool = True) -> str:
    created = await rpc.call(FlowsOp.CREATE, {"name": "f", "definition": FLOW}, tenant=tenant)
    if publish:
        await rpc.call(FlowsOp.PUBLISH, {"flowId": created["id"]}, tenant=tenant)
    return str(created["id"])


async def trigger(rpc: RpcClient, tenant: str, flow_id: str, type_: str = "schedule", **config: Any) -> str:
    config = config or ({"cron": "*/5 * * * * *", "timezone": "Europe/Paris"} if type_ == "schedule" else {})
    body = {"flowId": flow_id, "trigger": {"type": type_, "name": "t", "config": config}}
    return str((await rpc.call(FlowsOp.TRIGGER_CREATE, body, tenant=tenant))["id"])


async def lookup(rpc: RpcClient, **query: Any) -> dict[str, Any]:
    return await rpc.call(FlowsOp.SCHEDULES, query, tenant="")  # type: ignore[no-any-return]


async def test_schedule_triggers_come_with_their_flow_state(rpc: RpcClient, tenant: str) -> None:
    flow_id = await flow(rpc, tenant)
    draft_id = await flow(rpc, tenant, publish=False)
    on_flow = await trigger(rpc, tenant, flow_id)
    on_draft = await trigger(rpc, tenant, draft_id)
    hook = await trigger(rpc, tenant, flow_id, "webhook")
    await rpc.call(FlowsOp.DEACTIVATE, {"flowId": flow_id}, tenant=tenant)

    unknown = "0190a000-0000-7000-8000-00000000dead"
    found = await lookup(rpc, triggerIds=[on_flow, on_draft, hook, "not-a-uuid", unknown])
    by_id = {i["trigger"]["id"]: i for i in found["items"]}
    assert set(by_id) == {on_flow, on_draft}
    config = {"cron": "*/5 * * * * *", "timezone": "Europe/Paris", "misfire": "skip"}
    assert by_id[on_flow]["trigger"]["config"] == config
    assert by_id[on_flow]["flow"] | {"updatedAt": None} == {
        "flowId": flow_id,
        "tenantId": tenant,
        "active": False,
        "published": True,
        "updatedAt": None,
    }
    assert by_id[on_draft]["flow"]["published"] is False and by_id[on_draft]["flow"]["active"] is True


async def test_flow_states_leave_out_deleted_flows(rpc: RpcClient, tenant: str) -> None:
    kept, gone = await flow(rpc, tenant), await flow(rpc, tenant)
    await rpc.call(FlowsOp.DELETE, {"flowId": gone, "force": True}, tenant=tenant)
    found = await lookup(rpc, flowIds=[kept, gone, "nope"])
    assert [f["flowId"] for f in found["flows"]] == [kept]
    assert found["items"] == []


async def test_a_deleted_trigger_or_flow_is_absent(rpc: RpcClient, tenant: str) -> None:
    flow_id = await flow(rpc, tenant)
    deleted = await trigger(rpc, tenant, flow_id)
    await rpc.call(FlowsOp.TRIGGER_DELETE, {"triggerId": deleted}, tenant=tenant)
    other_flow = await flow(rpc, tenant)
    orphan = await trigger(rpc, tenant, other_flow)
    await rpc.call(FlowsOp.DELETE, {"flowId": other_flow, "force": True}, tenant=tenant)
    assert (await lookup(rpc, triggerIds=[deleted, orphan]))["items"] == []


async def test_every_schedule_trigger_of_every_tenant_pages_by_id(rpc: RpcClient, tenant: str) -> None:
    ours = set()
    for t in (tenant, tenant + "-b"):
        flow_id = await flow(rpc, t)
        ours |= {await trigger(rpc, t, flow_id) for _ in range(3)}
    seen: list[str] = []
    after = None
    while True:
        page = await lookup(rpc, limit=2, **({"after": after} if after else {}))
        ids = [i["trigger"]["id"] for i in page["items"]]
        assert len(ids) <= 2 and all(i["trigger"]["type"] == "schedule" for i in page["items"])
        seen += ids
        if len(ids) < 2:
            break
        after = ids[-1]
    assert seen == sorted(seen) and len(seen) == len(set(seen))
    assert ours <= set(seen)
