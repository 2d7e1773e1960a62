"""The usage service's audit log: provider keys and plans, in the change's transaction, append-only."""

from __future__ import annotations

import secrets
import uuid
from typing import Any

import asyncpg
import pytest

from flowmesh.contracts.errors import FlowmeshError, Forbidden, InvalidInput, NotFound
from flowmesh.contracts.subjects import UsageOp
from flowmesh.runtime.rpc import RpcClient
from flowmesh.runtime.service import ServiceRuntime
from flowmesh.usage import repo


async def entries(client: RpcClient, tenant: str, **q: Any) -> list[dict[str, Any]]:
    reply = await client.call(UsageOp.AUDIT, {"limit": 101, **q}, tenant=tenant)
    return reply["items"]  # type: ignore[no-any-return]


async def test_keys_and_plans_record_one_entry_each_and_never_the_key(client: RpcClient, tenant: str) -> None:
    key = "sk-test-" + secrets.token_urlsafe(24)
    await client.call(UsageOp.KEYS_PUT, {"provider": "OpenAI", "apiKey": key}, tenant=tenant, sub="alice")
    await client.call(UsageOp.KEYS_DELETE, {"provider": "openai"}, tenant=tenant, sub="alice")
    await client.call(UsageOp.PLAN_SET, {"tenantId": tenant, "plan": "pro"}, tenant="ops", role="admin", sub="root")
    await client.call(UsageOp.PLAN_SET, {"tenantId": tenant, "plan": "free"}, tenant="ops", role="admin", sub="root")
    # refused changes record nothing
    with pytest.raises(NotFound):
        await client.call(UsageOp.KEYS_DELETE, {"provider": "openai"}, tenant=tenant, sub="alice")
    with pytest.raises(InvalidInput):
        await client.call(UsageOp.KEYS_PUT, {"provider": "openai", "apiKey": "has space"}, tenant=tenant, sub="alice")
    with pytest.raises(Forbidden):
        await client.call(UsageOp.PLAN_SET, {"tenantId": tenant, "plan": "pro"}, tenant=tenant, sub="alice")
    with pytest.raises(InvalidInput):
        await client.call(UsageOp.PLAN_SET, {"tenantId": tenant, "plan": "gold"}, tenant="ops", role="admin")

    got = list(reversed(await entries(client, tenant)))
    assert [(e["action"], e["actor"], e["target"], e["details"]) for e in got] == [
        ("apiKey.put", "alice", {"type": "apiKey", "id": "openai", "name": None}, {}),
        ("apiKey.deleted", "alice", {"type": "apiKey", "id": "openai", "name": None}, {}),
        (
            "plan.changed",
            "root",
            {"type": "tenant", "id": tenant, "name": None},
            {"plan": "pro", "previousPlan": None, "revision": 1},
        ),
        (
            "plan.changed",
            "root",
            {"type": "tenant", "id": tenant, "name": None},
            {"plan": "free", "previousPlan": "pro", "revision": 2},
        ),
    ]
    assert key not in str(got) and key[-4:] not in str(got)
    # the admin's own tenant has none of it
    assert await entries(client, "ops") == []


async def test_the_entry_and_the_change_commit_or_roll_back_together(
    client: RpcClient, tenant: str, usage_service: ServiceRuntime
) -> None:
    constraint = f"refuse_{uuid.uuid4().hex[:8]}"
    async with usage_service.db.transaction() as conn:
        await conn.execute(
            f"ALTER TABLE usage.audit ADD CONSTRAINT {constraint} CHECK (tenant_id <> '{tenant}') NOT VALID"
        )
    try:
        with pytest.raises(FlowmeshError):
            await client.call(UsageOp.KEYS_PUT, {"provider": "openai", "apiKey": "sk-abcdef"}, tenant=tenant)
        with pytest.raises(FlowmeshError):
            await client.call(UsageOp.PLAN_SET, {"tenantId": tenant, "plan": "pro"}, tenant="ops", role="admin")
    finally:
        async with usage_service.db.transaction() as conn:
            await conn.execute(f"ALTER TABLE usage.audit DROP CONSTRAINT {constraint}")
    assert await client.call(UsageOp.KEYS_LIST, tenant=tenant) == {"items": []}
    assert (await client.call(UsageOp.PLAN, tenant=tenant))["assigned"] is False
    assert await entries(client, tenant) == []

    await client.call(UsageOp.KEYS_PUT, {"provider": "openai", "apiKey": "sk-abcdef"}, tenant=tenant)
    assert [e["action"] for e in await entries(client, tenant)] == ["apiKey.put"]


async def test_the_recording_function_joins_the_callers_transaction(
    tenant: str, client: RpcClient, usage_service: ServiceRuntime
) -> None:
    # what the secrets store calls beside its own change: rolled back with it, committed with it
    async def failing_change() -> None:
        async with usage_service.db.transaction() as conn:
            await repo.audit(conn, tenant=tenant, actor="alice", action="secret.put", target=("secret", "TOKEN"))
            raise RuntimeError("the change failed")

    with pytest.raises(RuntimeError):
        await failing_change()
    assert await entries(client, tenant) == []
    async with usage_service.db.transaction() as conn:
        await repo.audit(conn, tenant=tenant, actor="alice", action="secret.deleted", target=("secret", "TOKEN"))
    (entry,) = await entries(client, tenant)
    assert (entry["action"], entry["target"]["id"]) == ("secret.deleted", "TOKEN")


async def test_the_table_refuses_update_delete_and_truncate(
    client: RpcClient, tenant: str, usage_service: ServiceRuntime
) -> None:
    await client.call(UsageOp.KEYS_PUT, {"provider": "openai", "apiKey": "sk-abcdef"}, tenant=tenant, sub="alice")
    for statement in (
        ("UPDATE usage.audit SET actor = 'mallory' WHERE tenant_id = $1", tenant),
        ("DELETE FROM usage.audit WHERE tenant_id = $1", tenant),
        ("TRUNCATE usage.audit",),
    ):
        with pytest.raises(asyncpg.PostgresError, match="append-only"):
            async with usage_service.db.transaction() as conn:
                await conn.execute(*statement)
    (entry,) = await entries(client, tenant)
    assert entry["actor"] == "alice"
