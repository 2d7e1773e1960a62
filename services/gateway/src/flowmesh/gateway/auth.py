"""JWT verification: HS256 with a secret, RS256/ES256 from a JWKS with ``kid`` rotation.

The key is chosen by the token's algorithm family, and each family only ever uses its own key
source, so a token signed with HS256 using the public RSA key (algorithm confusion) and ``alg=none``
are refused.
"""

from __future__ import annotations

import asyncio
import time
import unicodedata
from dataclasses import dataclass
from typing import Any, Final

import jwt

from flowmesh.contracts.errors import Unauthorized
from flowmesh.gateway.settings import GatewaySettings

HMAC_ALGORITHMS: Final = ("HS256",)
JWKS_ALGORITHMS: Final = ("RS256", "ES256")
REQUIRED_CLAIMS: Final = ["exp", "iss", "aud", "sub"]
ROLES: Final = frozenset({"member", "admin"})
"""The roles a token may carry, spelled exactly: ``member``, and ``admin``, the platform operator.

Services' own roles (``service:runner``) are given by their NATS users, never by a token."""
VERIFIED_TTL_S: Final = 60.0
"""How long a verified token is taken without its signature checked again (never past its ``exp``):
a client sends the same token with every request, and verifying it was a sixth of the gateway's CPU.
A JWKS key removed from the provider stops being trusted within this, plus the JWKS cache's life."""
VERIFIED_MAX: Final = 4096
"""Verified tokens remembered at most (all forgotten when full: a few MB at most)."""
MAX_IDENTITY_CHARS: Final = 255
"""The longest ``sub`` or ``tenant`` (a tenant id is stored and shown; 255 is what the admin routes accept)."""
_FORBIDDEN_CATEGORIES: Final = frozenset({"Cc", "Cs", "Zl", "Zp"})
"""Control characters (NUL, CR, LF…), lone surrogates and line separators: an id travels in NATS headers,
SQL text and log lines, where each of them breaks something."""


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a verified token speaks for."""

    sub: str
    tenant: str
    role: str

    @property
    def is_admin(self) -> bool:
        """Platform operator."""
        return self.role == "admin"


class JwtVerifier:
    """Verifies bearer tokens against the configured keys."""

    def __init__(self, settings: GatewaySettings) -> None:
        self._secret = settings.jwt_secret
        self._issuer = settings.jwt_issuer
        self._audience = settings.jwt_audience
        self._leeway = settings.jwt_leeway_s
        self._jwks = (
            jwt.PyJWKClient(
                settings.jwks_url,
                cache_keys=True,
                lifespan=settings.jwks_cache_s,
                timeout=5,
                cooldown_duration=settings.jwks_cooldown_s,
            )
            if settings.jwks_url
            else None
        )
        self._verified: dict[str, tuple[Principal, float]] = {}

    async def verify(self, token: str) -> Principal:
        """The principal of a valid token (remembered for :data:`VERIFIED_TTL_S`, by its exact text).

        Raises:
            Unauthorized: the token is malformed, expired, for another audience or issuer, signed by
                an unknown key or with an algorithm not allowed.
        """
        now = time.time()
        known = self._verified.get(token)
        if known is not None and now < known[1]:
            return known[0]
        principal, expires = await self._verify(token)
        if len(self._verified) >= VERIFIED_MAX:
            self._verified.clear()
        self._verified[token] = (principal, min(expires + self._leeway, now + VERIFIED_TTL_S))
        return principal

    async def _verify(self, token: str) -> tuple[Principal, float]:
        """The principal of a valid token and its ``exp``, checked in full."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise Unauthorized(f"malformed token: {exc}") from exc
        alg = header.get("alg")
        key: Any
        if alg in HMAC_ALGORITHMS and self._secret is not None:
            key = self._secret
        elif alg in JWKS_ALGORITHMS and self._jwks is not None:
            try:
                # the JWKS client does blocking I/O when its cache misses (a new kid): keep it off the loop
                key = (await asyncio.to_thread(self._jwks.get_signing_key_from_jwt, token)).key
            except jwt.PyJWKClientError as exc:
                raise Unauthorized(f"no key for this token: {exc}") from exc
        else:
            raise Unauthorized(f"tokens signed with {alg!r} are not accepted")
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[alg],
                audience=self._audience,
                issuer=self._issuer,
                leeway=self._leeway,
                options={"require": REQUIRED_CLAIMS},
            )
        except jwt.PyJWTError as exc:
            raise Unauthorized(f"invalid token: {exc}") from exc
        sub = _identity("sub", claims["sub"])
        tenant = _identity("tenant", claims["tenant"]) if claims.get("tenant") is not None else sub
        return Principal(sub=sub, tenant=tenant, role=_role(claims.get("role"))), float(claims["exp"])


def _identity(claim: str, value: object) -> str:
    """A ``sub`` or ``tenant`` claim as it may be used: a short, printable string.

    Raises:
        Unauthorized: not a string, empty, too long, padded with spaces, or with a control character,
            a lone surrogate or a line separator (the value itself is never echoed).
    """
    if not isinstance(value, str) or not value:
        raise Unauthorized(f"the {claim} claim must be a non-empty string")
    if len(value) > MAX_IDENTITY_CHARS:
        raise Unauthorized(f"the {claim} claim has more than {MAX_IDENTITY_CHARS} characters")
    if value != value.strip():
        raise Unauthorized(f"the {claim} claim must not start or end with white space")
    if any(unicodedata.category(c) in _FORBIDDEN_CATEGORIES for c in value):
        raise Unauthorized(f"the {claim} claim contains a control character, a lone surrogate or a line separator")
    return value


def _role(value: object) -> str:
    """The ``role`` claim: ``member`` when absent, else one of :data:`ROLES` exactly as spelled there.

    Raises:
        Unauthorized: any other value (``ADMIN``, ``service:runner``, a number…).
    """
    if value is None:
        return "member"
    if not isinstance(value, str) or value not in ROLES:
        raise Unauthorized(f"the role claim must be one of {', '.join(sorted(ROLES))} (exactly so spelled)")
    return value


def bearer_token(authorization: str | None) -> str:
    """The token of an ``Authorization: Bearer <token>`` header.

    Raises:
        Unauthorized: no such header, or another scheme.
    """
    if not authorization:
        raise Unauthorized("missing Authorization header; send `Authorization: Bearer <token>`")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("the Authorization header must be `Bearer <token>`")
    return token.strip()
