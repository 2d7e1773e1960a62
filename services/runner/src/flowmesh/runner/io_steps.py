"""Steps that do I/O: ``http`` and ``publish``. Each returns an :class:`Outcome`, never raises."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import socket
from typing import Any, Final
from urllib.parse import urljoin

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from nats.js import JetStreamContext
from yarl import URL

from flowmesh.contracts import headers as h
from flowmesh.contracts.expressions import ExpressionError, render
from flowmesh.contracts.models.definition import HttpData, PublishData
from flowmesh.contracts.subjects import out_message
from flowmesh.runner.engine import Outcome

MAX_REDIRECTS: Final = 5
RETRYABLE_STATUS: Final = frozenset({408, 429})
SAFE_RESPONSE_HEADERS: Final = ("content-type", "content-length", "etag", "last-modified", "location", "retry-after")


class PrivateAddressError(OSError):
    """The target resolves to an address http steps may not reach."""


def forbidden_address(address: str) -> bool:
    """Private, loopback, link-local, multicast, reserved or unspecified: not for http steps by default."""
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_reserved or ip.is_unspecified


class UnsupportedUrl(ValueError):
    """Not an http(s) URL."""


class GuardedResolver(AbstractResolver):
    """Resolves names but refuses private targets: checked at connect time, so DNS rebinding cannot slip past."""

    def __init__(self) -> None:
        self._inner = DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        found = await self._inner.resolve(host, port, family)
        allowed = [r for r in found if not forbidden_address(r["host"])]
        if not allowed:
            raise PrivateAddressError(f"{host} resolves to a private address; http steps may not reach it")
        return allowed

    async def close(self) -> None:
        await self._inner.close()


class HttpStep:
    """Runs ``http`` steps with one shared client session."""

    def __init__(self, *, allow_private: bool, max_bytes: int, default_timeout_ms: int) -> None:
        self.allow_private = allow_private
        self.max_bytes = max_bytes
        self.default_timeout_ms = default_timeout_ms
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        """Open the client session."""
        connector = aiohttp.TCPConnector(resolver=None if self.allow_private else GuardedResolver(), limit=200)
        self._session = aiohttp.ClientSession(connector=connector, auto_decompress=True)

    async def close(self) -> None:
        """Close the client session."""
        if self._session is not None:
            await self._session.close()

    async def run(self, data: HttpData, context: dict[str, Any], idempotency_key: str) -> Outcome:
        """One attempt; network errors, timeouts, 408, 429 and 5xx are retryable."""
        assert self._session is not None
        try:
            url = str(render(data.url, context))
            headers = {str(k): str(v) for k, v in render(data.headers, context).items()}
            query = {str(k): str(v) for k, v in render(data.query, context).items()}
            body = render(data.body, context)
        except ExpressionError as exc:
            return Outcome.failure(str(exc), "expression")
        headers["Idempotency-Key"] = idempotency_key
        request = {"method": data.method, "url": url, "headers": headers, "query": query}
        timeout = (data.timeout_ms or self.default_timeout_ms) / 1000
        try:
            async with asyncio.timeout(timeout):
                status, resp_headers, payload = await self._follow(data.method, url, headers, query, body)
        except TimeoutError:
            return _with_input(
                Outcome.failure(f"no response from {url} within {timeout:g}s", "timeout", retryable=True), request
            )
        except PrivateAddressError as exc:
            return _with_input(Outcome.failure(str(exc), "forbidden-address"), request)
        except UnsupportedUrl as exc:
            return _with_input(Outcome.failure(str(exc), "configuration"), request)
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            return _with_input(Outcome.failure(f"request to {url} failed: {exc}", "network", retryable=True), request)
        output = {"status": status, "headers": resp_headers, "body": payload}
        if isinstance(payload, _TooLarge):
            return _with_input(
                Outcome.failure(f"response of {url} is larger than {self.max_bytes} bytes", "response-too-large"),
                request,
            )
        accepted = status in data.accept_status if data.accept_status else 200 <= status < 300
        if accepted:
            return Outcome(ok=True, output=output, input=request)
        retryable = status in RETRYABLE_STATUS or status >= 500
        failure = Outcome(
            ok=False,
            output=output,
            message=f"{data.method} {url} answered {status}",
            error_type="http-status",
            retryable=retryable,
            input=request,
        )
        return failure

    async def _follow(
        self, method: str, url: str, headers: dict[str, str], query: dict[str, str], body: Any
    ) -> tuple[int, dict[str, str], Any]:
        assert self._session is not None
        for _ in range(MAX_REDIRECTS + 1):
            self._check_literal(url)
            kwargs: dict[str, Any] = {"headers": headers, "params": query or None, "allow_redirects": False}
            if body is not None and method not in ("GET", "HEAD"):
                kwargs["json"] = body
            async with self._session.request(method, url, **kwargs) as resp:
                if resp.status in (301, 302, 303, 307, 308) and "Location" in resp.headers:
                    url = urljoin(str(resp.url), resp.headers["Location"])
                    if resp.status == 303 or (resp.status in (301, 302) and method == "POST"):
                        method, body = "GET", None
                    query = {}
                    continue
                raw = await _read_capped(resp, self.max_bytes + 1)
                kept = {k.lower(): v for k, v in resp.headers.items() if k.lower() in SAFE_RESPONSE_HEADERS}
                if len(raw) > self.max_bytes:
                    return resp.status, kept, _TooLarge()
                return resp.status, kept, _decode(raw, resp.content_type)
        raise aiohttp.TooManyRedirects(request_info=None, history=(), message="too many redirects")  # type: ignore[arg-type]

    def _check_literal(self, url: str) -> None:
        parsed = URL(url)
        if parsed.scheme not in ("http", "https"):
            raise UnsupportedUrl(f"only http and https URLs can be called, not {parsed.scheme!r}")
        host = parsed.host or ""
        if self.allow_private:
            return
        try:
            literal = forbidden_address(host.strip("[]"))
        except ValueError:
            if host.lower() == "localhost" or host.lower().endswith(".localhost"):
                raise PrivateAddressError(f"{host} is a private address; http steps may not reach it") from None
            return  # a name: the resolver checks what it resolves to
        if literal:
            raise PrivateAddressError(f"{host} is a private address; http steps may not reach it")


async def _read_capped(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    """At most ``limit`` bytes of the body (reads stop there: a huge body never fills memory)."""
    data = bytearray()
    while len(data) < limit:
        chunk = await resp.content.read(limit - len(data))
        if not chunk:
            break
        data += chunk
    return bytes(data)


class _TooLarge:
    """Stands for a response body over the cap (never read further)."""


def _decode(raw: bytes, content_type: str) -> Any:
    text = raw.decode("utf-8", errors="replace")
    if content_type == "application/json" or content_type.endswith("+json"):
        try:
            return json.loads(text)
        except ValueError:
            return text
    return text


def _with_input(outcome: Outcome, request: dict[str, Any]) -> Outcome:
    return Outcome(
        ok=outcome.ok,
        output=outcome.output,
        message=outcome.message,
        error_type=outcome.error_type,
        retryable=outcome.retryable,
        input=request,
    )


async def run_publish(
    js: JetStreamContext, data: PublishData, context: dict[str, Any], *, tenant: str, msg_id: str
) -> Outcome:
    """Publish the payload on ``fm.out.{t}.<name>``; a re-run of the same attempt is de-duplicated."""
    try:
        payload = render(data.payload, context)
    except ExpressionError as exc:
        return Outcome.failure(str(exc), "expression")
    try:
        ack = await js.publish(
            out_message(tenant, data.name),
            json.dumps(payload).encode(),
            headers={h.MSG_ID: msg_id, h.TENANT: tenant, h.SCHEMA: h.SCHEMA_VERSION},
        )
    except Exception as exc:
        return Outcome.failure(f"publish failed: {exc}", "network", retryable=True)
    return Outcome(ok=True, output={"seq": ack.seq}, input={"name": data.name, "payload": payload})
