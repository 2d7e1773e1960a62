"""Session-wide test infrastructure: a real NATS (JetStream) and a real PostgreSQL.

By default both are embedded servers started once per session on free ports (no Docker, no running
servers needed). ``NATS_URL`` / ``DATABASE_URL`` point the tests at existing servers instead, and
``FLOWMESH_TEST_INFRA=docker`` starts them with testcontainers.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:  # imported by pytest_plugins below; importing it here first would stop pytest rewriting its asserts
    from flowmesh.runtime.testing import Infra

# the shared test kit: a service in-process, an RPC client, a fresh tenant
pytest_plugins = ("flowmesh.runtime.testing",)


def _docker_infra(stack: list[object]) -> Infra:
    from flowmesh.runtime.testing import Infra

    try:
        import docker

        docker.from_env().ping()
    except Exception as exc:
        pytest.exit(
            f"FLOWMESH_TEST_INFRA=docker needs a running Docker engine, and none answered ({exc}). "
            "Unset FLOWMESH_TEST_INFRA to use the embedded servers instead.",
            returncode=2,
        )
    from testcontainers.nats import NatsContainer
    from testcontainers.postgres import PostgresContainer

    nats = NatsContainer("nats:2.11").with_command("-js")
    pg = PostgresContainer("postgres:17", driver="asyncpg")
    for container in (nats, pg):
        container.start()
        stack.append(container)
    return Infra(nats_url=nats.nats_uri(), database_url=pg.get_connection_url())


@pytest.fixture(scope="session")
def infra() -> Iterator[Infra]:
    """A real NATS with JetStream and a real PostgreSQL for the whole session."""
    started: list[object] = []
    try:
        if os.environ.get("FLOWMESH_TEST_INFRA") == "docker":
            yield _docker_infra(started)
            return
        from flowmesh.cli.embedded import start_nats, start_postgres
        from flowmesh.runtime.testing import Infra

        # not under pytest's numbered temp dirs: another session on the machine prunes those, and
        # would delete the data of servers this session still runs
        root = Path(tempfile.mkdtemp(prefix="flowmesh-test-infra-"))
        started.append(root)
        nats_url = os.environ.get("NATS_URL")
        if not nats_url:
            nats = start_nats(root / "nats")
            started.append(nats)
            nats_url = nats.url
        database_url = os.environ.get("DATABASE_URL")
        if not database_url:
            pg = start_postgres(root / "postgres")
            started.append(pg)
            database_url = pg.url
        yield Infra(nats_url=nats_url, database_url=database_url)
    finally:
        for server in reversed(started):
            if isinstance(server, Path):
                shutil.rmtree(server, ignore_errors=True)
            else:
                server.stop()  # type: ignore[attr-defined]
