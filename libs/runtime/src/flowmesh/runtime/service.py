"""The life of a NATS-only service process: connect, migrate, serve, and stop gracefully.

``ServiceRuntime.running()`` is what both ``python -m flowmesh.<name>`` and in-process tests use:
logs, database pool and migrations, broker, RPC server, durable consumers and streams, health
server, and the service's own resources. On SIGTERM/SIGINT requests and consumers stop taking
messages, in-flight handlers finish (or their JetStream messages are handed back by not being
acked), resources stop in reverse order, then connections close.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import nats.errors
from faststream.nats import NatsBroker
from nats.js import JetStreamContext
from pydantic import ValidationError

from flowmesh.contracts import subjects
from flowmesh.runtime.consumers import Consumers
from flowmesh.runtime.health import HealthServer
from flowmesh.runtime.lifecycle import Job, hooks, once, periodic
from flowmesh.runtime.logs import configure_logging
from flowmesh.runtime.loop import run
from flowmesh.runtime.memory import freeze_startup_objects
from flowmesh.runtime.nats import (
    NatsRefusals,
    create_broker,
    provision_streams,
    server_authenticates,
    stop_broker,
)
from flowmesh.runtime.rpc import RpcContext, RpcServer
from flowmesh.runtime.settings import BaseServiceSettings
from flowmesh.runtime.tracing import configure_tracing, shutdown_tracing

if TYPE_CHECKING:
    # asyncpg loads with a service's database (below): the gateway, which has none and imports this
    # module's helpers, does not carry it
    from flowmesh.runtime.db import Database

log = logging.getLogger(__name__)

Hook = Callable[[], Awaitable[None]]
ResourceFactory = Callable[[], AbstractAsyncContextManager[Any]]
_F = TypeVar("_F", bound=ResourceFactory)


class ServiceRuntime:
    """What one service process holds: settings, broker, database, health server."""

    def __init__(self, name: str, settings: BaseServiceSettings, *, migrations: Path | None) -> None:
        self.name = name
        self.settings = settings
        self.schema = name
        self.migrations = migrations
        login = settings.nats_login
        self.refusals = NatsRefusals(login.user or name)
        self.broker = create_broker(settings.nats_url, name=name, login=login, refusals=self.refusals)
        self.rpc = RpcServer(self.broker, name)
        self.consumers = Consumers(name, lag_interval_s=settings.metrics_interval_s)
        # the pool opens in running(), not before
        self._db: Database | None = None
        if migrations is not None:
            from flowmesh.runtime.db import Database

            self._db = Database(settings.db_url, size=settings.db_pool_size, application_name=name)
        self._resources: list[ResourceFactory] = []
        self.health: HealthServer | None = None

        if name in subjects.RPC_PREFIXES:

            @self.rpc.handler(subjects.ping(name), tenant_required=False)
            async def ping(_: RpcContext, __: Any) -> dict[str, str]:
                return {"service": name}

    @property
    def db(self) -> Database:
        """This service's database pool (open from start to stop)."""
        if self._db is None:
            raise RuntimeError(f"{self.name} has no database")
        return self._db

    @property
    def js(self) -> JetStreamContext:
        """A JetStream context on the service's connection (once connected: in resources and handlers)."""
        return self.broker.connection.jetstream()

    def resource(self, factory: _F) -> _F:
        """Enter ``factory()`` once connected and migrated, before taking messages; leave it at stop.

        Resources are entered in the order they were declared and left in reverse, after the
        broker stopped taking messages; one whose entry failed (and those after it) is not left.
        Usable as a decorator on an ``asynccontextmanager`` function.
        """
        self._resources.append(factory)
        return factory

    def every(self, seconds: float, fn: Job, *, name: str, wait_first: bool = False) -> None:
        """Call ``fn`` at start (or ``seconds`` after it, with ``wait_first``) and every ``seconds``
        after, until stop (a failure is logged, tried again)."""
        self.resource(lambda: periodic(seconds, fn, name=name, wait_first=wait_first))

    def background(self, fn: Job, *, name: str) -> None:
        """Call ``fn`` once in the background after start (cancelled by stop; a failure is logged)."""
        self.resource(lambda: once(fn, name=name))

    def on_start(self, hook: Hook) -> Hook:
        """Run ``hook`` once connected and migrated, before taking messages (a resource with no stop)."""
        self.resource(lambda: hooks(start=hook))
        return hook

    def on_stop(self, hook: Hook) -> Hook:
        """Run ``hook`` after the broker stopped taking messages (a resource with no start)."""
        self.resource(lambda: hooks(stop=hook))
        return hook

    async def _ready(self) -> dict[str, bool]:
        checks = {"nats": self.broker.connection is not None and self.broker.connection.is_connected}
        if self._db is not None:
            try:
                async with asyncio.timeout(1):
                    await self._db.ping()
                checks["postgres"] = True
            except Exception:
                checks["postgres"] = False
        return checks

    @contextlib.asynccontextmanager
    async def running(self, *, health: bool = True) -> AsyncIterator[ServiceRuntime]:
        """Connect, migrate, subscribe and serve until the block exits; then stop gracefully."""
        s = self.settings
        if self._db is not None and self.migrations is not None:
            await self._db.open()
            try:
                await self._migrate(self._db, self.migrations)
            except BaseException:
                await self._db.close()
                raise
        resources = contextlib.AsyncExitStack()
        try:
            async with starting(self.name, s, self.refusals):
                await self.broker.connect()
                check_authenticated(self.broker, s)
                await provision_streams(self.broker.connection.jetstream(), replicas=s.stream_replicas)
                for factory in self._resources:
                    await resources.enter_async_context(factory())
                await self.broker.start()
                await self.consumers.start(s.nats_url, login=s.nats_login, error_cb=self.refusals.on_error)
                await self.rpc.start()
                await settled(self.broker)
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
            await self.consumers.stop()
            await stop_broker(self.broker)
            await resources.aclose()
            if self._db is not None:
                await self._db.close()
            log.info("%s stopped", self.name)

    async def serve(self) -> None:
        """Run until SIGTERM or SIGINT; one that comes while still starting gives up starting."""
        stop = asyncio.Event()
        started = asyncio.Event()
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()

        def on_signal() -> None:
            stop.set()
            if not started.is_set() and task is not None:
                # start-up may be waiting on a NATS or PostgreSQL that is gone (retries, reconnects):
                # a process told to stop must stop all the same
                task.cancel()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal)
        try:
            async with self.running():
                started.set()
                await stop.wait()
        except asyncio.CancelledError:
            if not stop.is_set():
                raise
            log.info("%s stopped while starting", self.name)

    async def _migrate(self, db: Database, migrations: Path) -> None:
        from flowmesh.runtime.migrate import MigrationError, migrate

        try:
            await migrate(db, schema=self.schema, script_location=migrations)
        except MigrationError as exc:
            raise StartupError(str(exc)) from None

    async def migrate_only(self) -> None:
        """Bring the service's schema up to date and return (``python -m flowmesh.<name> migrate``)."""
        if self._db is None or self.migrations is None:
            log.info("%s has no database schema: nothing to migrate", self.name)
            return
        try:
            await self._db.open()
            await self._migrate(self._db, self.migrations)
        finally:
            await self._db.close()
        log.info("%s schema is up to date", self.name)


async def settled(broker: NatsBroker) -> None:
    """Return once the server has every subscription and command sent so far, and answered them.

    Two PING round trips, because nats-py writes a PING straight to the socket, ahead of commands
    still waiting in its pending buffer: after the first PONG those are on their way, and the second
    comes back after the server processed them (and sent any permissions violation they caused).
    """
    await broker.connection.flush()
    await broker.connection.flush()


class StartupError(RuntimeError):
    """A service cannot start as configured; the message says what to change. Exits without a traceback."""


def check_authenticated(broker: NatsBroker, settings: BaseServiceSettings) -> None:
    """Refuse, outside dev, a NATS server that lets anyone in: every subject would be open to all."""
    if settings.is_dev or settings.nats_allow_anonymous or server_authenticates(broker):
        return
    raise StartupError(
        f"the NATS server at {redact_url(settings.nats_url)} does not authenticate its clients: anyone could "
        "read every tenant's run events and call every service. Configure its users from deploy/nats/ "
        "(or set FLOWMESH_NATS_ALLOW_ANONYMOUS=true to accept it anyway)"
    )


@contextlib.asynccontextmanager
async def starting(name: str, settings: BaseServiceSettings, refusals: NatsRefusals) -> AsyncIterator[None]:
    """Turn a failed start into a :class:`StartupError` that names the setting or the subject at fault."""
    try:
        yield
        if refusals.seen:
            raise StartupError(_refused(name, settings, refusals))
    except StartupError:
        raise
    except nats.errors.Error as exc:
        if refusals.seen:
            raise StartupError(_refused(name, settings, refusals)) from None
        if "authorization" in str(exc).lower():
            who = f"user {settings.nats_user!r}" if settings.nats_user else "this service (no credentials set)"
            raise StartupError(
                f"NATS at {redact_url(settings.nats_url)} refused {who}: check FLOWMESH_NATS_USER and "
                "FLOWMESH_NATS_PASSWORD (or FLOWMESH_NATS_CREDS) against the server's users (deploy/nats/)"
            ) from None
        raise StartupError(f"cannot use NATS at {redact_url(settings.nats_url)}: {exc} (NATS_URL)") from None
    except (TimeoutError, OSError) as exc:
        if refusals.seen:
            raise StartupError(_refused(name, settings, refusals)) from None
        raise StartupError(f"cannot use NATS at {redact_url(settings.nats_url)}: {exc!r} (NATS_URL)") from None


def _refused(name: str, settings: BaseServiceSettings, refusals: NatsRefusals) -> str:
    user = settings.nats_user or name
    return (
        f"NATS refused what {name} needs as user {user!r}: {'; '.join(dict.fromkeys(refusals.seen))}. "
        "Give the user the permissions of flowmesh.contracts.permissions (`flowmesh nats-config`, deploy/nats/)"
    )


def redact_url(url: str) -> str:
    """A URL (or comma-separated URLs) with passwords hidden, for messages."""
    return ",".join(re.sub(r"//([^:/@]+):[^@/]*@", r"//\1:***@", u) for u in url.split(","))


USAGE = """usage: python -m flowmesh.{name} [serve | migrate | check]

  serve    connect, migrate the schema, and serve until SIGTERM (the default)
  migrate  bring the service's database schema up to date, then exit (a Kubernetes Job)
  check    read the settings and load the service, then exit: a configuration smoke test

Settings come from environment variables (FLOWMESH_*, NATS_URL, DATABASE_URL); see the README.
"""


def settings_problem(exc: ValidationError) -> str:
    """A settings error as one line per field, named as the environment variable that sets it."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        where = f"{loc.upper()}: " if loc else ""
        lines.append(f"{where}{err['msg'].removeprefix('Value error, ')}")
    return "; ".join(lines)


def main(build: Callable[[], ServiceRuntime], *, argv: list[str] | None = None, name: str = "") -> None:
    """Entry point of ``python -m flowmesh.<name> [serve|migrate|check]``.

    A configuration that cannot work (a missing or placeholder secret, a NATS user without a
    permission it needs) ends the process with a message naming the setting or subject, exit code 2
    for settings and 1 for start-up, and no traceback.
    """
    args = sys.argv[1:] if argv is None else argv
    name = name or _service_name()
    command = args[0] if args else "serve"
    if command in ("-h", "--help", "help"):
        print(USAGE.format(name=name), end="")  # noqa: T201 - the command's own help
        return
    if command not in ("serve", "migrate", "check") or len(args) > 1:
        sys.exit(f"flowmesh.{name}: unknown arguments {' '.join(args)!r}\n\n" + USAGE.format(name=name))
    try:
        service = build()
    except ValidationError as exc:
        sys.exit(f"flowmesh.{name}: invalid configuration: {settings_problem(exc)}")
    configure_logging(service.name, level=service.settings.log_level, fmt=service.settings.log_format)
    if command == "check":
        print(f"{service.name}: configuration OK")  # noqa: T201 - the command's answer
        return
    if command == "serve":
        configure_tracing(service.name)
    try:
        run(service.migrate_only() if command == "migrate" else service.serve(), kind=service.settings.event_loop)
    except StartupError as exc:
        log.error("%s cannot start: %s", service.name, exc)
        sys.exit(1)
    finally:
        shutdown_tracing()


def _service_name() -> str:
    main_module = sys.modules.get("__main__")
    spec = getattr(main_module, "__spec__", None)
    package = getattr(spec, "parent", "") or "service"
    return str(package).rsplit(".", 1)[-1]
