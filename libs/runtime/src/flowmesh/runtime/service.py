"""The life of a NATS-only service process: connect, migrate, serve, and stop gracefully.

``ServiceRuntime.running()`` is what both ``python -m flowmesh.<name>`` and in-process tests use:
logs, database engine and migrations, broker (FastStream subscribers) and streams, health server.
On SIGTERM/SIGINT the broker stops taking messages, in-flight handlers finish (or their JetStream
messages are handed back by not being acked), then connections close.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from flowmesh.contracts import subjects
from flowmesh.runtime.db import create_engine, create_sessionmaker
from flowmesh.runtime.health import HealthServer
from flowmesh.runtime.logs import configure_logging
from flowmesh.runtime.memory import freeze_startup_objects
from flowmesh.runtime.migrate import migrate
from flowmesh.runtime.nats import create_broker, provision_streams, stop_broker
from flowmesh.runtime.rpc import RpcContext, RpcServer
from flowmesh.runtime.settings import BaseServiceSettings

log = logging.getLogger(__name__)

Hook = Callable[[], Awaitable[None]]


class ServiceRuntime:
    """What one service process holds: settings, broker, database, health server."""

    def __init__(self, name: str, settings: BaseServiceSettings, *, migrations: Path | None) -> None:
        self.name = name
        self.settings = settings
        self.schema = name
        self.migrations = migrations
        self.broker = create_broker(settings.nats_url, name=name)
        self.rpc = RpcServer(self.broker, name)
        # the engine connects lazily: nothing opens before running()
        self._engine: AsyncEngine | None = None
        self._sessions: async_sessionmaker[AsyncSession] | None = None
        if migrations is not None:
            self._engine = create_engine(settings.db_url, pool_size=settings.db_pool_size, application_name=name)
            self._sessions = create_sessionmaker(self._engine)
        self._on_start: list[Hook] = []
        self._on_stop: list[Hook] = []
        self.health: HealthServer | None = None

        if name in subjects.RPC_PREFIXES:

            @self.rpc.handler(subjects.ping(name), tenant_required=False)
            async def ping(_: RpcContext, __: Any) -> dict[str, str]:
                return {"service": name}

    @property
    def sessions(self) -> async_sessionmaker[AsyncSession]:
        """The session factory of this service's schema."""
        if self._sessions is None:
            raise RuntimeError(f"{self.name} has no database")
        return self._sessions

    def on_start(self, hook: Hook) -> Hook:
        """Run ``hook`` once connected and migrated, before taking messages."""
        self._on_start.append(hook)
        return hook

    def on_stop(self, hook: Hook) -> Hook:
        """Run ``hook`` after the broker stopped taking messages."""
        self._on_stop.append(hook)
        return hook

    async def _ready(self) -> dict[str, bool]:
        checks = {"nats": self.broker.connection is not None and self.broker.connection.is_connected}
        if self._engine is not None:
            try:
                async with asyncio.timeout(1), self._engine.connect() as conn:
                    await conn.execute(text("SELECT 1"))
                checks["postgres"] = True
            except Exception:
                checks["postgres"] = False
        return checks

    @contextlib.asynccontextmanager
    async def running(self, *, health: bool = True) -> AsyncIterator[ServiceRuntime]:
        """Connect, migrate, subscribe and serve until the block exits; then stop gracefully."""
        s = self.settings
        if self._engine is not None and self.migrations is not None:
            await migrate(self._engine, schema=self.schema, script_location=self.migrations)
        try:
            await self.broker.connect()
            await provision_streams(self.broker.connection.jetstream())
            for hook in self._on_start:
                await hook()
            await self.broker.start()
            await self.rpc.start()
            # a PING round trip: the server has every subscription before we call ourselves ready
            await self.broker.connection.flush()
            if health:
                self.health = HealthServer(self._ready, host=s.health_host, port=s.health_port)
                await self.health.start()
            freeze_startup_objects()
            log.info("%s ready (nats %s)", self.name, s.nats_url)
            yield self
        finally:
            log.info("%s stopping", self.name)
            if self.health is not None:
                await self.health.stop()
            await self.rpc.stop()
            await stop_broker(self.broker)
            for hook in reversed(self._on_stop):
                await hook()
            if self._engine is not None:
                await self._engine.dispose()
            log.info("%s stopped", self.name)

    async def serve(self) -> None:
        """Run until SIGTERM or SIGINT."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        async with self.running():
            await stop.wait()


def main(build: Callable[[], ServiceRuntime]) -> None:
    """Entry point of ``python -m flowmesh.<name>``: configure logs, build the service, serve."""
    service = build()
    configure_logging(service.name, level=service.settings.log_level, fmt=service.settings.log_format)
    asyncio.run(service.serve())
