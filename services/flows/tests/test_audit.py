"""The flows service's audit log: one entry per change, in the change's transaction, append-only."""

from __future__ import annotations

import uuid
from typing import Any

import asyncpg
import pytest

from flowmesh.contracts.errors import Conflict, FlowmeshError, InvalidInput, PreconditionFailed
from flowmesh.contracts.subjects import FlowsOp
from flowmesh.runtime.rpc import RpcClient
from flowmesh.runtime.service import ServiceRuntime

CHAIN = {
    "nodes": [
        {"id": "start", "type": "trigger", "data": {}},
        {"id": "add", "type": "transform", "data": {"output": {"v": "{{ input.v + 1 }}"}}},
    ],
    "edges": [{"id": "e", "source": "start", "target": "add"}],
}


async def entries(rpc: RpcClient, tenant: str, **q: Any) -> list[dict[str, Any]]:
    """The tenant's entries in this service, newest first."""
    reply = await rpc.call(FlowsOp.AUDIT, {"limit": 101, **q}, tenant=tenant)
    return reply["items"]  # type: ignore[no-any-return]


async def test_every_change_records_one_entry_with_its_actor_and_target_in_order(rpc: RpcClient, tenant: str) -> None:
    def call(op: str, body: dict[str, Any]) -> Any:
        return rpc.call(op, body, tenant=tenant, sub="alice")

    flow = await call(FlowsOp.CREATE, {"name": "orders", "definition": CHAIN})
    ref = {"flowId": flow["id"]}
    await call(FlowsOp.UPDATE, {**ref, "patch": {"name": "orders 2", "description": "d"}})
    await call(FlowsOp.PUBLISH, ref)
    await call(
        FlowsOp.REPLACE, {**ref, "flow": {"name": "orders 2", "definition": CHAIN, "settings": {"runTimeoutMs": 5}}}
    )
    await call(FlowsOp.PUBLISH, ref)
    await call(FlowsOp.ROLLBACK, {**ref, "version": 1})
    await call(FlowsOp.DEACTIVATE, ref)
    await call(FlowsOp.ACTIVATE, ref)
    trigger = await call(
        FlowsOp.TRIGGER_CREATE, {**ref, "trigger": {"type": "webhook", "name": "in", "config": {"signed": True}}}
    )
    await call(FlowsOp.TRIGGER_UPDATE, {"triggerId": trigger["id"], "patch": {"enabled": False}})
    await call(FlowsOp.TRIGGER_DELETE, {"triggerId": trigger["id"]})
    copy = await call(FlowsOp.DUPLICATE, ref)
    await call(FlowsOp.DELETE, {**ref, "force": True})
    # no-ops change nothing and record nothing
    await call(FlowsOp.ACTIVATE, {"flowId": copy["id"]})
    await call(FlowsOp.UPDATE, {"flowId": copy["id"], "patch": {}})

    got = list(reversed(await entries(rpc, tenant)))
    assert [(e["action"], e["target"]["type"], e["target"]["id"]) for e in got] == [
        ("flow.created", "flow", flow["id"]),
        ("flow.updated", "flow", flow["id"]),
        ("flow.published", "flow", flow["id"]),
        ("flow.updated", "flow", flow["id"]),
        ("flow.published", "flow", flow["id"]),
        ("flow.rolledBack", "flow", flow["id"]),
        ("flow.deactivated", "flow", flow["id"]),
        ("flow.activated", "flow", flow["id"]),
        ("trigger.created", "trigger", trigger["id"]),
        ("trigger.updated", "trigger", trigger["id"]),
        ("trigger.deleted", "trigger", trigger["id"]),
        ("flow.created", "flow", copy["id"]),
        ("flow.deleted", "flow", flow["id"]),
    ]
    assert {(e["actor"], e["tenantId"]) for e in got} == {("alice", tenant)}
    assert [e["details"] for e in got[1:6]] == [
        {"fields": ["name", "description"], "revision": 2},
        {"version": 1},
        {"fields": ["description", "settings"], "revision": 4},
        {"version": 2},
        {"version": 1, "previousVersion": 2},
    ]
    assert got[1]["target"]["name"] == "orders 2"
    assert got[8]["details"] == {"flowId": flow["id"], "type": "webhook"}
    assert got[9]["details"] == {"flowId": flow["id"], "fields": ["enabled"]}
    assert got[11]["details"] == {"duplicateOf": flow["id"]}
    assert got[12]["details"] == {"force": True}
    assert trigger["secret"] not in str(got) and trigger["url"].rsplit("/", 1)[-1] not in str(got)


async def test_a_refused_change_records_nothing(rpc: RpcClient, tenant: str) -> None:
    flow = await rpc.call(FlowsOp.CREATE, {"name": "f", "definition": CHAIN}, tenant=tenant)
    ref = {"flowId": flow["id"]}
    with pytest.raises(PreconditionFailed):
        await rpc.call(FlowsOp.UPDATE, {**ref, "ifMatch": '"9"', "patch": {"name": "x"}}, tenant=tenant)
    broken = {"nodes": [{"id": "a", "type": "transform", "data": {}}], "edges": []}
    await rpc.call(FlowsOp.UPDATE, {**ref, "patch": {"definition": broken}}, tenant=tenant)
    with pytest.raises(InvalidInput):
        await rpc.call(FlowsOp.PUBLISH, ref, tenant=tenant)
    await rpc.call(FlowsOp.UPDATE, {**ref, "patch": {"definition": CHAIN}}, tenant=tenant)
    await rpc.call(FlowsOp.PUBLISH, ref, tenant=tenant)
    with pytest.raises(Conflict):
        await rpc.call(FlowsOp.DELETE, ref, tenant=tenant)
    with pytest.raises(InvalidInput):
        await rpc.call(
            FlowsOp.TRIGGER_CREATE, {**ref, "trigger": {"type": "schedule", "name": "s", "config": {}}}, tenant=tenant
        )
    assert [e["action"] for e in await entries(rpc, tenant)] == [
        "flow.published",
        "flow.updated",
        "flow.updated",
        "flow.created",
    ]


async def test_the_entry_and_the_change_commit_or_roll_back_together(
    rpc: RpcClient, tenant: str, flows_service: ServiceRuntime
) -> None:
    # a constraint that refuses this tenant's audit entries makes the entry's insert fail, late in the
    # transaction; the change it records must then be rolled back with it
    constraint = f"refuse_{uuid.uuid4().hex[:8]}"
    async with flows_service.db.transaction() as conn:
        await conn.execute(
            f"ALTER TABLE flows.audit ADD CONSTRAINT {constraint} CHECK (tenant_id <> '{tenant}') NOT VALID"
        )
    try:
        with pytest.raises(FlowmeshError):
            await rpc.call(FlowsOp.CREATE, {"name": "f", "definition": CHAIN}, tenant=tenant)
    finally:
        async with flows_service.db.transaction() as conn:
            await conn.execute(f"ALTER TABLE flows.audit DROP CONSTRAINT {constraint}")
    async with flows_service.db.reading() as conn:
        flows = await conn.fetchval("SELECT count(*) FROM flows.flows WHERE tenant_id = $1", tenant)
    assert flows == 0
    assert await entries(rpc, tenant) == []

    flow = await rpc.call(FlowsOp.CREATE, {"name": "f", "definition": CHAIN}, tenant=tenant)
    (entry,) = await entries(rpc, tenant)
    assert entry["target"]["id"] == flow["id"]


async def test_the_table_refuses_update_delete_and_truncate(
    rpc: RpcClient, tenant: str, flows_service: ServiceRuntime
) -> None:
    await rpc.call(FlowsOp.CREATE, {"name": "f", "definition": CHAIN}, tenant=tenant, sub="alice")
    for statement, args in (
        ("UPDATE flows.audit SET actor = 'mallory' WHERE tenant_id = $1", [tenant]),
        ("DELETE FROM flows.audit WHERE tenant_id = $1", [tenant]),
        ("TRUNCATE flows.audit", []),
    ):
        with pytest.raises(asyncpg.PostgresError, match="append-only"):
            async with flows_service.db.transaction() as conn:
                await conn.execute(statement, *args)
    ((entry),) = await entries(rpc, tenant)
    assert entry["actor"] == "alice"


async def test_reads_are_per_tenant_unless_admin_and_filter_and_page_by_keyset(rpc: RpcClient, tenant: str) -> None:
    other = tenant + "-b"
    a = [await rpc.call(FlowsOp.CREATE, {"name": f"a{i}", "definition": CHAIN}, tenant=tenant) for i in range(3)]
    b = await rpc.call(FlowsOp.CREATE, {"name": "b", "definition": CHAIN}, tenant=other)
    await rpc.call(FlowsOp.DEACTIVATE, {"flowId": a[0]["id"]}, tenant=tenant)

    mine = await entries(rpc, tenant)
    assert [e["target"]["id"] for e in mine] == [a[0]["id"], a[2]["id"], a[1]["id"], a[0]["id"]]
    # a member cannot widen the read by naming a tenant
    assert await entries(rpc, tenant, tenantId=other) == mine
    as_admin = await rpc.call(FlowsOp.AUDIT, {"tenantId": other}, tenant="ops", role="admin")
    assert [e["target"]["id"] for e in as_admin["items"]] == [b["id"]]
    everyone = await rpc.call(FlowsOp.AUDIT, {"limit": 101}, tenant="ops", role="admin")
    assert {b["id"], a[1]["id"]} <= {e["target"]["id"] for e in everyone["items"]}

    assert [e["target"]["id"] for e in await entries(rpc, tenant, action="flow.deactivated")] == [a[0]["id"]]
    assert len(await entries(rpc, tenant, targetId=a[0]["id"])) == 2
    first = await entries(rpc, tenant, limit=2)
    rest = await entries(rpc, tenant, before={"at": first[-1]["at"], "id": first[-1]["id"]})
    assert first + rest == mine
    assert mine[0] in await entries(rpc, tenant, since=mine[0]["at"])
    assert await entries(rpc, tenant, until=mine[-1]["at"]) == []
    with pytest.raises(InvalidInput):
        await rpc.call(FlowsOp.AUDIT, {"action": "flow.exploded"}, tenant=tenant)
