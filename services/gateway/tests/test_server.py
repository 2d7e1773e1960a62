"""The server under the application: requests the parser refuses, and the headers of every answer."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from flowmesh.gateway import middleware
from flowmesh.gateway.server import GatewayRunner

TOKEN = "eyJhbGciOiJIUzI1NiJ9.SECRETPAYLOAD" + "A" * 9000


async def _ok(_: web.Request) -> web.Response:
    return web.json_response({"ok": True})


@pytest.fixture
async def port() -> AsyncIterator[int]:
    app = web.Application(middlewares=[middleware.problems])
    app.on_response_prepare.append(middleware.secure_headers)
    app.router.add_get("/api/v1/ok", _ok)
    runner = GatewayRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield runner.addresses[0][1]
    finally:
        await runner.cleanup()


async def _raw(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    data = await reader.read()
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body


def _assert_secure(headers: dict[str, str]) -> None:
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["x-frame-options"] == "DENY"
    assert "frame-ancestors 'none'" in headers["content-security-policy"]
    assert headers["server"] == "flowmesh"


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET /api/v1/ok HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TOKEN.encode() + b"\r\n\r\n",
        b"GET /api/v1/ok?t=" + TOKEN.encode() + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /api/v1/ok HTTP/1.1\r\nHost: x\r\nX-" + TOKEN.encode() + b": 1\r\n\r\n",
    ],
    ids=["header-value", "request-line", "header-name"],
)
async def test_an_overlong_line_is_a_431_problem_and_no_log_line_quotes_it(
    port: int, request_bytes: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    status, headers, body = await _raw(port, request_bytes)
    assert status == 431
    assert headers["content-type"].startswith("application/problem+json")
    problem = json.loads(body)
    assert problem["type"] == "headers-too-large" and problem["status"] == 431
    assert "SECRET" not in body.decode() and "AAAA" not in body.decode()
    _assert_secure(headers)
    for record in caplog.records:
        text = record.getMessage() + (logging.Formatter().formatException(record.exc_info) if record.exc_info else "")
        assert "SECRET" not in text and "AAAA" not in text, text
        assert record.exc_info is None, "a traceback was logged"
    assert any(r.levelno == logging.WARNING and "LineTooLong" in r.getMessage() for r in caplog.records)


async def test_a_malformed_header_is_a_400_problem_quoting_nothing(port: int, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    status, headers, body = await _raw(port, b"GET /api/v1/ok HTTP/1.1\r\nHost: x\r\nX-Sec\x01ret: tok\r\n\r\n")
    assert status == 400 and headers["content-type"].startswith("application/problem+json")
    assert json.loads(body)["type"] == "bad-request" and b"Sec" not in body
    _assert_secure(headers)
    assert all(r.exc_info is None and "Sec" not in r.getMessage() for r in caplog.records)


async def test_answers_and_404s_carry_the_security_headers(port: int) -> None:
    for path, status in (("/api/v1/ok", 200), ("/nowhere", 404)):
        got, headers, _ = await _raw(port, f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        assert got == status
        _assert_secure(headers)
        assert headers["content-security-policy"].startswith("default-src 'none'")


async def test_an_error_that_escapes_every_middleware_is_a_500_problem(caplog: pytest.LogCaptureFixture) -> None:
    async def broken(_: web.Request) -> web.Response:
        raise RuntimeError("a bug")

    app = web.Application()  # no problems middleware: the error reaches the server
    app.router.add_get("/broken", broken)
    runner = GatewayRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        status, headers, body = await _raw(
            runner.addresses[0][1], b"GET /broken HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
    finally:
        await runner.cleanup()
    assert status == 500 and headers["content-type"].startswith("application/problem+json")
    assert json.loads(body)["type"] == "internal-error" and b"a bug" not in body
    _assert_secure(headers)
    assert any(r.exc_info is not None for r in caplog.records)  # a bug keeps its traceback
