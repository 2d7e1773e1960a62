"""The BYOK key vault: keys stored sealed, shown as hints, revealed to the runner only (a tenant's
provider keys are secrets: never logged, never returned to a client)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from flowmesh.contracts.errors import FlowmeshError, NotFound
from flowmesh.contracts.ids import utcnow
from flowmesh.contracts.models.usage import ApiKeyInfo
from flowmesh.runtime.db import Connection, Database
from flowmesh.usage import repo
from flowmesh.usage.domain import clean_key, key_hint, provider_name
from flowmesh.usage.vault import Vault, VaultError

log = logging.getLogger(__name__)
RESEAL_BATCH = 100


class KeyStore:
    """Stores, lists, forgets and reveals tenants' provider keys. Never logs a key."""

    def __init__(self, db: Database, vault: Vault) -> None:
        self.db = db
        self.vault = vault

    async def put(self, tenant: str, provider: str, api_key: str, *, actor: str) -> ApiKeyInfo:
        """Store a provider's key (replacing the one before), recorded in the audit log as ``actor``'s;
        its public description."""
        provider = provider_name(provider)
        key = clean_key(api_key)
        sealed = self.vault.seal(tenant=tenant, provider=provider, api_key=key)
        async with self.db.transaction() as conn:
            info = await repo.put_key(
                conn,
                tenant=tenant,
                provider=provider,
                ciphertext=sealed,
                key_id=self.vault.key_id,
                hint=key_hint(key),
                now=utcnow(),
            )
            await repo.audit(conn, tenant=tenant, actor=actor, action="apiKey.put", target=("apiKey", provider))
        return info

    async def list(self, tenant: str) -> list[ApiKeyInfo]:
        """The tenant's keys, hints only."""
        async with self.db.reading() as conn:
            return await repo.list_keys(conn, tenant=tenant)

    async def delete(self, tenant: str, provider: str, *, actor: str) -> None:
        """Forget a provider's key, recorded in the audit log as ``actor``'s.

        Raises:
            NotFound: no key of that provider is stored.
        """
        provider = provider_name(provider)
        async with self.db.transaction() as conn:
            if not await repo.delete_key(conn, tenant=tenant, provider=provider):
                raise NotFound(f"no {provider} key is stored")
            await repo.audit(conn, tenant=tenant, actor=actor, action="apiKey.deleted", target=("apiKey", provider))

    async def reveal(self, tenant: str, provider: str) -> str:
        """The plaintext key, marking it used.

        Raises:
            NotFound: no key of that provider is stored.
            FlowmeshError: the stored key cannot be decrypted with the configured secrets.
        """
        provider = provider_name(provider)
        async with self.db.transaction() as conn:
            sealed = await repo.use_key(conn, tenant=tenant, provider=provider, now=utcnow())
        if sealed is None:
            raise NotFound(f"no {provider} key is stored")
        try:
            return self.vault.open(sealed, tenant=tenant, provider=provider)
        except VaultError as exc:
            log.error("the %s key of tenant %r cannot be opened: %s", provider, tenant, exc)
            raise FlowmeshError(f"the stored {provider} key cannot be read; store it again") from exc

    async def reseal_all(self) -> int:
        """Re-seal every key sealed under an older secret with the current one; how many were.

        Rows no configured secret opens are left as they are (logged): they need their secret back.
        """
        return await reseal_rows(
            self.db,
            self.vault,
            what="key",
            fetch=repo.keys_sealed_with_other,
            write=lambda conn, tenant, provider, old, new: repo.reseal_key(
                conn, tenant=tenant, provider=provider, old=old, new=new, key_id=self.vault.key_id
            ),
        )


Fetch = Callable[..., Awaitable[list[tuple[str, str, bytes]]]]
"""``(connection, *, key_id, limit)``: rows ``(tenant, name, ciphertext)`` sealed under another key."""
Write = Callable[[Connection, str, str, bytes, bytes], Awaitable[bool]]
"""``(connection, tenant, name, old, new)``: replace a row's ciphertext if still ``old``; whether it was."""


async def reseal_rows(db: Database, vault: Vault, *, what: str, fetch: Fetch, write: Write) -> int:
    """Re-seal, batch by batch, the rows ``fetch`` finds with the vault's current key; how many were.

    Rows no configured secret opens are left as they are (logged): they need their secret back.
    """
    done = 0
    skipped: set[tuple[str, str]] = set()
    while True:
        async with db.reading() as conn:
            rows = await fetch(conn, key_id=vault.key_id, limit=RESEAL_BATCH + len(skipped))
        rows = [r for r in rows if (r[0], r[1]) not in skipped]
        if not rows:
            break
        async with db.transaction() as conn:
            for tenant, name, old in rows:
                try:
                    new = vault.reseal(old)
                except VaultError:
                    log.error("the stored %s %r of tenant %r opens with no configured secret", what, name, tenant)
                    skipped.add((tenant, name))
                    continue
                if await write(conn, tenant, name, old, new):
                    done += 1
    if done:
        log.info("re-sealed %d stored %ss with the current secret", done, what)
    return done
