"""The ``flowmesh`` command: ``flowmesh dev`` runs the whole stack locally, ``flowmesh token`` mints JWTs."""

from __future__ import annotations

import asyncio
import functools
import os
import sys
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Final, NoReturn, TypeVar

import typer

from flowmesh.cli.embedded import free_port, start_nats
from flowmesh.cli.launch import Launch, dev_token, port_is_free, redact
from flowmesh.cli.natsconf import render_auth_config
from flowmesh.cli.supervisor import ServiceSpec
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
DEV_HEALTH_PORT_OFFSETS: Final = {"flows": 1, "runner": 2, "scheduler": 3, "usage": 4}
"""Under ``flowmesh dev`` a service's health port (``/metrics``) is the HTTP port plus this (8081 … 8084 by
default, what deploy/observability/prometheus.yml scrapes), or any free port when that one is taken."""
"""The services ``flowmesh dev`` runs, each as ``python -m flowmesh.<name>``."""
DEFAULT_DATA_DIR: Final = ".flowmesh"
DEFAULT_HTTP_PORT: Final = 8080
READY_TIMEOUT: Final = 120.0
MAX_DEV_RUNNERS: Final = 16


def default_runners() -> int:
    """Runner processes ``flowmesh dev`` starts: one per CPU, at most four.

    A run's steps are executed, and its changes written, by the runner; one Python process uses one
    core, and the other services are mostly idle while runs execute. So a laptop's first measurement
    gets what ``make bench`` gets (two replicas on two cores). Beyond four, PostgreSQL and NATS are
    what the extra cores are needed for.
    """
    return max(1, min(os.cpu_count() or 1, 4))


"""Seconds ``flowmesh dev`` reports progress while waiting for the gateway's ``/readyz``."""

_TRUE = frozenset({"1", "true", "yes", "on"})
_Config = TypeVar("_Config")

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
        runners: Runner processes (replicas of the runner service).
        ready_timeout: Seconds of progress reports while waiting for the gateway.
    """

    data_dir: Path
    nats_url: str | None = None
    database_url: str | None = None
    http_port: int = DEFAULT_HTTP_PORT
    jwt_secret: str | None = None
    nats_sync_always: bool = False
    runners: int = field(default_factory=default_runners)
    ready_timeout: float = READY_TIMEOUT

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> DevConfig:
        """Read the configuration from the environment variables ``flowmesh dev`` documents.

        Args:
            environ: Variables to read; ``os.environ`` when None.

        Returns:
            The configuration, ``data_dir`` made absolute.

        Raises:
            ValueError: ``FLOWMESH_HTTP_PORT`` is not a port number, or ``FLOWMESH_DEV_RUNNERS`` not a
                count of runner processes.
        """
        env = os.environ if environ is None else environ
        raw_port = env.get("FLOWMESH_HTTP_PORT") or str(DEFAULT_HTTP_PORT)
        try:
            http_port = int(raw_port)
        except ValueError:
            raise ValueError(f"FLOWMESH_HTTP_PORT must be a port number, not {raw_port!r}") from None
        if not 0 < http_port < 65536:
            raise ValueError(f"FLOWMESH_HTTP_PORT must be between 1 and 65535, not {http_port}")
        raw_runners = env.get("FLOWMESH_DEV_RUNNERS") or str(default_runners())
        if not raw_runners.strip().isdigit() or not 1 <= int(raw_runners) <= MAX_DEV_RUNNERS:
            raise ValueError(
                f"FLOWMESH_DEV_RUNNERS must be a number of runner processes from 1 to {MAX_DEV_RUNNERS}, "
                f"not {raw_runners!r}"
            )
        return cls(
            data_dir=Path(env.get("FLOWMESH_DATA_DIR") or DEFAULT_DATA_DIR).expanduser().resolve(),
            nats_url=env.get("NATS_URL") or None,
            database_url=env.get("DATABASE_URL") or None,
            http_port=http_port,
            jwt_secret=env.get("FLOWMESH_JWT_SECRET") or None,
            nats_sync_always=env.get("FLOWMESH_NATS_SYNC_ALWAYS", "").strip().lower() in _TRUE,
            runners=int(raw_runners),
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
    cmds = service_commands() if commands is None else commands
    launch = Launch(list(cmds))
    return await launch.run(lambda: _start_dev(launch, config, cmds))


async def _start_dev(launch: Launch, config: DevConfig, cmds: Mapping[str, Sequence[str]]) -> int | None:
    """Start the servers that are not configured, then the services; an exit code when it gives up."""
    config.data_dir.mkdir(parents=True, exist_ok=True)
    if not port_is_free(config.http_port):
        return launch.busy_port(config.http_port)
    nats_url = config.nats_url
    if nats_url is None:
        sync_always = config.nats_sync_always
        nats = await launch.start_server(
            "NATS" + (" (sync always)" if sync_always else ""),
            lambda: start_nats(config.data_dir / "nats", sync_always=sync_always, own_process_group=True),
        )
        nats_url = nats.url
    database_url = await launch.database_url(config.database_url, config.data_dir / "postgres")
    jwt_secret = config.jwt_secret or load_or_create_jwt_secret(config.data_dir)
    processes = dev_processes(cmds, runners=config.runners)
    health_ports = dev_health_ports(config.http_port, processes)
    await launch.supervise(_dev_specs(config, processes, nats_url, database_url, jwt_secret, health_ports))
    ready = functools.partial(_dev_ready_lines, config, nats_url, database_url, jwt_secret, health_ports)
    launch.announce_when_ready(config.http_port, ready, timeout=config.ready_timeout)
    return None


def dev_processes(cmds: Mapping[str, Sequence[str]], *, runners: int) -> dict[str, tuple[str, Sequence[str]]]:
    """The processes to start, by name: each service's, and ``runner-2`` … for more runners.

    Returns:
        Process name -> (service name, command line).
    """
    processes: dict[str, tuple[str, Sequence[str]]] = {}
    for service, argv in cmds.items():
        processes[service] = (service, argv)
        if service == "runner":
            processes.update({f"runner-{i}": (service, argv) for i in range(2, runners + 1)})
    return processes


def dev_health_ports(http_port: int, names: Iterable[str]) -> dict[str, int]:
    """The health port of each service but the gateway: the HTTP port plus its offset, else a free port."""
    ports: dict[str, int] = {}
    for name in names:
        if name == "gateway":
            continue
        wanted = http_port + DEV_HEALTH_PORT_OFFSETS.get(name, 0)
        fixed = name in DEV_HEALTH_PORT_OFFSETS and wanted <= 65535 and port_is_free(wanted)
        ports[name] = wanted if fixed else free_port()
    return ports


def _dev_specs(
    config: DevConfig,
    processes: Mapping[str, tuple[str, Sequence[str]]],
    nats_url: str,
    database_url: str,
    jwt_secret: str,
    health_ports: Mapping[str, int],
) -> list[ServiceSpec]:
    """The processes of :func:`dev_processes`, each with a health port of its own (the gateway's is its API port)."""
    return [
        ServiceSpec(
            name=name,
            argv=list(argv),
            env=service_env(
                service,
                base=os.environ,
                config=config,
                nats_url=nats_url,
                database_url=database_url,
                jwt_secret=jwt_secret,
                health_port=health_ports.get(name),
            ),
        )
        for name, (service, argv) in processes.items()
    ]


def _dev_ready_lines(
    config: DevConfig, nats_url: str, database_url: str, jwt_secret: str, health_ports: Mapping[str, int]
) -> list[str]:
    """What ``flowmesh dev`` prints once the gateway is ready: where everything is, and a token."""
    metrics = ", ".join(f"{name} :{port}" for name, port in health_ports.items())
    return [
        "ready",
        f"  gateway     http://127.0.0.1:{config.http_port}",
        f"  metrics     /metrics on the gateway and on {metrics}",
        f"  NATS        {redact(nats_url)}",
        f"  PostgreSQL  {redact(database_url)}",
        f"  data        {config.data_dir}",
        "  dev token (sub dev, tenant dev, role admin, 24 h):",
        f"  {dev_token(jwt_secret)}",
        "  Ctrl-C stops everything",
    ]


@app.command()
def dev() -> None:
    """Run the whole stack locally: embedded NATS and PostgreSQL, and the five services.

    Configuration comes from the environment: FLOWMESH_DATA_DIR (default .flowmesh),
    NATS_URL and DATABASE_URL (use existing servers instead of embedded ones),
    FLOWMESH_HTTP_PORT (default 8080), FLOWMESH_JWT_SECRET (default: generated once into
    the file jwt-secret in the data dir), FLOWMESH_NATS_SYNC_ALWAYS (embedded NATS fsyncs
    every write), FLOWMESH_DEV_RUNNERS (runner processes; default one per CPU, at most 4:
    the runner executes the steps, one core each).

    Services that exit are restarted with backoff. Ctrl-C (or SIGTERM) stops everything.
    """
    _run_command(DevConfig.from_env, run_dev)


def _run_command(read_config: Callable[[], _Config], run: Callable[[_Config], Coroutine[Any, Any, int]]) -> NoReturn:
    """Read a command's configuration from the environment, run the command, and exit with its code.

    A configuration that cannot be read is a usage error: exit code 2, as typer gives for bad options.
    """
    try:
        config = read_config()
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise typer.Exit(2) from None
    raise typer.Exit(asyncio.run(run(config)))


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

    _run_command(ClusterConfig.from_env, run_cluster)


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
