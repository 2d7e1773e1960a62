"""What ``flowmesh dev`` and ``flowmesh cluster`` share: one run, from the first server started to the last stopped.

Both commands start embedded servers, then the services under a ``Supervisor``; they report
progress until the gateway (or the front) answers ``/readyz``, print where everything is, and on
SIGINT, SIGTERM or SIGHUP stop what they started. The embedded servers run in process groups of
their own: a Ctrl-C reaches this process and the services, and the servers stay up until the
services have shut down against them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Final, Protocol, TextIO, TypeVar
from urllib.parse import urlsplit, urlunsplit

from flowmesh.cli.embedded import EmbeddedServerError, start_postgres
from flowmesh.cli.front import Front, http_status
from flowmesh.cli.supervisor import (
    SUPERVISOR_COLOUR,
    SUPERVISOR_NAME,
    ServiceSpec,
    Supervisor,
    colour_enabled,
    prefix,
    prefix_width,
)
from flowmesh.cli.tokens import DEFAULT_AUDIENCE, DEFAULT_ISSUER, mint_token

__all__ = ["DEV_TOKEN_TTL", "STOP_SIGNALS", "Console", "Launch", "dev_token", "port_is_free", "redact"]

DEV_TOKEN_TTL: Final = 24 * 3600
"""Lifetime in seconds of the token both commands print."""
STOP_SIGNALS: Final = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
"""Signals that stop a run (a terminal's Ctrl-C, a process manager, a closed terminal)."""


class _Stoppable(Protocol):
    def stop(self) -> None: ...


_Server = TypeVar("_Server", bound=_Stoppable)


class _StopRequested(Exception):
    """A stop signal came while a server was starting: start nothing more."""


def redact(url: str) -> str:
    """Hide the password of a URL that is about to be printed."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def port_is_free(port: int) -> bool:
    """Whether something could listen on ``port`` of 127.0.0.1 now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As aiohttp does: a port in TIME_WAIT is usable, one with a listener is not.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def dev_token(jwt_secret: str) -> str:
    """The token both commands print: sub and tenant ``dev``, role admin, valid 24 h."""
    return mint_token(
        jwt_secret,
        sub="dev",
        tenant="dev",
        role="admin",
        ttl=DEV_TOKEN_TTL,
        issuer=os.environ.get("FLOWMESH_JWT_ISSUER") or DEFAULT_ISSUER,
        audience=os.environ.get("FLOWMESH_JWT_AUDIENCE") or DEFAULT_AUDIENCE,
    )


class Console:
    """Lines from the command itself, lined up with the services' output."""

    def __init__(self, names: Sequence[str]) -> None:
        self.supervisor: Supervisor | None = None
        self._width = prefix_width(names)

    def say(self, message: str) -> None:
        """Print a line: through the supervisor once it runs (so lines never interleave), else to stdout."""
        if self.supervisor is not None:
            self.supervisor.log(message)
        else:
            self._print(message, sys.stdout)

    def error(self, message: str) -> None:
        """Print ``error: <message>`` to stderr."""
        self._print(f"error: {message}", sys.stderr)

    def _print(self, message: str, stream: TextIO) -> None:
        colour = SUPERVISOR_COLOUR if colour_enabled(stream) else None
        print(prefix(SUPERVISOR_NAME, width=self._width, colour=colour) + message, file=stream, flush=True)


class Launch:
    """One run of a command: the signals that end it, and what it started, stopped in order at the end.

    ``run(start)`` calls ``start``, which starts things through these methods (so that each is
    stopped at the end, in the right order) and returns an exit code when it gives up early, or
    None once everything is up; the run then lasts until a stop signal. A stop signal while
    ``start`` runs takes effect at the next server started, or once everything is up.
    """

    def __init__(self, names: Sequence[str]) -> None:
        """Prepare a run whose output is lined up for the processes ``names``."""
        self.console = Console(names)
        self.stopping = asyncio.Event()
        """Set by the first stop signal."""
        self._front: Front | None = None
        self._servers: list[_Stoppable] = []
        self._supervisor: Supervisor | None = None
        self._ready: asyncio.Task[None] | None = None

    async def run(self, start: Callable[[], Awaitable[int | None]]) -> int:
        """Start, wait for a stop signal, then stop everything started, whatever happened.

        Returns:
            The process exit code: ``start``'s when it gave up, 0 after a requested stop, 1 when
            an embedded server failed to start.
        """
        loop = asyncio.get_running_loop()
        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, self._on_signal, sig)
        try:
            code = await start()
            if code is not None:
                return code
            await self.stopping.wait()
            return 0
        except _StopRequested:
            return 0
        except EmbeddedServerError as exc:
            if self.stopping.is_set():
                # A Ctrl-C sent to the whole process group also stopped the server being started.
                return 0
            self.console.error(str(exc))
            return 1
        finally:
            await self._stop_all()
            for sig in STOP_SIGNALS:
                loop.remove_signal_handler(sig)

    def busy_port(self, port: int) -> int:
        """Say that ``port`` is someone else's; the exit code for it."""
        self.console.error(f"port {port} on 127.0.0.1 is in use; stop what listens there or set FLOWMESH_HTTP_PORT")
        return 1

    async def start_front(self, front: Front) -> bool:
        """Start ``front`` (stopped first of all at the end); False when it cannot listen on its port."""
        try:
            await front.start()
        except OSError:
            return False
        self._front = front
        return True

    async def start_server(self, what: str, start: Callable[[], _Server]) -> _Server:
        """Start an embedded server in a thread, so the loop keeps handling signals meanwhile.

        The servers are stopped after the services, the last started first. A stop signal that
        came meanwhile ends the run once the server is up: nothing more is started.
        """
        self.console.say(f"starting embedded {what}")
        began = time.monotonic()
        server = await asyncio.to_thread(start)
        self._servers.append(server)
        self.console.say(f"embedded {what} ready in {time.monotonic() - began:.2f} s")
        if self.stopping.is_set():
            raise _StopRequested
        return server

    async def database_url(self, configured: str | None, data_dir: Path) -> str:
        """``configured``, or else the URL of an embedded PostgreSQL started on ``data_dir``."""
        if configured is not None:
            return configured
        postgres = await self.start_server("PostgreSQL", lambda: start_postgres(data_dir, own_process_group=True))
        return postgres.url

    async def supervise(self, specs: Sequence[ServiceSpec]) -> None:
        """Start the services under a ``Supervisor``, which from now on prints the command's lines too."""
        supervisor = self._supervisor = Supervisor(specs, colour=colour_enabled(sys.stdout))
        self.console.supervisor = supervisor
        await supervisor.start()

    def announce_when_ready(
        self, port: int, lines: Callable[[], Sequence[str]], *, timeout: float, what: str = "the gateway"
    ) -> None:
        """In the background: report progress until ``/readyz`` on ``port`` answers 200, then print ``lines()``.

        Args:
            port: Where ``what`` listens.
            lines: What to print once it is ready.
            timeout: Seconds of progress reports, after which one warning says it is still not ready.
            what: What listens on ``port``, for the messages.
        """
        self._ready = asyncio.create_task(self._wait_until_ready(port, lines, timeout, what))

    # -- internals -------------------------------------------------------------------------------

    def _on_signal(self, sig: signal.Signals) -> None:
        if not self.stopping.is_set():
            self.console.say(f"{sig.name} received, stopping")
        self.stopping.set()

    async def _wait_until_ready(
        self, port: int, lines: Callable[[], Sequence[str]], ready_timeout: float, what: str
    ) -> None:
        started = time.monotonic()
        next_report = started + 5
        warned = False
        while not self.stopping.is_set():
            if await http_status(port, "/readyz", timeout=2.0) == 200:
                for line in lines():
                    self.console.say(line)
                return
            now = time.monotonic()
            waited = now - started
            if waited >= ready_timeout and not warned:
                warned = True
                self.console.say(
                    f"{what} is still not ready after {waited:.0f} s; see the logs above "
                    "(still supervising, and will report when it is ready)"
                )
            elif now >= next_report and not warned:
                next_report = now + 5
                self.console.say(f"waiting for http://127.0.0.1:{port}/readyz ({waited:.0f} s)")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), 0.25 if waited < 10 else 1.0)

    async def _stop_all(self) -> None:
        if self._ready is not None:
            self._ready.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ready
        # No new connections first; then the services, while the servers they talk to are still
        # up; then the servers, the last started first (PostgreSQL before NATS).
        if self._front is not None:
            await self._front.stop()
        if self._supervisor is not None:
            await self._supervisor.stop()
        for server in reversed(self._servers):
            await asyncio.to_thread(server.stop)
        if self._supervisor is not None or self._servers:
            self.console.say("stopped")
