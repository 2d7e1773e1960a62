"""The front of ``flowmesh cluster``: one port in front of several gateways, as a load balancer would be.

How it works:

* It listens on one TCP port and knows the ports of the gateways behind it (the backends).
* A background task asks every backend ``GET /readyz`` (or another ``health_path``) every half
  second; those answering 200
  are *healthy*. A gateway that is starting, draining (after SIGTERM) or gone answers something
  else or nothing, and drops out of the rotation within one interval.
* Each accepted connection goes to the next healthy backend, round-robin. If connecting fails
  (refused: the gateway died since the last check), the next one is tried, then the unhealthy
  ones as a last resort; so a gateway that just went away costs new connections nothing, and a
  connection is refused only when no backend accepts it.
* From then on the front copies bytes both ways and never parses them: HTTP keep-alive and
  WebSocket upgrades pass unchanged, and every request of a keep-alive connection reaches the
  same gateway (as behind a layer-4 load balancer). An end of stream from one side is passed on
  as a half-close, and the connection ends when both directions have. Each copy waits for the
  receiving side to drain, so a slow reader slows its sender instead of filling memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import Final

__all__ = ["CHECK_INTERVAL", "Front"]

CHECK_INTERVAL: Final = 0.5
"""Seconds between two health checks of every backend."""
_CHECK_TIMEOUT: Final = 1.0
_CONNECT_TIMEOUT: Final = 2.0
# Bytes read at once from one side before they are written to the other.
_CHUNK: Final = 64 * 1024

log = logging.getLogger("flowmesh.front")


async def http_status(
    port: int, path: str = "/readyz", *, host: str = "127.0.0.1", timeout: float = _CHECK_TIMEOUT
) -> int | None:
    """Status code of ``GET http://<host>:<port><path>``, None when nothing answers in time.

    Args:
        port: The server's port.
        path: Path and query.
        host: Its address.
        timeout: Seconds for connecting and reading the status line.

    Returns:
        The status code, or None.
    """
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode())
            await writer.drain()
            status_line = await reader.readline()
    except (OSError, TimeoutError):
        return None
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
    parts = status_line.split()
    if len(parts) >= 2 and parts[0].startswith(b"HTTP/") and parts[1].isdigit():
        return int(parts[1])
    return None


class Front:
    """A TCP proxy on ``host:port`` spreading connections over healthy backends (see the module doc).

    Use ``await start()`` once and ``await stop()`` at the end, in one event loop.
    """

    def __init__(
        self,
        port: int,
        backends: Sequence[int],
        *,
        host: str = "127.0.0.1",
        backend_host: str = "127.0.0.1",
        check_interval: float = CHECK_INTERVAL,
        health_path: str = "/readyz",
        report: Callable[[str], None] | None = None,
    ) -> None:
        """Prepare the front; nothing listens until ``start()``.

        Args:
            port: Port to listen on; 0 picks a free one (read it from ``port`` after ``start()``).
            backends: Ports of the gateways, on ``backend_host``.
            host: Address to listen on.
            backend_host: Address of the gateways.
            check_interval: Seconds between health checks.
            health_path: What a backend must answer with 200 to be healthy.
            report: Called with a line when a backend becomes healthy or unhealthy, or when no
                backend accepts a connection; the ``flowmesh.front`` logger when None.
        """
        if not backends:
            raise ValueError("a front needs at least one backend")
        self.port = port
        self.host = host
        self.backends = list(backends)
        self._backend_host = backend_host
        self._interval = check_interval
        self._health_path = health_path
        self._report = report or log.info
        self._healthy: set[int] = set()
        self._refusing = False
        self._next = 0
        self._server: asyncio.Server | None = None
        self._checker: asyncio.Task[None] | None = None
        self._connections: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        """``http://<host>:<port>``."""
        return f"http://{self.host}:{self.port}"

    def healthy(self) -> list[int]:
        """Ports of the backends whose last ``/readyz`` answered 200, in configuration order."""
        return [port for port in self.backends if port in self._healthy]

    async def start(self) -> None:
        """Check the backends once, then listen and keep checking in the background.

        Raises:
            OSError: The port cannot be bound (in use, or not allowed).
        """
        if self._server is not None:
            raise RuntimeError("front already started")
        await self._check_all()
        self._server = await asyncio.start_server(self._serve, self.host, self.port, limit=_CHUNK)
        if self.port == 0:
            self.port = self._server.sockets[0].getsockname()[1]
        self._checker = asyncio.create_task(self._check_forever(), name="front health checks")

    async def stop(self) -> None:
        """Stop listening and checking, and close every open connection. Idempotent."""
        if self._server is not None:
            self._server.close()
        if self._checker is not None:
            self._checker.cancel()
        tasks = [*self._connections, *([self._checker] if self._checker is not None else [])]
        for task in self._connections:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    # -- health ----------------------------------------------------------------------------------

    async def _check_all(self) -> None:
        statuses = await asyncio.gather(
            *(http_status(port, self._health_path, host=self._backend_host) for port in self.backends)
        )
        healthy = {port for port, status in zip(self.backends, statuses, strict=True) if status == 200}
        for port in sorted(healthy - self._healthy):
            self._report(f"front: backend {self._backend_host}:{port} is ready")
        for port in sorted(self._healthy - healthy):
            self._report(f"front: backend {self._backend_host}:{port} is not ready")
        self._healthy = healthy

    async def _check_forever(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            await self._check_all()

    def _candidates(self) -> list[int]:
        """Backends in the order to try: the healthy ones from the next in turn, then the others."""
        healthy = self.healthy()
        others = [port for port in self.backends if port not in self._healthy]
        if healthy:
            turn = self._next % len(healthy)
            self._next += 1
            healthy = healthy[turn:] + healthy[:turn]
        return healthy + others

    # -- connections -----------------------------------------------------------------------------

    async def _serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            backend = await self._connect()
            if backend is None:
                if not self._refusing:  # once per outage, not once per connection
                    self._report(f"front: no backend accepts connections (ports {self.backends})")
                self._refusing = True
                return
            self._refusing = False
            backend_reader, backend_writer = backend
            try:
                await _splice(client_reader, client_writer, backend_reader, backend_writer)
            finally:
                await _close(backend_writer)
        except asyncio.CancelledError:
            # Only stop() cancels a connection, and nobody else awaits this task: asyncio's own
            # done-callback would log a cancelled handler as an error.
            pass
        finally:
            await _close(client_writer)
            self._connections.discard(task)

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        for port in self._candidates():
            try:
                async with asyncio.timeout(_CONNECT_TIMEOUT):
                    return await asyncio.open_connection(self._backend_host, port, limit=_CHUNK)
            except (OSError, TimeoutError):
                if port in self._healthy:
                    # Out of the rotation at once; the next check brings it back if it recovers.
                    self._healthy.discard(port)
                    self._report(f"front: backend {self._backend_host}:{port} refused a connection")
        return None


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy ``reader`` to ``writer`` until end of stream, then half-close ``writer``."""
    while data := await reader.read(_CHUNK):
        writer.write(data)
        await writer.drain()
    if writer.can_write_eof() and not writer.is_closing():
        writer.write_eof()


async def _splice(
    client_reader: asyncio.StreamReader,
    client_writer: asyncio.StreamWriter,
    backend_reader: asyncio.StreamReader,
    backend_writer: asyncio.StreamWriter,
) -> None:
    """Copy both ways until both directions have ended, or until either fails (a reset, say)."""
    directions = {
        asyncio.create_task(_pipe(client_reader, backend_writer)),
        asyncio.create_task(_pipe(backend_reader, client_writer)),
    }
    try:
        # Both end normally after both half-closes; an error in one (a reset) ends the other too,
        # since nothing more can reach the side that failed.
        await asyncio.wait(directions, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        for task in directions:
            task.cancel()
        results = await asyncio.gather(*directions, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException) and not isinstance(result, OSError | asyncio.CancelledError):
            raise result


async def _close(writer: asyncio.StreamWriter) -> None:
    """Close a connection; abort it if unsent data does not drain within a moment (a peer not reading)."""
    writer.close()
    try:
        async with asyncio.timeout(_CONNECT_TIMEOUT):
            await writer.wait_closed()
    except TimeoutError:
        writer.transport.abort()
    except OSError:
        pass
