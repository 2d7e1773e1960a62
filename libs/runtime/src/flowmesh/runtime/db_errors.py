"""Which database errors mean "unreachable right now" (a 503 to retry), not a bug (a 500).

Asked by every RPC server and consumer, including the gateway's, which has no database: so this
module does not import asyncpg. It looks the driver's error classes up among the modules already
loaded: an error of a library the process never imported cannot reach it.
"""

from __future__ import annotations

import sys
from typing import Any


def database_unavailable(exc: BaseException) -> bool:
    """Whether an error means the database cannot be reached right now (a retry later may succeed).

    Follows the exception chain.
    """
    asyncpg: Any = sys.modules.get("asyncpg")
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ConnectionError):  # refused, reset: nothing listens yet, or the server went away
            return True
        if asyncpg is not None and _driver_unavailable(asyncpg, current):
            return True
        current = current.__cause__ or current.__context__
    return False


def _driver_unavailable(asyncpg: Any, exc: BaseException) -> bool:
    """What asyncpg says when PostgreSQL is down, restarting, or dropped the connection."""
    if isinstance(
        exc,
        (
            asyncpg.PostgresConnectionError,  # class 08: the connection failed or is gone
            asyncpg.exceptions.OperatorInterventionError,  # class 57: shutting down, starting up, crashed
        ),
    ):
        return True
    if isinstance(exc, asyncpg.InterfaceError) and "closed" in str(exc):
        return True  # a pooled connection the server closed
    # a pooled connection whose server died in the middle of an error reply, handed out again
    # before its socket closed (pools without a reset round trip, like the runner's, do that)
    return isinstance(exc, asyncpg.exceptions.InternalClientError) and "in progress" in str(exc)
