"""The BYOK key vault against real NATS and PostgreSQL: hints only, the runner alone reveals, rotation."""

from __future__ import annotations

import secrets

import pytest

from flowmesh.contracts.errors import Forbidden, InvalidInput, NotFound
from flowmesh.contracts.models.usage import KEYS_REVEAL_ROLE
from flowmesh.contracts.subjects import UsageOp
from flowmesh.runtime.rpc import RpcClient
from flowmesh.runtime.service import ServiceRuntime
from flowmesh.usage.keys import KeyStore
from flowmesh.usage.vault import Vault


def a_key() -> str:
    return "sk-test-" + secrets.token_urlsafe(24)


async def test_a_key_is_stored_sealed_listed_as_a_hint_and_revealed_to_the_runner_only(
    client: RpcClient, usage_service: ServiceRuntime, tenant: str
) -> None:
    key = a_key()
    info = await client.call(UsageOp.KEYS_PUT, {"provider": "OpenAI", "apiKey": f"  {key}\n"}, tenant=tenant)
    assert info["provider"] == "openai" and info["keyHint"] == "…" + key[-4:] and info["lastUsedAt"] is None
    listed = await client.call(UsageOp.KEYS_LIST, tenant=tenant)
    assert listed == {"items": [info]}
    async with usage_service.db.reading() as conn:
        sealed = await conn.fetchval("SELECT ciphertext FROM usage.api_keys WHERE tenant_id = $1", tenant)
    assert key.encode() not in bytes(sealed) and key[-8:].encode() not in bytes(sealed)

    with pytest.raises(Forbidden):
        await client.call(UsageOp.KEYS_REVEAL, {"provider": "openai"}, tenant=tenant)
    with pytest.raises(Forbidden):
        await client.call(UsageOp.KEYS_REVEAL, {"provider": "openai"}, tenant=tenant, role="admin")
    revealed = await client.call(UsageOp.KEYS_REVEAL, {"provider": "OPENAI"}, tenant=tenant, role=KEYS_REVEAL_ROLE)
    assert revealed == {"provider": "openai", "apiKey": key}
    (used,) = (await client.call(UsageOp.KEYS_LIST, tenant=tenant))["items"]
    assert used["lastUsedAt"] is not None

    # another tenant sees nothing of it
    other = tenant + "-other"
    assert await client.call(UsageOp.KEYS_LIST, tenant=other) == {"items": []}
    with pytest.raises(NotFound):
        await client.call(UsageOp.KEYS_REVEAL, {"provider": "openai"}, tenant=other, role=KEYS_REVEAL_ROLE)
    with pytest.raises(NotFound):
        await client.call(UsageOp.KEYS_DELETE, {"provider": "openai"}, tenant=other)


async def test_a_new_key_replaces_the_old_and_delete_forgets_it(client: RpcClient, tenant: str) -> None:
    first, second = a_key(), a_key()
    await client.call(UsageOp.KEYS_PUT, {"provider": "anthropic", "apiKey": first}, tenant=tenant)
    await client.call(UsageOp.KEYS_PUT, {"provider": "anthropic", "apiKey": second}, tenant=tenant)
    (only,) = (await client.call(UsageOp.KEYS_LIST, tenant=tenant))["items"]
    assert only["keyHint"] == "…" + second[-4:]
    revealed = await client.call(UsageOp.KEYS_REVEAL, {"provider": "anthropic"}, tenant=tenant, role=KEYS_REVEAL_ROLE)
    assert revealed["apiKey"] == second
    assert await client.call(UsageOp.KEYS_DELETE, {"provider": "Anthropic"}, tenant=tenant) == {"deleted": True}
    with pytest.raises(NotFound):
        await client.call(UsageOp.KEYS_DELETE, {"provider": "anthropic"}, tenant=tenant)
    assert await client.call(UsageOp.KEYS_LIST, tenant=tenant) == {"items": []}


@pytest.mark.parametrize("bad", ["", "   ", "sk-with space", "sk-\x00nul", "sk-ünïcode-key-1234"])
async def test_keys_that_cannot_be_sent_as_a_header_are_refused(client: RpcClient, tenant: str, bad: str) -> None:
    with pytest.raises(InvalidInput):
        await client.call(UsageOp.KEYS_PUT, {"provider": "openai", "apiKey": bad}, tenant=tenant)
    with pytest.raises(InvalidInput):
        await client.call(UsageOp.KEYS_PUT, {"provider": "open ai", "apiKey": a_key()}, tenant=tenant)


async def test_rotation_reseals_every_key_with_the_new_secret(usage_service: ServiceRuntime, tenant: str) -> None:
    old, new = "old-secret-" + "o" * 32, "new-secret-" + "n" * 32
    key = a_key()
    await KeyStore(usage_service.db, Vault([old])).put(tenant, "mistral", key, actor="test")
    rotated = KeyStore(usage_service.db, Vault([new, old]))
    assert await rotated.reveal(tenant, "mistral") == key  # the old secret still opens it
    assert await rotated.reseal_all() >= 1
    assert await KeyStore(usage_service.db, Vault([new])).reveal(tenant, "mistral") == key
    with pytest.raises(Exception, match="cannot be read"):
        await KeyStore(usage_service.db, Vault([old])).reveal(tenant, "mistral")
    await rotated.delete(tenant, "mistral", actor="test")
