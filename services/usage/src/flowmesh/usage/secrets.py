"""Tenant secrets: named values stored sealed, shown as hints, revealed to the runner only.

Sealed by the same vault as the BYOK provider keys (so a rotation of its secret re-seals them too),
as documents of their own kind naming tenant and secret. Never logged, never returned to a client.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from flowmesh.contracts.errors import FlowmeshError, NotFound
from flowmesh.contracts.ids import utcnow
from flowmesh.contracts.models.usage import RevealedSecrets, SecretInfo
from flowmesh.runtime.db import Database
from flowmesh.usage import repo
from flowmesh.usage.domain import clean_secret_value, secret_hint
from flowmesh.usage.keys import reseal_rows
from flowmesh.usage.vault import Vault, VaultError

log = logging.getLogger(__name__)


class SecretStore:
    """Stores, lists, forgets and reveals tenants' secrets. Never logs a value."""

    def __init__(self, db: Database, vault: Vault) -> None:
        self.db = db
        self.vault = vault

    async def put(self, tenant: str, name: str, value: str, *, actor: str) -> SecretInfo:
        """Store a secret (replacing the value of one of the same name), recorded in the audit log as
        ``actor``'s; its public description."""
        value = clean_secret_value(value)
        sealed = self.vault.seal_secret(tenant=tenant, name=name, value=value)
        async with self.db.transaction() as conn:
            info = await repo.put_secret(
                conn,
                tenant=tenant,
                name=name,
                ciphertext=sealed,
                key_id=self.vault.key_id,
                hint=secret_hint(value),
                now=utcnow(),
            )
            await repo.audit(conn, tenant=tenant, actor=actor, action="secret.put", target=("secret", name))
        return info

    async def list(self, tenant: str) -> list[SecretInfo]:
        """The tenant's secrets, hints only."""
        async with self.db.reading() as conn:
            return await repo.list_secrets(conn, tenant=tenant)

    async def delete(self, tenant: str, name: str, *, actor: str) -> None:
        """Forget a secret, recorded in the audit log as ``actor``'s.

        Raises:
            NotFound: no secret of that name is stored.
        """
        async with self.db.transaction() as conn:
            if not await repo.delete_secret(conn, tenant=tenant, name=name):
                raise NotFound(f"no secret {name!r} is stored")
            await repo.audit(conn, tenant=tenant, actor=actor, action="secret.deleted", target=("secret", name))

    async def reveal(self, tenant: str, names: Sequence[str]) -> RevealedSecrets:
        """The plaintext values of those of ``names`` the tenant stored, and the names it did not.

        Raises:
            FlowmeshError: a stored value cannot be decrypted with the configured secrets.
        """
        wanted = sorted(set(names))
        async with self.db.reading() as conn:
            sealed = await repo.sealed_secrets(conn, tenant=tenant, names=wanted)
        values: dict[str, str] = {}
        for name, token in sealed.items():
            try:
                values[name] = self.vault.open_secret(token, tenant=tenant, name=name)
            except VaultError as exc:
                log.error("the secret %r of tenant %r cannot be opened: %s", name, tenant, exc)
                raise FlowmeshError(f"the stored secret {name!r} cannot be read; store it again") from exc
        return RevealedSecrets(values=values, missing=[n for n in wanted if n not in values])

    async def reseal_all(self) -> int:
        """Re-seal every secret sealed under an older vault secret with the current one; how many were."""
        return await reseal_rows(
            self.db,
            self.vault,
            what="secret",
            fetch=repo.secrets_sealed_with_other,
            write=lambda conn, tenant, name, old, new: repo.reseal_secret(
                conn, tenant=tenant, name=name, old=old, new=new, key_id=self.vault.key_id
            ),
        )
