"""``flowmesh cluster``: the distributed shape of a deployment on one machine, without Docker.

Three ``nats-server`` nodes form one cluster (every stream with 3 replicas, so any one node may
die), one PostgreSQL holds the data, every service runs as two replicas connecting to NATS as
its own user, and a front (``flowmesh.cli.front``) on ``FLOWMESH_HTTP_PORT`` spreads connections
over the gateways, as a load balancer would.

Two ways to run it:

* ``run_cluster`` (the command): replicas under the ``Supervisor`` with prefixed logs, restarted
  when they exit; Ctrl-C stops everything.
* ``ClusterShape``, for tests: the same processes started and stopped by PID, logs in files, and
  methods to kill and start replicas and NATS nodes; no CLI process in between.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import functools
import http.client
import json
import os
import secrets
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self, TypeVar

from flowmesh.cli.embedded import (
    EmbeddedNatsCluster,
    EmbeddedPostgres,
    _spawn,
    free_port,
    start_nats_cluster,
    start_postgres,
)
from flowmesh.cli.front import Front
from flowmesh.cli.launch import Launch, dev_token, port_is_free, redact
from flowmesh.cli.main import SERVICES, DevConfig, service_commands, service_env
from flowmesh.cli.natsconf import password_var, render_auth_config
from flowmesh.cli.supervisor import ServiceSpec
from flowmesh.cli.tokens import Role, load_or_create_jwt_secret, mint_token
from flowmesh.contracts.permissions import integrator_user

__all__ = [
    "CLUSTER_DIR",
    "PASSWORDS_FILE",
    "ClusterConfig",
    "ClusterShape",
    "Replica",
    "load_or_create_passwords",
    "plan_replicas",
    "run_cluster",
]

CLUSTER_DIR: Final = "cluster"
"""Directory, inside the data dir, of everything ``flowmesh cluster`` keeps."""
PASSWORDS_FILE: Final = "nats-passwords.json"
"""File, inside the cluster dir, with the NATS users' passwords (mode 0600)."""
DEFAULT_NATS_NODES: Final = 3
DEFAULT_REPLICAS: Final = 2
DEFAULT_INTEGRATORS: Final = ("dev",)
FRONT_HEALTH_PATH: Final = "/readyz?scope=self"
"""What the front asks each gateway: its own readiness (NATS connected, not draining), not the
whole mesh's, so that one service down does not take every gateway out of the rotation."""

_T = TypeVar("_T")


# --------------------------------------------------------------------------------------------------
# The pieces both ways of running share


@dataclass(frozen=True)
class ClusterConfig:
    """What ``flowmesh cluster`` runs.

    Attributes:
        data_dir: Absolute data dir; the cluster keeps its servers' data under ``<data_dir>/cluster``.
        database_url: Existing PostgreSQL, or None for an embedded one.
        http_port: Port of the front.
        jwt_secret: HS256 secret, or None to use (and create) the data dir's ``jwt-secret``.
        integrators: Tenants that get a NATS integrator user.
        nats_nodes: nats-server processes in the cluster.
        replicas: Processes per service.
        nats_sync_always: The NATS nodes fsync every write.
        ready_timeout: Seconds of progress reports while waiting for the front's ``/readyz``.
    """

    data_dir: Path
    database_url: str | None = None
    http_port: int = DevConfig.http_port
    jwt_secret: str | None = None
    integrators: tuple[str, ...] = DEFAULT_INTEGRATORS
    nats_nodes: int = DEFAULT_NATS_NODES
    replicas: int = DEFAULT_REPLICAS
    nats_sync_always: bool = False
    ready_timeout: float = DevConfig.ready_timeout

    @property
    def cluster_dir(self) -> Path:
        """``<data_dir>/cluster``."""
        return self.data_dir / CLUSTER_DIR

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ClusterConfig:
        """Read the configuration from the variables ``flowmesh dev`` reads, plus ``FLOWMESH_CLUSTER_INTEGRATORS``.

        Args:
            environ: Variables to read; ``os.environ`` when None.

        Returns:
            The configuration (``NATS_URL`` is ignored: the cluster runs its own nodes).

        Raises:
            ValueError: ``FLOWMESH_HTTP_PORT`` is not a port number.
        """
        env = os.environ if environ is None else environ
        dev = DevConfig.from_env(env)
        raw = env.get("FLOWMESH_CLUSTER_INTEGRATORS")
        integrators = DEFAULT_INTEGRATORS if raw is None else tuple(t.strip() for t in raw.split(",") if t.strip())
        return cls(
            data_dir=dev.data_dir,
            database_url=dev.database_url,
            http_port=dev.http_port,
            jwt_secret=dev.jwt_secret,
            integrators=tuple(dict.fromkeys(integrators)),
            nats_sync_always=dev.nats_sync_always,
        )


def _new_password() -> str:
    # nats-server parses a variable's value as config text, where digits may make a number and
    # some punctuation has meaning: letters then hex digits always stay one plain string.
    return "fm" + secrets.token_hex(24)


def load_or_create_passwords(path: Path, users: Sequence[str]) -> dict[str, str]:
    """The NATS users' passwords kept in a JSON file, each generated on first use.

    The file is rewritten (mode 0600, atomically) only when a user is new; passwords of users no
    longer asked for are kept, so an integrator removed and added back keeps its password.

    Args:
        path: The JSON file (``{"user": "password"}``).
        users: Users whose passwords are wanted.

    Returns:
        The password of each user in ``users``.
    """
    stored: dict[str, str] = {}
    with contextlib.suppress(FileNotFoundError):
        loaded = json.loads(path.read_text())
        if isinstance(loaded, dict):
            stored = {str(k): str(v) for k, v in loaded.items()}
    missing = [user for user in users if not stored.get(user)]
    if missing:
        stored.update({user: _new_password() for user in missing})
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{os.getpid()}")
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            json.dump(stored, out, indent=2, sort_keys=True)
            out.write("\n")
        os.replace(partial, path)
    return {user: stored[user] for user in users}


def _nats_users(services: Sequence[str], integrators: Sequence[str]) -> list[str]:
    return [*services, *(integrator_user(tenant) for tenant in integrators)]


def _password_env(passwords: Mapping[str, str]) -> dict[str, str]:
    """nats-server's environment: the variables ``render_auth_config`` refers to."""
    return {password_var(user): password for user, password in passwords.items()}


@dataclass(frozen=True)
class Replica:
    """One process of a service in the cluster.

    Attributes:
        name: ``<service>-<n>``, n from 1.
        service: The service it runs.
        port: Its HTTP port: the API port of a gateway, the health port of the others (both serve
            ``/readyz``); fixed, so a restarted replica answers where the old one did.
        argv: Its command line.
        env: Its complete environment.
    """

    name: str
    service: str
    port: int
    argv: list[str]
    env: dict[str, str] = field(repr=False)

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>``."""
        return f"http://127.0.0.1:{self.port}"


def plan_replicas(
    commands: Mapping[str, Sequence[str]],
    *,
    replicas: int | Mapping[str, int],
    base: Mapping[str, str],
    data_dir: Path,
    nats_urls: Sequence[str],
    database_url: str,
    jwt_secret: str,
    passwords: Mapping[str, str],
    stream_replicas: int,
    ports: Mapping[str, int] | None = None,
) -> list[Replica]:
    """The replicas of every service and their environments: ``flowmesh dev``'s, plus the cluster's.

    Args:
        commands: Command line per service.
        replicas: Processes per service, for all or per service (a service not named gets
            ``DEFAULT_REPLICAS``).
        base: Inherited variables (normally ``os.environ``).
        data_dir: The services' ``FLOWMESH_DATA_DIR``.
        nats_urls: Client URL of every NATS node; each replica gets them rotated by one more, so
            first connections spread over the nodes.
        database_url: PostgreSQL URL.
        jwt_secret: HS256 secret.
        passwords: NATS password of each service (its user has the service's name).
        stream_replicas: ``FLOWMESH_STREAM_REPLICAS``.
        ports: Port of some replicas by name (a front's gateways); a free one for the others.

    Returns:
        The replicas, service by service, each on a port of its own.
    """
    planned: list[Replica] = []
    for service, argv in commands.items():
        count = replicas if isinstance(replicas, int) else replicas.get(service, DEFAULT_REPLICAS)
        for n in range(1, count + 1):
            name = f"{service}-{n}"
            port = (ports or {}).get(name) or free_port()
            env = service_env(
                service,
                base=base,
                config=DevConfig(data_dir=data_dir, http_port=port),
                nats_url=",".join(_rotated(nats_urls, len(planned))),
                database_url=database_url,
                jwt_secret=jwt_secret,
                health_port=None if service == "gateway" else port,
            )
            _add_cluster_settings(env, service, password=passwords[service], stream_replicas=stream_replicas)
            planned.append(Replica(name=name, service=service, port=port, argv=list(argv), env=env))
    return planned


def _rotated(urls: Sequence[str], turn: int) -> list[str]:
    """``urls`` rotated left by ``turn``: each replica dials a different node first."""
    shift = turn % len(urls)
    return [*urls[shift:], *urls[:shift]]


def _add_cluster_settings(env: dict[str, str], service: str, *, password: str, stream_replicas: int) -> None:
    """What a replica needs in a cluster beyond ``flowmesh dev``'s settings: its NATS user, replicated streams."""
    env.update(
        {
            "FLOWMESH_NATS_USER": service,
            "FLOWMESH_NATS_PASSWORD": password,
            "FLOWMESH_STREAM_REPLICAS": str(stream_replicas),
            f"FLOWMESH_{service.upper()}_HEALTH_HOST": "127.0.0.1",
        }
    )
    if service == "gateway":
        # a stopping gateway stays up, not ready, long enough for the front (checking every
        # 0.5 s) to send new connections to the other one
        env.setdefault("FLOWMESH_GATEWAY_DRAIN_S", "1.5")


def _status(port: int, path: str = "/readyz", timeout: float = 2.0) -> int | None:
    """Status code of ``GET http://127.0.0.1:<port><path>``, None when nothing answers (blocking)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("GET", path)
        return connection.getresponse().status
    except (OSError, http.client.HTTPException):
        return None
    finally:
        connection.close()


# --------------------------------------------------------------------------------------------------
# flowmesh cluster


async def run_cluster(config: ClusterConfig, *, commands: Mapping[str, Sequence[str]] | None = None) -> int:
    """Run the cluster until SIGINT, SIGTERM or SIGHUP; then stop everything it started.

    Binds the front first (so the port is ours), starts the NATS cluster with its users, then
    PostgreSQL (unless ``config.database_url``), then the replicas under a ``Supervisor``; waits for
    the front's ``/readyz`` and prints where everything is.

    Args:
        config: What to run.
        commands: Command line per service; ``service_commands()`` when None.

    Returns:
        The process exit code: 0 after a requested stop, 1 if startup failed.
    """
    cmds = service_commands() if commands is None else commands
    if "gateway" not in cmds:
        raise ValueError("the cluster needs gateways behind its front")
    launch = Launch([f"{service}-{n}" for service in cmds for n in range(1, config.replicas + 1)])
    return await launch.run(lambda: _start_cluster(launch, config, cmds))


async def _start_cluster(launch: Launch, config: ClusterConfig, cmds: Mapping[str, Sequence[str]]) -> int | None:
    """Start the front, the NATS nodes, PostgreSQL unless configured, then the replicas.

    Returns:
        An exit code when it gives up early, None once everything is started.
    """
    config.cluster_dir.mkdir(parents=True, exist_ok=True)
    if not port_is_free(config.http_port):
        return launch.busy_port(config.http_port)
    # The front listens before anything else starts, so that the port stays ours; its
    # gateways get their ports now.
    gateway_ports = {f"gateway-{n}": free_port() for n in range(1, config.replicas + 1)}
    front = Front(
        config.http_port, list(gateway_ports.values()), health_path=FRONT_HEALTH_PATH, report=launch.console.say
    )
    if not await launch.start_front(front):
        return launch.busy_port(config.http_port)
    passwords = load_or_create_passwords(config.cluster_dir / PASSWORDS_FILE, _nats_users(SERVICES, config.integrators))
    nats = await _start_nats_nodes(launch, config, passwords)
    database_url = await launch.database_url(config.database_url, config.cluster_dir / "postgres")
    jwt_secret = config.jwt_secret or load_or_create_jwt_secret(config.data_dir)
    planned = plan_replicas(
        cmds,
        replicas=config.replicas,
        base=os.environ,
        data_dir=config.data_dir,
        nats_urls=nats.url_list,
        database_url=database_url,
        jwt_secret=jwt_secret,
        passwords=passwords,
        stream_replicas=min(3, config.nats_nodes),
        ports=gateway_ports,
    )
    await launch.supervise([ServiceSpec(name=r.name, argv=r.argv, env=r.env) for r in planned])
    gateways = [r for r in planned if r.service == "gateway"]
    ready = functools.partial(_cluster_ready_lines, config, gateways, nats, database_url, passwords, jwt_secret)
    launch.announce_when_ready(config.http_port, ready, timeout=config.ready_timeout, what="the front")
    return None


async def _start_nats_nodes(launch: Launch, config: ClusterConfig, passwords: Mapping[str, str]) -> EmbeddedNatsCluster:
    """The NATS cluster, every node refusing anonymous clients: each user has a password of ``passwords``."""
    auth_conf = render_auth_config(config.integrators)
    nodes = config.nats_nodes
    return await launch.start_server(
        f"NATS cluster ({nodes} nodes" + (", sync always)" if config.nats_sync_always else ")"),
        lambda: start_nats_cluster(
            config.cluster_dir,
            nodes=nodes,
            auth_conf=auth_conf,
            env=_password_env(passwords),
            sync_always=config.nats_sync_always,
            own_process_group=True,
        ),
    )


def _cluster_ready_lines(
    config: ClusterConfig,
    gateways: Sequence[Replica],
    nats: EmbeddedNatsCluster,
    database_url: str,
    passwords: Mapping[str, str],
    jwt_secret: str,
) -> list[str]:
    """What ``flowmesh cluster`` prints once the front is ready: where everything is, the users, a token."""
    return [
        "ready",
        f"  front        http://127.0.0.1:{config.http_port}  (connections spread over the gateways)",
        *(f"  {r.name:<12} {r.url}" for r in gateways),
        *(
            f"  NATS {nats.server_name(i):<7} {url}  monitor {monitor}"
            for i, (url, monitor) in enumerate(zip(nats.url_list, nats.monitor_urls, strict=True))
        ),
        f"  PostgreSQL   {redact(database_url)}",
        f"  data         {config.cluster_dir}",
        f"  NATS users   one per service, passwords in {config.cluster_dir / PASSWORDS_FILE}",
        *(
            f"  integrator   tenant {tenant}: user {integrator_user(tenant)} "
            f"password {passwords[integrator_user(tenant)]}"
            for tenant in config.integrators
        ),
        "  dev token (sub dev, tenant dev, role admin, 24 h):",
        f"  {dev_token(jwt_secret)}",
        "  Ctrl-C stops everything",
    ]


# --------------------------------------------------------------------------------------------------
# ClusterShape: the same processes, for tests


class ClusterShape:
    """The processes of ``flowmesh cluster``, started and stopped by PID, for tests (no CLI process).

    A context manager: entering starts the NATS cluster (with its users), PostgreSQL (unless
    ``database_url`` is given), the front and every replica, and returns once every replica and
    the front answer ``/readyz`` with 200; leaving stops them all. Each replica logs to
    ``<workdir>/logs/<name>.log`` (appended across restarts), the front to ``logs/front.log``.

    Example::

        with ClusterShape(tmp_path) as shape:
            headers = {"Authorization": "Bearer " + shape.token("alice")}
            httpx.get(shape.base_url + "/api/v1/flows", headers=headers)
            shape.kill("runner-1")  # SIGKILL; back only after start() unless restart=True
            shape.start("runner-1")
            shape.kill_nats(0)  # node n1 crashes
            shape.restart_nats(0)

    Every method blocks; from an async test call them through ``asyncio.to_thread``. The
    processes are spawned from one long-lived thread of the shape's, because a child's "die with
    the parent" signal (Linux) follows the thread that spawned it, not the process.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        replicas: int | Mapping[str, int] = DEFAULT_REPLICAS,
        nats_nodes: int = DEFAULT_NATS_NODES,
        database_url: str | None = None,
        jwt_secret: str | None = None,
        integrators: Sequence[str] = DEFAULT_INTEGRATORS,
        env: Mapping[str, str] | None = None,
        commands: Mapping[str, Sequence[str]] | None = None,
        restart: bool = False,
        http_port: int = 0,
        ready_timeout: float = 120.0,
        stop_timeout: float = 15.0,
    ) -> None:
        """Prepare the shape; nothing starts until ``__enter__`` (or ``start_all()``).

        Args:
            workdir: Where the servers' data, the passwords file and the logs go.
            replicas: Processes per service, for all or per service (a service not named gets 2).
            nats_nodes: NATS nodes; streams get ``min(3, nats_nodes)`` replicas.
            database_url: An existing PostgreSQL (use a database of the test's own), or None to
                start one under ``workdir``.
            jwt_secret: HS256 secret of the gateways; generated under ``workdir`` when None.
            integrators: Tenants with a NATS integrator user (see ``passwords``).
            env: Settings added to every replica's environment (over the cluster's own).
            commands: Command line per service; ``python -m flowmesh.<service>`` when None.
            restart: Start a replica again 0.5 s after it exits (as ``flowmesh cluster`` does);
                when False, a killed replica stays down until ``start()``.
            http_port: Port of the front; a free one when 0.
            ready_timeout: Seconds ``__enter__`` and ``wait_ready()`` wait.
            stop_timeout: Seconds a replica gets between SIGTERM and SIGKILL.
        """
        self.workdir = workdir.expanduser().resolve()
        self.nats: EmbeddedNatsCluster | None = None
        self.postgres: EmbeddedPostgres | None = None
        self.front: Front | None = None
        self.replicas: dict[str, Replica] = {}
        self.passwords: dict[str, str] = {}
        """NATS password per user: each service, and ``integrator-<tenant>`` per integrator."""
        self.starts: dict[str, int] = {}
        """How many times each replica has been started."""
        self.database_url = database_url or ""
        self.jwt_secret = jwt_secret or ""
        self._commands = service_commands() if commands is None else dict(commands)
        self._replica_counts = replicas
        self._nats_nodes = nats_nodes
        self._integrators = tuple(integrators)
        self._env = dict(env or {})
        self._restart = restart
        self._http_port = http_port
        self._ready_timeout = ready_timeout
        self._stop_timeout = stop_timeout
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._start_env: dict[str, dict[str, str]] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._threads = _ShapeThreads()
        self._watcher: concurrent.futures.Future[None] | None = None

    # -- where things are ------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        """The front's URL, ``http://127.0.0.1:<port>``: where clients go."""
        if self.front is None:
            raise RuntimeError("the cluster is not started")
        return self.front.url

    @property
    def gateway_urls(self) -> list[str]:
        """URL of each gateway replica, bypassing the front."""
        return [r.url for r in self.replicas.values() if r.service == "gateway"]

    @property
    def nats_urls(self) -> list[str]:
        """Client URL of each NATS node (authenticate with a user of ``passwords``)."""
        if self.nats is None:
            raise RuntimeError("the cluster is not started")
        return self.nats.url_list

    @property
    def nats_url(self) -> str:
        """Every node's client URL, comma-separated."""
        return ",".join(self.nats_urls)

    @property
    def names(self) -> list[str]:
        """Every replica's name: ``gateway-1``, ``gateway-2``, ``flows-1``, …"""
        return list(self.replicas)

    def log_path(self, name: str) -> Path:
        """The log file of a replica (or ``front``)."""
        return self.workdir / "logs" / f"{name}.log"

    def logs(self, name: str, tail: int = 4000) -> str:
        """The last ``tail`` characters of a replica's log."""
        path = self.log_path(name)
        return path.read_text(errors="replace")[-tail:] if path.exists() else ""

    def token(self, sub: str = "dev", *, tenant: str | None = None, role: Role = "member", ttl: int = 3600) -> str:
        """A JWT the gateways accept (HS256 with the shape's secret)."""
        return mint_token(self.jwt_secret, sub=sub, tenant=tenant, role=role, ttl=ttl)

    def pids(self) -> dict[str, int | None]:
        """PID of each replica's process, None while it is not running."""
        with self._lock:
            return {name: p.pid if p.poll() is None else None for name, p in self._procs.items()}

    # -- life cycle ------------------------------------------------------------------------------

    def __enter__(self) -> Self:
        self.start_all()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop_all()

    def start_all(self) -> None:
        """Start everything and wait until ready; on failure stop what was started, and raise."""
        if self._threads.started:
            raise RuntimeError("the cluster is already started")
        if "gateway" not in self._commands:
            raise ValueError("the cluster needs gateways behind its front")
        (self.workdir / "logs").mkdir(parents=True, exist_ok=True)
        self._threads.start()
        try:
            self._start_all()
        except BaseException:
            self.stop_all()
            raise

    def _start_all(self) -> None:
        # every user of the auth config, whatever runs: nats-server refuses an unset password variable
        self.passwords = load_or_create_passwords(
            self.workdir / PASSWORDS_FILE, _nats_users(SERVICES, self._integrators)
        )
        auth_conf = render_auth_config(self._integrators)
        nats = self.nats = self._threads.in_spawner(
            lambda: start_nats_cluster(
                self.workdir / "nats", nodes=self._nats_nodes, auth_conf=auth_conf, env=_password_env(self.passwords)
            )
        )
        if not self.database_url:
            postgres = self.postgres = self._threads.in_spawner(lambda: start_postgres(self.workdir / "postgres"))
            self.database_url = postgres.url
        data_dir = self.workdir / "data"
        if not self.jwt_secret:
            self.jwt_secret = load_or_create_jwt_secret(data_dir)
        planned = plan_replicas(
            self._commands,
            replicas=self._replica_counts,
            base=os.environ,
            data_dir=data_dir,
            nats_urls=nats.url_list,
            database_url=self.database_url,
            jwt_secret=self.jwt_secret,
            passwords=self.passwords,
            stream_replicas=min(3, self._nats_nodes),
        )
        self.replicas = {r.name: dataclasses.replace(r, env={**r.env, **self._env}) for r in planned}
        self.starts = dict.fromkeys(self.replicas, 0)
        front_log = self.log_path("front")

        def report(line: str) -> None:
            with front_log.open("a") as out:
                out.write(f"{time.strftime('%H:%M:%S')} {line}\n")

        gateways = [r.port for r in self.replicas.values() if r.service == "gateway"]
        self.front = Front(self._http_port, gateways, health_path=FRONT_HEALTH_PATH, report=report)
        self._threads.in_loop(self.front.start())
        for name in self.replicas:
            self.start(name)
        if self._restart:
            self._watcher = self._threads.in_background(self._keep_running())
        self.wait_ready()

    def stop_all(self) -> None:
        """Stop the replicas (SIGTERM, then SIGKILL after the stop timeout), the front, PostgreSQL and NATS."""
        self._stopping.set()
        if self._watcher is not None:
            self._watcher.cancel()
        with self._lock:
            procs = list(self._procs.values())
        for process in procs:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in procs:
            try:
                process.wait(self._stop_timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self.front is not None and self._threads.started:
            with contextlib.suppress(Exception):
                self._threads.in_loop(self.front.stop())
        if self.postgres is not None:
            self.postgres.stop()
        if self.nats is not None:
            self.nats.stop()
        self._threads.stop()

    def start(self, name: str, *, env: Mapping[str, str] | None = None) -> None:
        """Start a replica that is not running (nothing happens if it runs); returns at once.

        Args:
            name: The replica, e.g. ``runner-1``.
            env: Settings for this process and its automatic restarts, over the replica's own.
        """
        if name not in self.replicas:
            raise KeyError(f"no replica {name!r}; there are {self.names}")
        if env is not None:
            self._start_env[name] = dict(env)
        self._threads.in_spawner(lambda: self._spawn_replica(name))

    def _spawn_replica(self, name: str) -> None:
        replica = self.replicas[name]
        with self._lock:
            running = self._procs.get(name)
            if self._stopping.is_set() or (running is not None and running.poll() is None):
                return
            env = {**replica.env, **self._start_env.get(name, {})}
            self._procs[name] = _spawn(replica.argv, self.log_path(name), env=env)
            self.starts[name] += 1

    def kill(self, name: str, sig: int = signal.SIGKILL, *, wait: bool = True) -> None:
        """Send ``sig`` to a replica's process by PID (nothing happens if it does not run).

        Args:
            name: The replica.
            sig: SIGKILL (a crash) by default; SIGTERM for a graceful stop.
            wait: Return only once the process has exited (bounded by the stop timeout).

        Raises:
            subprocess.TimeoutExpired: ``wait`` and the process outlived the stop timeout.
        """
        if name not in self.replicas:
            raise KeyError(f"no replica {name!r}; there are {self.names}")
        with self._lock:
            process = self._procs.get(name)
        if process is None or process.poll() is not None:
            return
        process.send_signal(sig)
        if wait:
            process.wait(self._stop_timeout)

    def kill_nats(self, index: int) -> None:
        """SIGKILL NATS node ``index`` (0-based; node ``n<index+1>``)."""
        if self.nats is None:
            raise RuntimeError("the cluster is not started")
        self.nats.kill(index)

    def restart_nats(self, index: int) -> None:
        """Start NATS node ``index`` again on its ports and store (stopping it first if it runs); wait until ready."""
        nats = self.nats
        if nats is None:
            raise RuntimeError("the cluster is not started")
        self._threads.in_spawner(lambda: nats.restart(index))

    def wait_ready(self, timeout: float | None = None, names: Sequence[str] | None = None) -> None:
        """Wait until the replicas (default: all) answer ``/readyz`` with 200 and the front sees every gateway.

        Raises:
            RuntimeError: A replica exited while ``restart`` is False (with its log's tail).
            TimeoutError: Not ready in time (with the log of a replica still waited for).
        """
        front = self.front
        if front is None:
            raise RuntimeError("the cluster is not started")
        limit = self._ready_timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        pending = set(self.names if names is None else names)
        while True:
            for name in sorted(pending):
                with self._lock:
                    process = self._procs.get(name)
                if process is None or process.poll() is not None:
                    if not self._restart:
                        code = None if process is None else process.returncode
                        raise RuntimeError(f"{name} is not running (exit code {code}):\n{self.logs(name)}")
                elif _status(self.replicas[name].port) == 200:
                    pending.discard(name)
            gateways = {r.port for r in self.replicas.values() if r.service == "gateway"}
            if not pending and set(front.healthy()) == gateways and _status(front.port) == 200:
                return
            if time.monotonic() > deadline:
                waiting = sorted(pending) or ["front"]
                raise TimeoutError(
                    f"cluster not ready after {limit:.0f} s, waiting for {waiting}; log of {waiting[0]}:\n"
                    + self.logs(waiting[0])
                )
            time.sleep(0.1)

    # -- internals -------------------------------------------------------------------------------

    async def _keep_running(self) -> None:
        """Start again, 0.5 s later, every replica whose process exited (until ``stop_all``)."""
        exited_at: dict[str, float] = {}
        while not self._stopping.is_set():
            await asyncio.sleep(0.1)
            now = time.monotonic()
            with self._lock:
                exited = [name for name, p in self._procs.items() if p.poll() is not None]
            for name in list(exited_at):
                if name not in exited:
                    del exited_at[name]  # started by someone else meanwhile
            for name in exited:
                if now - exited_at.setdefault(name, now) >= 0.5:
                    del exited_at[name]
                    await self._threads.spawning(self._spawn_replica, name)


class _ShapeThreads:
    """The two threads a ``ClusterShape`` works from: an event loop, and one that spawns processes.

    The loop runs the front and the restart watcher; the other thread spawns every server and
    replica. One long-lived spawning thread, because a child's "die with the parent" signal (Linux) follows
    the thread that spawned it, not the process: a short-lived thread would take its children with it.
    """

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._spawner: concurrent.futures.ThreadPoolExecutor | None = None

    @property
    def started(self) -> bool:
        """Whether ``start()`` was called (and stays so after ``stop()``: a shape starts once)."""
        return self._loop is not None

    def start(self) -> None:
        """Start both threads."""
        self._spawner = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="cluster-shape-spawn")
        loop = self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=loop.run_forever, name="cluster-shape-loop", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the loop (waiting up to 10 s for its thread) and the spawning thread."""
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()
        if self._spawner is not None:
            self._spawner.shutdown()

    def in_loop(self, coro: Coroutine[Any, Any, _T]) -> _T:
        """Run ``coro`` on the loop and return its result (waiting up to 60 s)."""
        return self.in_background(coro).result(60)

    def in_background(self, coro: Coroutine[Any, Any, _T]) -> concurrent.futures.Future[_T]:
        """Run ``coro`` on the loop; returns at once."""
        if self._loop is None:
            raise RuntimeError("the cluster is not started")
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def in_spawner(self, fn: Callable[[], _T]) -> _T:
        """Call ``fn`` on the spawning thread and return its result."""
        if self._spawner is None:
            raise RuntimeError("the cluster is not started")
        return self._spawner.submit(fn).result()

    async def spawning(self, fn: Callable[[str], None], name: str) -> None:
        """From the loop: call ``fn(name)`` on the spawning thread, and wait for it."""
        await asyncio.get_running_loop().run_in_executor(self._spawner, fn, name)
