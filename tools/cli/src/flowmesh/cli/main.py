"""The ``flowmesh`` command: ``flowmesh dev`` runs the whole stack locally, ``flowmesh token`` mints JWTs."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Final, TextIO, TypeVar
from urllib.parse import urlsplit, urlunsplit

import typer

from flowmesh.cli.embedded import (
    EmbeddedNats,
    EmbeddedPostgres,
    EmbeddedServerError,
    free_port,
    start_nats,
    start_postgres,
)
from flowmesh.cli.front import http_status
from flowmesh.cli.natsconf import render_auth_config
from flowmesh.cli.supervisor import (
    SUPERVISOR_COLOUR,
    SUPERVISOR_NAME,
    ServiceSpec,
    Supervisor,
    colour_enabled,
    prefix,
    prefix_width,
)
from flowmesh.cli.tokens import (
    DEFAULT_AUDIENCE,
    DEFAULT_ISSUER,
    JWT_SECRET_FILE,
    Role,
    load_jwt_secret,
    load_or_create_jwt_secret,
    mint_token,
)

__all__ = ["SERVICES", "DevConfig", "app", "run_dev", "service_commands"]

SERVICES: Final = ("gateway", "flows", "runner", "scheduler", "usage")
"""The services ``flowmesh dev`` runs, each as ``python -m flowmesh.<name>``."""
DEFAULT_DATA_DIR: Final = ".flowmesh"
DEFAULT_HTTP_PORT: Final = 8080
READY_TIMEOUT: Final = 120.0
"""Seconds ``flowmesh dev`` reports progress while waiting for the gateway's ``/readyz``."""
DEV_TOKEN_TTL: Final = 24 * 3600

_TRUE = frozenset({"1", "true", "yes", "on"})
_T = TypeVar("_T")

app = typer.Typer(
    name="flowmesh",
    help="Flowmesh: workflow automation as a mesh of small services over NATS and PostgreSQL.",
    no_args_is_help=True,
    add_completion=False,
    # Markdown joins a docstring's wrapped lines into paragraphs, as the terminal width allows.
    rich_markup_mode="markdown",
)


# --------------------------------------------------------------------------------------------------
# flowmesh dev


@dataclass(frozen=True)
class DevConfig:
    """What ``flowmesh dev`` runs against; None URLs mean "start an embedded server".

    Attributes:
        data_dir: Absolute data dir (embedded servers' data, logs, the dev JWT secret).
        nats_url: Existing NATS server(s), or None for embedded NATS.
        database_url: Existing PostgreSQL, or None for embedded PostgreSQL.
        http_port: Gateway port.
        jwt_secret: HS256 secret, or None to use (and create) the data dir's ``jwt-secret``.
        nats_sync_always: Embedded NATS fsyncs every write.
        ready_timeout: Seconds of progress reports while waiting for the gateway.
    """

    data_dir: Path
    nats_url: str | None = None
    database_url: str | None = None
    http_port: int = DEFAULT_HTTP_PORT
    jwt_secret: str | None = None
    nats_sync_always: bool = False
    ready_timeout: float = READY_TIMEOUT

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> DevConfig:
        """Read the configuration from environment variables (DESIGN.md section 10).

        Args:
            environ: Variables to read; ``os.environ`` when None.

        Returns:
            The configuration, ``data_dir`` made absolute.

        Raises:
            ValueError: ``FLOWMESH_HTTP_PORT`` is not a port number.
        """
        env = os.environ if environ is None else environ
        raw_port = env.get("FLOWMESH_HTTP_PORT") or str(DEFAULT_HTTP_PORT)
        try:
            http_port = int(raw_port)
        except ValueError:
            raise ValueError(f"FLOWMESH_HTTP_PORT must be a port number, not {raw_port!r}") from None
        if not 0 < http_port < 65536:
            raise ValueError(f"FLOWMESH_HTTP_PORT must be between 1 and 65535, not {http_port}")
        return cls(
            data_dir=Path(env.get("FLOWMESH_DATA_DIR") or DEFAULT_DATA_DIR).expanduser().resolve(),
            nats_url=env.get("NATS_URL") or None,
            database_url=env.get("DATABASE_URL") or None,
            http_port=http_port,
            jwt_secret=env.get("FLOWMESH_JWT_SECRET") or None,
            nats_sync_always=env.get("FLOWMESH_NATS_SYNC_ALWAYS", "").strip().lower() in _TRUE,
        )


def service_commands() -> dict[str, list[str]]:
    """The command line of each service: ``<this python> -m flowmesh.<name>``."""
    return {name: [sys.executable, "-m", f"flowmesh.{name}"] for name in SERVICES}


def service_env(
    name: str,
    *,
    base: Mapping[str, str],
    config: DevConfig,
    nats_url: str,
    database_url: str,
    jwt_secret: str,
    health_port: int | None,
) -> dict[str, str]:
    """The environment of one service under ``flowmesh dev``.

    Args:
        name: Service name.
        base: Inherited variables (normally ``os.environ``).
        config: The dev configuration.
        nats_url: NATS URL(s) the services use.
        database_url: PostgreSQL URL the services use.
        jwt_secret: HS256 secret.
        health_port: Port of the service's health server; unused for the gateway.

    Returns:
        ``base`` plus the Flowmesh settings.
    """
    env = dict(base)
    env.update(
        {
            "FLOWMESH_ENV": "dev",
            "NATS_URL": nats_url,
            "DATABASE_URL": database_url,
            "FLOWMESH_DATA_DIR": str(config.data_dir),
            "FLOWMESH_JWT_SECRET": jwt_secret,
            "FLOWMESH_HTTP_HOST": "127.0.0.1",
            "FLOWMESH_LOG_FORMAT": "text",
            # Piped stdout is block-buffered otherwise, and log lines would show up late.
            "PYTHONUNBUFFERED": "1",
        }
    )
    # a laptop's tenants start without plan limits (the free plan allows one flow); set it to try them
    env.setdefault("FLOWMESH_DEFAULT_PLAN", "enterprise")
    if name == "gateway":
        env["FLOWMESH_HTTP_PORT"] = str(config.http_port)
    elif health_port is not None:
        env[f"FLOWMESH_{name.upper()}_HEALTH_PORT"] = str(health_port)
    return env


def _redact(url: str) -> str:
    """Hide the password of a URL that is about to be printed."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As aiohttp does: a port in TIME_WAIT is usable, one with a listener is not.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


class _Console:
    """Lines from ``flowmesh dev`` itself, lined up with the services' output."""

    def __init__(self, names: Sequence[str]) -> None:
        self.supervisor: Supervisor | None = None
        self._width = prefix_width(names)

    def say(self, message: str) -> None:
        if self.supervisor is not None:
            self.supervisor.log(message)
        else:
            self._print(message, sys.stdout)

    def error(self, message: str) -> None:
        self._print(f"error: {message}", sys.stderr)

    def _print(self, message: str, stream: TextIO) -> None:
        colour = SUPERVISOR_COLOUR if colour_enabled(stream) else None
        print(prefix(SUPERVISOR_NAME, width=self._width, colour=colour) + message, file=stream, flush=True)


async def _wait_until_ready(
    port: int,
    ready_timeout: float,
    console: _Console,
    announce: Callable[[], None],
    stopping: asyncio.Event,
    *,
    what: str = "the gateway",
) -> None:
    """Poll ``/readyz`` on ``port`` until 200, reporting progress, then call ``announce``."""
    started = time.monotonic()
    next_report = started + 5
    warned = False
    while not stopping.is_set():
        if await http_status(port, "/readyz", timeout=2.0) == 200:
            announce()
            return
        now = time.monotonic()
        waited = now - started
        if waited >= ready_timeout and not warned:
            warned = True
            console.say(
                f"{what} is still not ready after {waited:.0f} s; see the logs above "
                "(still supervising, and will report when it is ready)"
            )
        elif now >= next_report and not warned:
            next_report = now + 5
            console.say(f"waiting for http://127.0.0.1:{port}/readyz ({waited:.0f} s)")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), 0.25 if waited < 10 else 1.0)


def _dev_token(jwt_secret: str) -> str:
    """The token ``flowmesh dev`` prints: sub and tenant ``dev``, role admin, valid 24 h."""
    return mint_token(
        jwt_secret,
        sub="dev",
        tenant="dev",
        role="admin",
        ttl=DEV_TOKEN_TTL,
        issuer=os.environ.get("FLOWMESH_JWT_ISSUER") or DEFAULT_ISSUER,
        audience=os.environ.get("FLOWMESH_JWT_AUDIENCE") or DEFAULT_AUDIENCE,
    )


async def _start_server(console: _Console, what: str, start: Callable[[], _T]) -> _T:
    """Start an embedded server in a thread, so the loop keeps handling signals meanwhile."""
    console.say(f"starting embedded {what}")
    began = time.monotonic()
    server = await asyncio.to_thread(start)
    console.say(f"embedded {what} ready in {time.monotonic() - began:.2f} s")
    return server


async def run_dev(config: DevConfig, *, commands: Mapping[str, Sequence[str]] | None = None) -> int:
    """Run the dev stack until SIGINT, SIGTERM or SIGHUP; then stop everything it started.

    Starts embedded NATS and/or PostgreSQL unless URLs are configured, the services under a
    ``Supervisor``, waits for the gateway's ``/readyz``, then prints the URLs and a dev token.

    Args:
        config: What to run against.
        commands: Command line per service; ``service_commands()`` when None.

    Returns:
        The process exit code: 0 after a requested stop, 1 if startup failed.
    """
    # The embedded servers run in process groups of their own: a Ctrl-C reaches this process and
    # the services, and the servers stay up until the services have shut down against them.
    cmds = service_commands() if commands is None else commands
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    console = _Console(list(cmds))
    stop_signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def on_signal(sig: signal.Signals) -> None:
        if not stopping.is_set():
            console.say(f"{sig.name} received, stopping")
        stopping.set()

    for sig in stop_signals:
        loop.add_signal_handler(sig, on_signal, sig)

    nats: EmbeddedNats | None = None
    postgres: EmbeddedPostgres | None = None
    supervisor: Supervisor | None = None
    ready: asyncio.Task[None] | None = None
    try:
        config.data_dir.mkdir(parents=True, exist_ok=True)
        if not _port_is_free(config.http_port):
            console.error(
                f"port {config.http_port} on 127.0.0.1 is in use; stop what listens there or set FLOWMESH_HTTP_PORT"
            )
            return 1
        nats_url = config.nats_url
        if nats_url is None:
            sync_always = config.nats_sync_always
            nats = await _start_server(
                console,
                "NATS" + (" (sync always)" if sync_always else ""),
                lambda: start_nats(config.data_dir / "nats", sync_always=sync_always, own_process_group=True),
            )
            nats_url = nats.url
        if stopping.is_set():
            return 0
        database_url = config.database_url
        if database_url is None:
            postgres = await _start_server(
                console, "PostgreSQL", lambda: start_postgres(config.data_dir / "postgres", own_process_group=True)
            )
            database_url = postgres.url
        if stopping.is_set():
            return 0
        jwt_secret = config.jwt_secret or load_or_create_jwt_secret(config.data_dir)

        specs = [
            ServiceSpec(
                name=name,
                argv=list(argv),
                env=service_env(
                    name,
                    base=os.environ,
                    config=config,
                    nats_url=nats_url,
                    database_url=database_url,
                    jwt_secret=jwt_secret,
                    health_port=None if name == "gateway" else free_port(),
                ),
            )
            for name, argv in cmds.items()
        ]
        supervisor = Supervisor(specs, colour=colour_enabled(sys.stdout))
        console.supervisor = supervisor
        await supervisor.start()

        def announce() -> None:
            token = _dev_token(jwt_secret)
            for line in (
                "ready",
                f"  gateway     http://127.0.0.1:{config.http_port}",
                f"  NATS        {_redact(nats_url)}",
                f"  PostgreSQL  {_redact(database_url)}",
                f"  data        {config.data_dir}",
                "  dev token (sub dev, tenant dev, role admin, 24 h):",
                f"  {token}",
                "  Ctrl-C stops everything",
            ):
                console.say(line)

        ready = asyncio.create_task(
            _wait_until_ready(config.http_port, config.ready_timeout, console, announce, stopping)
        )
        await stopping.wait()
        return 0
    except EmbeddedServerError as exc:
        if stopping.is_set():
            # A Ctrl-C sent to the whole process group also stopped the server being started.
            return 0
        console.error(str(exc))
        return 1
    finally:
        if ready is not None:
            ready.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ready
        # Services first, while the servers they talk to are still up; then the servers.
        if supervisor is not None:
            await supervisor.stop()
        if postgres is not None:
            await asyncio.to_thread(postgres.stop)
        if nats is not None:
            await asyncio.to_thread(nats.stop)
        if supervisor is not None or postgres is not None or nats is not None:
            console.say("stopped")
        for sig in stop_signals:
            loop.remove_signal_handler(sig)


@app.command()
def dev() -> None:
    """Run the whole stack locally: embedded NATS and PostgreSQL, and the five services.

    Configuration comes from the environment: FLOWMESH_DATA_DIR (default .flowmesh),
    NATS_URL and DATABASE_URL (use existing servers instead of embedded ones),
    FLOWMESH_HTTP_PORT (default 8080), FLOWMESH_JWT_SECRET (default: generated once into
    the file jwt-secret in the data dir), FLOWMESH_NATS_SYNC_ALWAYS (embedded NATS fsyncs
    every write).

    Services that exit are restarted with backoff. Ctrl-C (or SIGTERM) stops everything.
    """
    try:
        config = DevConfig.from_env()
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise typer.Exit(2) from None
    raise typer.Exit(asyncio.run(run_dev(config)))


# --------------------------------------------------------------------------------------------------
# flowmesh cluster


@app.command()
def cluster() -> None:
    """Run the distributed shape locally: 3 NATS nodes, 2 replicas per service, a front.

    A 3-node NATS cluster, PostgreSQL, two replicas of every service, and a front on
    FLOWMESH_HTTP_PORT spreading connections over the gateways; data under
    FLOWMESH_DATA_DIR/cluster.

    Every stream has 3 replicas, so the loss of any one NATS node is survived. Anonymous NATS
    clients are refused: each service connects as its own user, with a password generated once
    into cluster/nats-passwords.json in the data dir; tenants in FLOWMESH_CLUSTER_INTEGRATORS
    (comma-separated, default dev) get an integrator user, printed at the end with the URLs and a
    dev token.

    Also read: FLOWMESH_DATA_DIR (default .flowmesh), FLOWMESH_HTTP_PORT (default 8080),
    DATABASE_URL (an existing PostgreSQL instead of the embedded one), FLOWMESH_JWT_SECRET
    (default: the data dir's jwt-secret, as for flowmesh dev), FLOWMESH_NATS_SYNC_ALWAYS.
    NATS_URL is ignored: the cluster always runs its own nodes.

    Services that exit are restarted with backoff. Ctrl-C (or SIGTERM) stops everything:
    services first, then PostgreSQL, then the NATS nodes.
    """
    # Imported here: cluster.py builds on this module's pieces.
    from flowmesh.cli.cluster import ClusterConfig, run_cluster

    try:
        config = ClusterConfig.from_env()
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise typer.Exit(2) from None
    raise typer.Exit(asyncio.run(run_cluster(config)))


# --------------------------------------------------------------------------------------------------
# flowmesh token


@app.command()
def token(
    sub: Annotated[str, typer.Option(help="User id (the sub claim).")] = "dev",
    tenant: Annotated[
        str | None, typer.Option(help="Tenant id (the tenant claim); defaults to --sub.", show_default=False)
    ] = None,
    role: Annotated[Role, typer.Option(help="member, or admin (platform operator).")] = "member",
    ttl: Annotated[int, typer.Option(help="Lifetime in seconds.", min=1)] = 3600,
    secret: Annotated[
        str | None,
        typer.Option(
            help="HS256 secret; else FLOWMESH_JWT_SECRET, else the data dir's jwt-secret file.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Print an HS256 JWT for the gateway, signed with the dev secret.

    The iss and aud claims come from FLOWMESH_JWT_ISSUER and FLOWMESH_JWT_AUDIENCE (default
    flowmesh).
    """
    data_dir = Path(os.environ.get("FLOWMESH_DATA_DIR") or DEFAULT_DATA_DIR).expanduser()
    key = secret or os.environ.get("FLOWMESH_JWT_SECRET") or load_jwt_secret(data_dir)
    if not key:
        print(
            f"error: no JWT secret. Pass --secret, set FLOWMESH_JWT_SECRET, or run `flowmesh dev` once "
            f"to create {data_dir / JWT_SECRET_FILE} (set FLOWMESH_DATA_DIR if your data dir is elsewhere).",
            file=sys.stderr,
        )
        raise typer.Exit(2)
    print(
        mint_token(
            key,
            sub=sub,
            tenant=tenant,
            role=role,
            ttl=ttl,
            issuer=os.environ.get("FLOWMESH_JWT_ISSUER") or DEFAULT_ISSUER,
            audience=os.environ.get("FLOWMESH_JWT_AUDIENCE") or DEFAULT_AUDIENCE,
        )
    )


# --------------------------------------------------------------------------------------------------
# flowmesh nats-config


@app.command("nats-config")
def nats_config(
    integrator: Annotated[
        list[str] | None,
        typer.Option(
            help="Tenant id that gets an integrator user, `integrator-TENANT`; repeatable.", show_default=False
        ),
    ] = None,
) -> None:
    """Print the NATS server's users and permissions (an `accounts` block to include).

    One user per service and per integrator, each allowed only the subjects it needs, derived from
    flowmesh.contracts.permissions; deploy/nats/flowmesh-auth.conf is this output with no
    integrators. Passwords are read by nats-server from its environment, one variable per user:
    `FM_NATS_PASSWORD_GATEWAY`, …, `FM_NATS_PASSWORD_INTEGRATOR_ACME`.
    """
    tenants = integrator or []
    for tenant in tenants:
        if not tenant.strip():
            print("error: --integrator needs a tenant id", file=sys.stderr)
            raise typer.Exit(2)
    print(render_auth_config(tenants), end="")
