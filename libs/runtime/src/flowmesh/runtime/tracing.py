"""W3C trace context: one ``traceparent`` per request, carried on every message it causes."""

from __future__ import annotations

import re
import secrets

_TRACEPARENT = re.compile(r"^00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$")


def new_traceparent() -> str:
    """A fresh, sampled trace context."""
    return f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"


def valid_traceparent(value: str | None) -> bool:
    """Whether a client-given ``traceparent`` is well-formed (else we start a new trace)."""
    return value is not None and _TRACEPARENT.fullmatch(value) is not None
