"""Small helpers of the security tests (``tests/security``): reading refusals and tokens as an attacker sees them."""

from __future__ import annotations

from typing import Any

import httpx
import jwt

PROBLEM = "application/problem+json"


def problem(r: httpx.Response, status: int) -> dict[str, Any]:
    """The problem+json body of a refusal with ``status`` (asserted)."""
    assert r.status_code == status, (r.status_code, r.request.method, r.request.url.path, r.text)
    assert r.headers["content-type"].startswith(PROBLEM), r.headers
    body: dict[str, Any] = r.json()
    assert body["status"] == status and body["detail"]
    return body


def tenant_of(c: httpx.Client) -> str:
    """The tenant of a client made by ``ProcessStack.client`` (its token's ``tenant`` claim)."""
    raw = str(c.headers["Authorization"]).removeprefix("Bearer ")
    return str(jwt.decode(raw, options={"verify_signature": False})["tenant"])
