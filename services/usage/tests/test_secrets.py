"""Tenant secrets against real NATS and PostgreSQL: sealed, hints only, the runner alone reveals, rotation."""

from __future__ import annotations

import secrets

import pytest

from flowmesh.contracts.errors import Forbidden, InvalidInput, NotFound
from flowmesh.contracts.models.usage import KEYS_REVEAL_ROLE, MAX_SECRET_BYTES
from flowmesh.contracts.subjects import UsageOp
from flowmesh.runtime.rpc import RpcClient
from flowmesh.runtime.service import ServiceRuntime
from flowmesh.usage.secrets import SecretStore
from flowmesh.usage.vault import Vault


def a_value() -> str:
    return "v-" + secrets.token_urlsafe(24)


async def test_a_secret_is_stored_sealed_listed_as_a_hint_and_revealed_to_the_runner_only(
    client: RpcClient, usage_service: ServiceRuntime, tenant: str
) -> None:
    value = a_value()
    info = await client.call(UsageOp.SECRETS_PUT, {"name": "Api_TOKEN", "value": value}, tenant=tenant)
    assert info["name"] == "Api_TOKEN" and info["hint"] == "…" + value[-4:]
    assert info["createdAt"] == info["updatedAt"]
    assert await client.call(UsageOp.SECRETS_LIST, tenant=tenant) == {"items": [info]}
    async with usage_service.db.reading() as conn:
        sealed = await conn.fetchval("SELECT ciphertext FROM usage.secrets WHERE tenant_id = $1", tenant)
    assert value.encode() not in bytes(sealed) and value[-8:].encode() not in bytes(sealed)

    ask = {"names": ["Api_TOKEN", "NOT_STORED"]}
    with pytest.raises(Forbidden):
        await client.call(UsageOp.SECRETS_REVEAL, ask, tenant=tenant)
    for role in ("admin", "member"):
        with pytest.raises(Forbidden):
            await client.call(UsageOp.SECRETS_REVEAL, ask, tenant=tenant, role=role)
    revealed = await client.call(UsageOp.SECRETS_REVEAL, ask, tenant=tenant, role=KEYS_REVEAL_ROLE)
    assert revealed == {"values": {"Api_TOKEN": value}, "missing": ["NOT_STORED"]}

    # names are case-sensitive, as CEL identifiers are
    lower = await client.call(UsageOp.SECRETS_REVEAL, {"names": ["api_token"]}, tenant=tenant, role=KEYS_REVEAL_ROLE)
    assert lower == {"values": {}, "missing": ["api_token"]}

    # another tenant sees nothing of it
    other = tenant + "-other"
    assert await client.call(UsageOp.SECRETS_LIST, tenant=other) == {"items": []}
    theirs = await client.call(UsageOp.SECRETS_REVEAL, {"names": ["Api_TOKEN"]}, tenant=other, role=KEYS_REVEAL_ROLE)
    assert theirs == {"values": {}, "missing": ["Api_TOKEN"]}
    with pytest.raises(NotFound):
        await client.call(UsageOp.SECRETS_DELETE, {"name": "Api_TOKEN"}, tenant=other)


async def test_the_same_name_replaces_the_value_keeping_created_at_and_delete_forgets_it(
    client: RpcClient, tenant: str
) -> None:
    first, second = a_value(), a_value()
    one = await client.call(UsageOp.SECRETS_PUT, {"name": "X", "value": first}, tenant=tenant)
    two = await client.call(UsageOp.SECRETS_PUT, {"name": "X", "value": second}, tenant=tenant)
    assert two["createdAt"] == one["createdAt"] and two["updatedAt"] > one["updatedAt"]
    (only,) = (await client.call(UsageOp.SECRETS_LIST, tenant=tenant))["items"]
    assert only["hint"] == "…" + second[-4:]
    revealed = await client.call(UsageOp.SECRETS_REVEAL, {"names": ["X"]}, tenant=tenant, role=KEYS_REVEAL_ROLE)
    assert revealed["values"] == {"X": second}
    assert await client.call(UsageOp.SECRETS_DELETE, {"name": "X"}, tenant=tenant) == {"deleted": True}
    with pytest.raises(NotFound):
        await client.call(UsageOp.SECRETS_DELETE, {"name": "X"}, tenant=tenant)
    assert await client.call(UsageOp.SECRETS_LIST, tenant=tenant) == {"items": []}


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("OK", ""),
        ("OK", "a\x00b"),
        ("OK", "x" * (MAX_SECRET_BYTES + 1)),
        ("OK", "é" * (MAX_SECRET_BYTES // 2 + 1)),  # within the characters, over the bytes
        ("1ST", "v"),
        ("has-dash", "v"),
        ("", "v"),
        ("N" * 65, "v"),
    ],
)
async def test_bad_names_and_values_are_refused(client: RpcClient, tenant: str, name: str, value: str) -> None:
    with pytest.raises(InvalidInput):
        await client.call(UsageOp.SECRETS_PUT, {"name": name, "value": value}, tenant=tenant)
    assert await client.call(UsageOp.SECRETS_LIST, tenant=tenant) == {"items": []}


async def test_short_values_show_no_characters_and_the_largest_value_is_kept_whole(
    client: RpcClient, tenant: str
) -> None:
    short = await client.call(UsageOp.SECRETS_PUT, {"name": "PIN", "value": "1234"}, tenant=tenant)
    assert short["hint"] == "…"
    big = "b" * (MAX_SECRET_BYTES - 1) + "Z"
    await client.call(UsageOp.SECRETS_PUT, {"name": "BIG", "value": big}, tenant=tenant)
    revealed = await client.call(UsageOp.SECRETS_REVEAL, {"names": ["BIG"]}, tenant=tenant, role=KEYS_REVEAL_ROLE)
    assert revealed["values"]["BIG"] == big


async def test_rotation_reseals_every_secret_with_the_new_vault_secret(
    usage_service: ServiceRuntime, tenant: str
) -> None:
    old, new = "old-secret-" + "o" * 32, "new-secret-" + "n" * 32
    value = a_value()
    await SecretStore(usage_service.db, Vault([old])).put(tenant, "ROTATED", value, actor="test")
    rotated = SecretStore(usage_service.db, Vault([new, old]))
    assert (await rotated.reveal(tenant, ["ROTATED"])).values == {"ROTATED": value}  # the old one still opens it
    assert await rotated.reseal_all() >= 1
    assert (await SecretStore(usage_service.db, Vault([new])).reveal(tenant, ["ROTATED"])).values == {"ROTATED": value}
    with pytest.raises(Exception, match="cannot be read"):
        await SecretStore(usage_service.db, Vault([old])).reveal(tenant, ["ROTATED"])
    await rotated.delete(tenant, "ROTATED", actor="test")
