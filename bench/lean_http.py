"""A lean HTTP/1.1 client for the webhook load: keep-alive connections on bare asyncio protocols.

The load generator shares the machine's two cores with the stack it measures. aiohttp's client
spent about 0.95 ms of CPU a delivery (its request and response machinery, cookie jar, tracing
hooks) against the gateway's 0.38 ms to accept it; this one writes each request as one buffer and
reads a response by its ``Content-Length``, which is all a webhook sender needs. The gateway's
answers always carry ``Content-Length`` (aiohttp's ``json_response``); anything else is an error here.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from urllib.parse import urlsplit


class _Connection(asyncio.Protocol):
    """One keep-alive connection, one request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._answer: asyncio.Future[tuple[int, bytes]] | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._answer is not None and not self._answer.done():
            self._answer.set_exception(exc or ConnectionError("the server closed the connection"))

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0 or self._answer is None:
            return
        head = bytes(self._buffer[:end]).decode("latin-1").split("\r\n")
        length = None
        for line in head[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        if length is None:
            self._answer.set_exception(ValueError(f"an answer without Content-Length: {head[0]}"))
            return
        if len(self._buffer) < end + 4 + length:
            return
        body = bytes(self._buffer[end + 4 : end + 4 + length])
        del self._buffer[: end + 4 + length]
        self._answer.set_result((int(head[0].split(" ", 2)[1]), body))

    async def request(self, raw: bytes) -> tuple[int, bytes]:
        assert self.transport is not None
        self._answer = asyncio.get_running_loop().create_future()
        self.transport.write(raw)
        try:
            return await self._answer
        finally:
            self._answer = None


class LeanClient:
    """Up to ``size`` keep-alive connections to one ``http://host:port``; ``post`` sends JSON bytes."""

    def __init__(self, base: str, *, size: int) -> None:
        url = urlsplit(base)
        if url.scheme != "http" or url.hostname is None:
            raise ValueError(f"not a plain http:// base URL: {base}")
        self._host = url.hostname
        self._port = url.port or 80
        self._authority = url.netloc
        self._idle: asyncio.Queue[_Connection] = asyncio.Queue()
        self._open: list[_Connection] = []
        self._opened = 0
        """Connections open or being opened."""
        self._size = size

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        """POST ``body`` (JSON) to ``path``; the answer's status and body."""
        raw = (
            f"POST {path} HTTP/1.1\r\nHost: {self._authority}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode() + body
        async with self._connection() as conn:
            return await conn.request(raw)

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[_Connection]:
        if self._idle.empty() and self._opened < self._size:
            self._opened += 1  # counted before the await: concurrent callers see it
            try:
                _, conn = await asyncio.get_running_loop().create_connection(_Connection, self._host, self._port)
            except BaseException:
                self._opened -= 1
                raise
            self._open.append(conn)
        else:
            conn = await self._idle.get()
        try:
            yield conn
        except BaseException:
            self._discard(conn)
            raise
        if conn.closed:
            self._discard(conn)
        else:
            self._idle.put_nowait(conn)

    def _discard(self, conn: _Connection) -> None:
        if conn.transport is not None:
            conn.transport.close()
        self._open.remove(conn)
        self._opened -= 1

    async def close(self) -> None:
        for conn in self._open:
            if conn.transport is not None:
                conn.transport.close()
        self._open.clear()
        self._opened = 0
