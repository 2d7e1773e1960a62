"""Which database errors mean "unreachable right now" (a 503 to retry), not a bug (a 500)."""

from __future__ import annotations

import asyncpg

from flowmesh.runtime.db import database_unavailable


def test_connection_failures_and_shutdowns_are_unavailability() -> None:
    assert database_unavailable(ConnectionRefusedError())
    assert database_unavailable(asyncpg.exceptions.AdminShutdownError("terminating connection"))
    wrapped = RuntimeError("while starting a run")
    wrapped.__cause__ = asyncpg.exceptions.ConnectionDoesNotExistError("gone")
    assert database_unavailable(wrapped)


def test_other_errors_are_not() -> None:
    assert not database_unavailable(ValueError("a bug"))
    assert not database_unavailable(asyncpg.exceptions.UniqueViolationError("duplicate key"))
