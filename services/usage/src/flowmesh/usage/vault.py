"""Encryption of stored API keys: Fernet, keyed from ``FLOWMESH_USAGE_KEYS_SECRET``. Keys are
encrypted at rest so that a copy of the database does not give away a tenant's provider keys.

Each configured secret (any strong string) is stretched into a Fernet key with HKDF-SHA256. The
first secret encrypts; every one decrypts (``MultiFernet``), so a secret is rotated by putting the
new one first: at start-up the service re-encrypts every row written under another secret (each
row records the id of the key that wrote it), after which the old secret can be dropped.

A sealed key names its tenant and provider inside the ciphertext and is checked on opening: a
ciphertext copied into another tenant's row does not open there. Tenant secrets are sealed by the
same keys (so they rotate with them) but as another kind of document, naming tenant and secret: a
sealed secret does not open as a provider key, nor a provider key as a secret.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Sequence

import orjson
from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

_INFO = b"flowmesh usage api keys v1"
_SECRET = "secret"


class VaultError(Exception):
    """A stored key cannot be opened (no configured secret wrote it, or it belongs to another row)."""


def _fernet_key(secret: str) -> bytes:
    raw = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_INFO).derive(secret.encode())
    return base64.urlsafe_b64encode(raw)


def _key_id(fernet_key: bytes) -> str:
    """A short public name of a key (a hash of it): which secret wrote a row."""
    return hashlib.sha256(b"key-id:" + fernet_key).hexdigest()[:16]


class Vault:
    """Seals and opens API keys with the configured secrets (newest first)."""

    def __init__(self, secrets: Sequence[str]) -> None:
        if not secrets:
            raise ValueError("the vault needs at least one secret")
        keys = [_fernet_key(s) for s in secrets]
        self._fernet = MultiFernet([Fernet(k) for k in keys])
        self.key_id = _key_id(keys[0])
        """The id of the key that seals now; rows with another id are re-sealed at start-up."""

    def seal(self, *, tenant: str, provider: str, api_key: str) -> bytes:
        """The ciphertext of ``api_key`` for the row (tenant, provider)."""
        return self._fernet.encrypt(orjson.dumps({"t": tenant, "p": provider, "k": api_key}))

    def open(self, token: bytes, *, tenant: str, provider: str) -> str:
        """The plaintext key of the row (tenant, provider).

        Raises:
            VaultError: no configured secret opens it, or it was sealed for another row.
        """
        doc = self._decrypt(token)
        if "kind" in doc or doc.get("t") != tenant or doc.get("p") != provider:
            raise VaultError("the stored key was sealed for another tenant or provider")
        key = doc.get("k")
        if not isinstance(key, str):
            raise VaultError("the stored key is not readable")
        return key

    def seal_secret(self, *, tenant: str, name: str, value: str) -> bytes:
        """The ciphertext of a tenant's secret ``name`` (a document of its own kind: never a key)."""
        return self._fernet.encrypt(orjson.dumps({"kind": _SECRET, "t": tenant, "n": name, "v": value}))

    def open_secret(self, token: bytes, *, tenant: str, name: str) -> str:
        """The plaintext value of the secret row (tenant, name).

        Raises:
            VaultError: no configured secret opens it, it is not a secret, or it was sealed for another row.
        """
        doc = self._decrypt(token)
        if doc.get("kind") != _SECRET or doc.get("t") != tenant or doc.get("n") != name:
            raise VaultError("the stored secret was sealed for another tenant or name, or is not a secret")
        value = doc.get("v")
        if not isinstance(value, str):
            raise VaultError("the stored secret is not readable")
        return value

    def _decrypt(self, token: bytes) -> dict[str, object]:
        try:
            doc = orjson.loads(self._fernet.decrypt(token))
        except (InvalidToken, orjson.JSONDecodeError) as exc:
            raise VaultError("the stored value cannot be decrypted with the configured secrets") from exc
        if not isinstance(doc, dict):
            raise VaultError("the stored value is not readable")
        return doc

    def reseal(self, token: bytes) -> bytes:
        """The same plaintext under the current key (rotation).

        Raises:
            VaultError: no configured secret opens it.
        """
        try:
            return self._fernet.rotate(token)
        except InvalidToken as exc:
            raise VaultError("the stored key cannot be decrypted with the configured secrets") from exc
