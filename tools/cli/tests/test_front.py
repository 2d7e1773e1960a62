"""The front of ``flowmesh cluster``: a TCP proxy over the gateways that are ready."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import aiohttp
import pytest
from aiohttp import web

from flowmesh.cli.front import Front


class Backend:
    """A stand-in gateway: ``/`` names it, ``/readyz`` answers as told, ``/ws`` echoes."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.ready = True
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/", self._hello)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/ws", self._ws)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await site.start()
        if self.port == 0:
            self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _hello(self, _: web.Request) -> web.Response:
        return web.Response(text=self.name)

    async def _readyz(self, _: web.Request) -> web.Response:
        return web.Response(status=200 if self.ready else 503)

    async def _ws(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for message in ws:
            if message.type is aiohttp.WSMsgType.TEXT:
                await ws.send_str(f"{self.name}:{message.data}")
        return ws


async def _until(condition: Callable[[], bool], *, timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.02)


@pytest.fixture
async def backends() -> AsyncIterator[tuple[Backend, Backend]]:
    pair = (Backend("a"), Backend("b"))
    for backend in pair:
        await backend.start()
    try:
        yield pair
    finally:
        for backend in pair:
            await backend.stop()


@pytest.fixture
async def front(backends: tuple[Backend, Backend]) -> AsyncIterator[Front]:
    proxy = Front(0, [b.port for b in backends], check_interval=0.1, report=lambda _: None)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.stop()


async def _names(front: Front, count: int) -> list[str]:
    """``GET /`` ``count`` times, each on a new connection."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
        names = []
        for _ in range(count):
            async with session.get(front.url + "/") as response:
                assert response.status == 200
                names.append(await response.text())
        return names


async def test_new_connections_take_turns_over_the_ready_backends(front: Front) -> None:
    assert front.healthy() == front.backends
    names = await _names(front, 10)
    assert names.count("a") == names.count("b") == 5


async def test_a_keep_alive_connection_stays_with_its_backend(front: Front) -> None:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as session:
        names = set()
        for _ in range(5):
            async with session.get(front.url + "/") as response:
                names.add(await response.text())
    assert len(names) == 1


async def test_a_stopped_backend_is_skipped_at_once_without_a_failed_request(
    front: Front, backends: tuple[Backend, Backend]
) -> None:
    a, b = backends
    await b.stop()
    # Before any health check has noticed: a refused connect falls through to the next backend.
    assert await _names(front, 6) == ["a"] * 6
    assert front.healthy() == [a.port]
    await b.start()  # same port
    await _until(lambda: front.healthy() == [a.port, b.port], what="b back in the rotation")
    assert set(await _names(front, 4)) == {"a", "b"}


async def test_a_backend_that_is_not_ready_gets_no_new_connections(
    front: Front, backends: tuple[Backend, Backend]
) -> None:
    a, b = backends
    a.ready = False
    await _until(lambda: front.healthy() == [b.port], what="a out of the rotation")
    assert await _names(front, 4) == ["b"] * 4


async def test_a_websocket_passes_through(front: Front) -> None:
    async with aiohttp.ClientSession() as session, session.ws_connect(front.url + "/ws") as ws:
        await ws.send_str("hello")
        reply = await ws.receive_str(timeout=5)
        assert reply in ("a:hello", "b:hello")
        await ws.send_str("again")
        assert await ws.receive_str(timeout=5) == reply.replace("hello", "again")


async def test_a_half_close_passes_through_and_the_answer_still_comes_back() -> None:
    async def count_until_eof(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read()  # until the client's half-close reaches this side
        writer.write(f"{len(data)} bytes".encode())
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(count_until_eof, "127.0.0.1", 0)
    # No /readyz there: never healthy, still tried when nothing else is.
    proxy = Front(0, [server.sockets[0].getsockname()[1]], report=lambda _: None)
    await proxy.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"x" * 300_000)
        writer.write_eof()
        async with asyncio.timeout(5):
            answer = await reader.read()
        writer.close()
        assert answer == b"300000 bytes"
    finally:
        await proxy.stop()
        server.close()
        await server.wait_closed()


async def test_without_any_backend_a_connection_is_closed_not_left_hanging(
    front: Front, backends: tuple[Backend, Backend]
) -> None:
    for backend in backends:
        await backend.stop()
    reader, writer = await asyncio.open_connection("127.0.0.1", front.port)
    async with asyncio.timeout(5):
        assert await reader.read() == b""
    writer.close()


async def test_stop_closes_open_connections(backends: tuple[Backend, Backend]) -> None:
    proxy = Front(0, [b.port for b in backends], report=lambda _: None)
    await proxy.start()
    async with aiohttp.ClientSession() as session, session.ws_connect(proxy.url + "/ws") as ws:
        await proxy.stop()
        message = await ws.receive(timeout=5)
        assert message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING)


async def test_a_busy_port_is_refused(front: Front) -> None:
    other = Front(front.port, front.backends)
    with pytest.raises(OSError, match="address already in use"):
        await other.start()
    await other.stop()
