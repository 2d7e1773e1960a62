"""Which database errors mean "unreachable right now" (a 503 to retry), not a bug (a 500)."""

from __future__ import annotations

import subprocess
import sys

import asyncpg

from flowmesh.runtime.db_errors import database_unavailable


def test_connection_failures_and_shutdowns_are_unavailability() -> None:
    assert database_unavailable(ConnectionRefusedError())
    assert database_unavailable(asyncpg.exceptions.AdminShutdownError("terminating connection"))
    wrapped = RuntimeError("while starting a run")
    wrapped.__cause__ = asyncpg.exceptions.ConnectionDoesNotExistError("gone")
    assert database_unavailable(wrapped)


def test_other_errors_are_not() -> None:
    assert not database_unavailable(ValueError("a bug"))
    assert not database_unavailable(asyncpg.exceptions.UniqueViolationError("duplicate key"))


def test_a_process_without_the_driver_asks_without_loading_it() -> None:
    code = (
        "import sys\n"
        "from flowmesh.runtime.db_errors import database_unavailable\n"
        "assert database_unavailable(ConnectionRefusedError())\n"
        "assert not database_unavailable(ValueError('a bug'))\n"
        "assert not {'asyncpg', 'sqlalchemy'} & set(sys.modules), 'the gateway has no database'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
