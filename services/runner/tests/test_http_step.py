"""The http step against a real local server: private targets refused unless allowed, keys, caps."""

from __future__ import annotations

import json
import threading
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from flowmesh.contracts.models.definition import HttpData
from flowmesh.runner import io_steps
from flowmesh.runner.addresses import forbidden_address
from flowmesh.runner.io_steps import HttpStep


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/redirect":
                self.send_response(302)
                self.send_header("Location", "http://127.0.0.2:1/elsewhere")
                self.end_headers()
                return
            body = json.dumps(
                {"key": self.headers.get("Idempotency-Key"), "cookie": self.headers.get("Cookie")}
            ).encode()
            self.send_response(200)
            if self.path == "/cookie":
                self.send_header("Set-Cookie", "session=tenant-a; Path=/")
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


async def step(allow_private: bool) -> AsyncIterator[HttpStep]:
    s = HttpStep(allow_private=allow_private, max_bytes=1024 * 1024, default_timeout_ms=5000)
    await s.start()
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture
async def guarded() -> AsyncIterator[HttpStep]:
    async for s in step(False):
        yield s


@pytest.fixture
async def open_step() -> AsyncIterator[HttpStep]:
    async for s in step(True):
        yield s


@pytest.mark.parametrize(
    ("address", "forbidden"),
    [
        ("127.0.0.1", True),
        ("10.1.2.3", True),
        ("192.168.0.1", True),
        ("169.254.169.254", True),
        ("::1", True),
        ("::ffff:127.0.0.1", True),
        ("0.0.0.0", True),
        ("8.8.8.8", False),
        ("2606:4700:4700::1111", False),
    ],
)
def test_private_loopback_and_link_local_addresses_are_forbidden(address: str, forbidden: bool) -> None:
    assert forbidden_address(address) is forbidden


async def test_private_targets_are_refused_by_default(guarded: HttpStep, server: str) -> None:
    outcome = await guarded.run(HttpData(url=server), {}, "r:s")
    assert not outcome.ok and outcome.error_type == "forbidden-address" and not outcome.retryable


async def test_localhost_by_name_is_refused_too(guarded: HttpStep, server: str) -> None:
    outcome = await guarded.run(HttpData(url=server.replace("127.0.0.1", "localhost")), {}, "r:s")
    assert not outcome.ok and outcome.error_type == "forbidden-address"


async def test_allowed_private_targets_get_the_idempotency_key(open_step: HttpStep, server: str) -> None:
    outcome = await open_step.run(HttpData(url=server + "/x"), {}, "run-1:call")
    assert outcome.ok and outcome.output["body"] == {"key": "run-1:call", "cookie": None}


async def test_redirects_are_checked_at_every_hop(
    guarded: HttpStep, server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # stand-in for a public first hop: only 127.0.0.2 counts as private here, and the server sends us there
    monkeypatch.setattr(io_steps, "forbidden_address", lambda address: address == "127.0.0.2")
    assert (await guarded.run(HttpData(url=server + "/ok"), {}, "r:s")).ok
    outcome = await guarded.run(HttpData(url=server + "/redirect"), {}, "r:s")
    assert not outcome.ok and outcome.error_type == "forbidden-address" and "127.0.0.2" in outcome.message


async def test_only_http_and_https_urls(open_step: HttpStep) -> None:
    outcome = await open_step.run(HttpData(url="file:///etc/passwd"), {}, "r:s")
    assert not outcome.ok and outcome.error_type == "configuration" and not outcome.retryable


async def test_expression_errors_in_the_request_fail_without_retry(open_step: HttpStep, server: str) -> None:
    context: dict[str, Any] = {"input": {}}
    outcome = await open_step.run(HttpData(url=server + "/{{ input.missing }}"), context, "r:s")
    assert not outcome.ok and outcome.error_type == "expression" and not outcome.retryable


async def test_cookies_are_never_kept_between_requests(open_step: HttpStep, server: str) -> None:
    # one client serves every tenant: a cookie set for one must not go along with the next request
    # (by name: a cookie jar ignores cookies of IP addresses anyway)
    named = server.replace("127.0.0.1", "localhost")
    assert (await open_step.run(HttpData(url=named + "/cookie"), {}, "a:s")).ok
    outcome = await open_step.run(HttpData(url=named + "/x"), {}, "b:s")
    assert outcome.ok and outcome.output["body"]["cookie"] is None
