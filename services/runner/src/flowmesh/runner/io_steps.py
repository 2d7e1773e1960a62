"""Steps that do I/O: ``http``, ``llm`` and ``publish``. Each returns an :class:`Outcome`, never raises."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import replace
from typing import Any, Final
from urllib.parse import urljoin

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from nats.js import JetStreamContext
from yarl import URL

from flowmesh.contracts import headers as h
from flowmesh.contracts.errors import FlowmeshError, GatewayTimeout, NotFound, ServiceUnavailable
from flowmesh.contracts.expressions import ExpressionError, render
from flowmesh.contracts.models.definition import HttpData, LlmData, PublishData
from flowmesh.contracts.models.usage import KEYS_REVEAL_ROLE, RevealedKey, RevealKey
from flowmesh.contracts.subjects import UsageOp, out_message
from flowmesh.runner.addresses import forbidden_address, legacy_ipv4
from flowmesh.runner.llm import base_url, build_request, read_completion, redact
from flowmesh.runner.outcome import Outcome
from flowmesh.runner.urls import render_url, same_origin, without_credentials
from flowmesh.runtime.rpc import RpcClient
from flowmesh.runtime.tracing import client_trace_config, inject

MAX_REDIRECTS: Final = 5
RETRYABLE_STATUS: Final = frozenset({408, 429})
SAFE_RESPONSE_HEADERS: Final = ("content-type", "content-length", "etag", "last-modified", "location", "retry-after")


class PrivateAddressError(OSError):
    """The target resolves to an address http steps may not reach."""


class UnsupportedUrl(ValueError):
    """Not an http(s) URL."""


class ResponseTooLarge(ValueError):
    """A response body over the cap (reading stopped there)."""


class TooManyRedirects(ValueError):
    """More than :data:`MAX_REDIRECTS` redirects (a loop, most likely)."""


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
            raise PrivateAddressError(f"{host} resolves to a private address; http and llm steps may not reach it")
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
        # no cookie jar: the session serves every tenant, and a cookie one tenant's call received
        # must never go along with another tenant's request to the same host
        self._session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=True,
            cookie_jar=aiohttp.DummyCookieJar(),
            # a client span and a traceparent on each request (and each redirect hop)
            trace_configs=[client_trace_config()],
        )

    async def close(self) -> None:
        """Close the client session."""
        if self._session is not None:
            await self._session.close()

    async def run(
        self, data: HttpData, context: dict[str, Any], idempotency_key: str, *, secrets: Iterable[str] = ()
    ) -> Outcome:
        """One attempt; network errors, timeouts, 408, 429 and 5xx are retryable.

        ``secrets`` are the values of the step's secrets: a header holding one is a credential, dropped
        on a redirect to another origin whatever its name.
        """
        assert self._session is not None
        try:
            target = render_url(data.url, context)
            headers = {str(k): str(v) for k, v in render(data.headers, context).items()}
            query = {str(k): str(v) for k, v in render(data.query, context).items()}
            body = render(data.body, context)
        except ExpressionError as exc:
            return Outcome.failure(str(exc), exc.error_type)
        except ValueError as exc:
            return Outcome.failure(f"the URL is not valid: {exc}", "configuration")
        url = str(target)
        headers["Idempotency-Key"] = idempotency_key
        request = {"method": data.method, "url": url, "headers": headers, "query": query}
        timeout = (data.timeout_ms or self.default_timeout_ms) / 1000
        try:
            async with asyncio.timeout(timeout):
                status, resp_headers, payload = await self._follow(
                    data.method, target, headers, query, body, secrets=tuple(v for v in secrets if v)
                )
        except TimeoutError:
            return _with_input(
                Outcome.failure(f"no response from {url} within {timeout:g}s", "timeout", retryable=True), request
            )
        except PrivateAddressError as exc:
            return _with_input(Outcome.failure(str(exc), "forbidden-address"), request)
        except UnsupportedUrl as exc:
            return _with_input(Outcome.failure(str(exc), "configuration"), request)
        except TooManyRedirects as exc:
            return _with_input(Outcome.failure(str(exc), "too-many-redirects"), request)
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            if refused := _refused(exc):
                return _with_input(Outcome.failure(str(refused), "forbidden-address"), request)
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
        self,
        method: str,
        url: URL,
        headers: dict[str, str],
        query: dict[str, str],
        body: Any,
        *,
        secrets: tuple[str, ...] = (),
    ) -> tuple[int, dict[str, str], Any]:
        """The request and its redirects; once one leaves the first origin, credentials stay behind."""
        assert self._session is not None
        origin = url
        for _ in range(MAX_REDIRECTS + 1):
            self._check_literal(str(url))
            kwargs: dict[str, Any] = {"headers": headers, "params": query or None, "allow_redirects": False}
            if body is not None and method not in ("GET", "HEAD"):
                kwargs["json"] = body
            async with self._session.request(method, url, **kwargs) as resp:
                if resp.status in (301, 302, 303, 307, 308) and "Location" in resp.headers:
                    url = URL(urljoin(str(resp.url), resp.headers["Location"]))
                    if not same_origin(url, origin):
                        headers = without_credentials(headers)
                        headers = {k: v for k, v in headers.items() if not any(x in v for x in secrets)}
                    if resp.status == 303 or (resp.status in (301, 302) and method == "POST"):
                        method, body = "GET", None
                    query = {}
                    continue
                raw = await _read_capped(resp, self.max_bytes + 1)
                kept = {k.lower(): v for k, v in resp.headers.items() if k.lower() in SAFE_RESPONSE_HEADERS}
                if len(raw) > self.max_bytes:
                    return resp.status, kept, _TooLarge()
                return resp.status, kept, _decode(raw, resp.content_type)
        raise TooManyRedirects(f"{origin} redirected more than {MAX_REDIRECTS} times")

    async def post_json(self, url: str, body: Any, headers: Mapping[str, str]) -> tuple[int, bytes]:
        """One POST of a JSON body, redirects not followed: the status and the body.

        Raises:
            PrivateAddressError: the target is private and private targets are not allowed.
            UnsupportedUrl: not an http(s) URL.
            ResponseTooLarge: the body is over the cap.
            aiohttp.ClientError, OSError: the request failed on the way.
        """
        assert self._session is not None
        self._check_literal(url)
        async with self._session.post(url, json=body, headers=dict(headers), allow_redirects=False) as resp:
            raw = await _read_capped(resp, self.max_bytes + 1)
            if len(raw) > self.max_bytes:
                raise ResponseTooLarge(f"response of {url} is larger than {self.max_bytes} bytes")
            return resp.status, raw

    def _check_literal(self, url: str) -> None:
        parsed = URL(url)
        if parsed.scheme not in ("http", "https"):
            raise UnsupportedUrl(f"only http and https URLs can be called, not {parsed.scheme!r}")
        host = parsed.host or ""
        legacy = legacy_ipv4(host)
        if legacy is not None:
            if not self.allow_private and forbidden_address(str(legacy)):
                raise PrivateAddressError(
                    f"{host} ({legacy}) is a private address; http and llm steps may not reach it"
                )
            raise UnsupportedUrl(f"{host} is not a canonical IPv4 address; write it as {legacy}")
        if self.allow_private:
            return
        try:
            literal = forbidden_address(host.strip("[]"))
        except ValueError:
            if host.lower() == "localhost" or host.lower().endswith(".localhost"):
                raise PrivateAddressError(f"{host} is a private address; http and llm steps may not reach it") from None
            return  # a name: the resolver checks what it resolves to
        if literal:
            raise PrivateAddressError(f"{host} is a private address; http and llm steps may not reach it")


def _refused(exc: BaseException) -> PrivateAddressError | None:
    """The guard's refusal behind a connection error (aiohttp wraps what the resolver raises), or None."""
    if isinstance(exc, aiohttp.ClientConnectorError) and isinstance(exc.os_error, PrivateAddressError):
        return exc.os_error
    return None


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
    return replace(outcome, input=request)


KeyReveal = Callable[[str, str], Awaitable[str]]
"""``(tenant, provider) -> key``: a tenant's stored API key. Raises :class:`NotFound` when none is stored."""


def usage_key_reveal(client: RpcClient, *, timeout: float | None = None) -> KeyReveal:
    """Keys from the usage service's vault (``fm.rpc.usage.keys.reveal``, as the runner's role)."""

    async def reveal(tenant: str, provider: str) -> str:
        answer = await client.call(
            UsageOp.KEYS_REVEAL, RevealKey(provider=provider), tenant=tenant, role=KEYS_REVEAL_ROLE, timeout=timeout
        )
        return RevealedKey.model_validate(answer).api_key

    return reveal


class LlmStep:
    """Runs ``llm`` steps: a chat completion with the tenant's key, through the ``http`` step's client.

    So the same private-address guard and response cap apply. The key is asked for on every attempt
    (not cached: a replaced or deleted key counts from the next attempt, and the plaintext lives for
    one attempt only), sent only as ``Authorization: Bearer …``, and removed from anything recorded.
    """

    def __init__(
        self, http: HttpStep, reveal: KeyReveal, *, providers: Mapping[str, str], default_timeout_ms: int
    ) -> None:
        self.http = http
        self.reveal = reveal
        self.providers = dict(providers)
        self.default_timeout_ms = default_timeout_ms

    async def run(self, data: LlmData, context: dict[str, Any], *, tenant: str) -> Outcome:
        """One attempt; network errors, timeouts and the provider's 408, 429 and 5xx are retryable."""
        provider = data.provider.lower()
        base = base_url(self.providers, provider)
        if base is None:
            known = ", ".join(sorted(self.providers)) or "none"
            return Outcome.failure(
                f"llm provider {data.provider!r} is not configured in this runner (known: {known}; "
                "FLOWMESH_RUNNER_LLM_PROVIDERS adds providers)",
                "configuration",
            )
        try:
            request = build_request(data, context, base)
        except ExpressionError as exc:
            return Outcome.failure(str(exc), exc.error_type)
        key = ""
        timeout = (data.timeout_ms or self.default_timeout_ms) / 1000
        try:
            async with asyncio.timeout(timeout):
                found = await self._key(tenant, provider)
                if isinstance(found, Outcome):
                    return _with_input(found, request.record)
                key = found
                headers = {"Authorization": f"Bearer {key}", "Accept": "application/json"}
                status, raw = await self.http.post_json(request.url, request.body, headers)
            outcome = read_completion(status, raw, provider=provider)
        except TimeoutError:
            outcome = Outcome.failure(f"no answer from {provider} within {timeout:g}s", "timeout", retryable=True)
        except PrivateAddressError as exc:
            outcome = Outcome.failure(str(exc), "forbidden-address")
        except UnsupportedUrl as exc:
            outcome = Outcome.failure(str(exc), "configuration")
        except ResponseTooLarge as exc:
            outcome = Outcome.failure(str(exc), "response-too-large")
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            if refused := _refused(exc):
                outcome = Outcome.failure(str(refused), "forbidden-address")
            else:
                outcome = Outcome.failure(f"request to {request.url} failed: {exc}", "network", retryable=True)
        return redact(_with_input(outcome, request.record), key)

    async def _key(self, tenant: str, provider: str) -> str | Outcome:
        """The tenant's key of ``provider``, or the failure to record when there is none to use."""
        try:
            return await self.reveal(tenant, provider)
        except NotFound:
            return Outcome.failure(
                f"no {provider} API key is stored for this tenant; add one with POST /api/v1/api-keys",
                "missing-key",
            )
        except (ServiceUnavailable, GatewayTimeout) as exc:
            return Outcome.failure(
                f"the {provider} API key cannot be read now: {exc.detail}", "key-unavailable", retryable=True
            )
        except FlowmeshError as exc:
            return Outcome.failure(f"the {provider} API key cannot be used: {exc.detail}", "configuration")


async def run_publish(
    js: JetStreamContext, data: PublishData, context: dict[str, Any], *, tenant: str, msg_id: str
) -> Outcome:
    """Publish the payload on ``fm.out.{t}.<name>``; a re-run of the same attempt is de-duplicated."""
    try:
        payload = render(data.payload, context)
    except ExpressionError as exc:
        return Outcome.failure(str(exc), exc.error_type)
    try:
        ack = await js.publish(
            out_message(tenant, data.name),
            json.dumps(payload).encode(),
            headers=inject({h.MSG_ID: msg_id, h.TENANT: tenant, h.SCHEMA: h.SCHEMA_VERSION}),
        )
    except Exception as exc:
        return Outcome.failure(f"publish failed: {exc}", "network", retryable=True)
    return Outcome(ok=True, output={"seq": ack.seq}, input={"name": data.name, "payload": payload})
