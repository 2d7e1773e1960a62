"""Development JWTs: the HS256 secret kept in the data dir and tokens signed with it."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Final, Literal

import jwt

from flowmesh.runtime.settings import JWT_SECRET_FILE as _SECRET_FILE
from flowmesh.runtime.settings import load_or_create_dev_secret

__all__ = [
    "DEFAULT_AUDIENCE",
    "DEFAULT_ISSUER",
    "JWT_SECRET_FILE",
    "Role",
    "load_jwt_secret",
    "load_or_create_jwt_secret",
    "mint_token",
]

JWT_SECRET_FILE: Final = _SECRET_FILE
"""Name of the file, inside the data dir, holding the dev HS256 secret."""
DEFAULT_ISSUER: Final = "flowmesh"
"""``iss`` when ``FLOWMESH_JWT_ISSUER`` is unset."""
DEFAULT_AUDIENCE: Final = "flowmesh"
"""``aud`` when ``FLOWMESH_JWT_AUDIENCE`` is unset."""

Role = Literal["member", "admin"]


def mint_token(
    secret: str,
    *,
    sub: str,
    tenant: str | None = None,
    role: Role = "member",
    ttl: int = 3600,
    issuer: str = DEFAULT_ISSUER,
    audience: str = DEFAULT_AUDIENCE,
    now: int | None = None,
) -> str:
    """Sign an HS256 JWT carrying the claims the gateway requires.

    Args:
        secret: HS256 key.
        sub: User id (``sub``).
        tenant: Tenant id; defaults to ``sub``.
        role: ``member`` or ``admin`` (platform operator).
        ttl: Lifetime in seconds.
        issuer: ``iss`` claim.
        audience: ``aud`` claim.
        now: Issue time as a Unix timestamp; the current time when None.

    Returns:
        The encoded token.
    """
    if not secret:
        raise ValueError("JWT secret must not be empty")
    if ttl <= 0:
        raise ValueError("ttl must be positive")
    issued_at = int(time.time()) if now is None else now
    claims = {
        "sub": sub,
        "tenant": tenant or sub,
        "role": role,
        "iss": issuer,
        "aud": audience,
        "iat": issued_at,
        "exp": issued_at + ttl,
    }
    return jwt.encode(claims, secret, algorithm="HS256")


def load_jwt_secret(data_dir: Path) -> str | None:
    """Read the dev secret from ``<data_dir>/jwt-secret``.

    Args:
        data_dir: The Flowmesh data dir.

    Returns:
        The secret, or None when the file is missing or empty.
    """
    try:
        secret = (data_dir / JWT_SECRET_FILE).read_text().strip()
    except FileNotFoundError:
        return None
    return secret or None


def load_or_create_jwt_secret(data_dir: Path) -> str:
    """Return the dev secret from ``<data_dir>/jwt-secret``, creating it on first use.

    The file is created exclusively with mode 0600, so two processes racing to create it agree on
    one secret.

    Args:
        data_dir: The Flowmesh data dir (created if missing).

    Returns:
        The secret.
    """
    return load_or_create_dev_secret(data_dir)
