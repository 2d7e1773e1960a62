"""Request pipeline: request id and trace context, metrics and access log, errors as problems,
authentication, rate limits, ``Idempotency-Key``, and a time limit on each request; and the
security headers every response carries (:func:`secure_headers`, an ``on_response_prepare`` hook).

In ``create_app`` they run in this order (CORS, from ``cors.py``, goes right after ``observe`` so
that error responses carry CORS headers too):

    observe → cors → problems → authenticate → rate_limit → idempotent → deadline → handler

``idempotent`` turns errors into responses itself, so it can store a 4xx and release the key on a
5xx; ``deadline`` is inside it, so a request that ran out of time releases its key.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import random
import re
import time
from typing import Final

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler

from flowmesh.contracts.errors import BadRequest, FlowmeshError, GatewayTimeout, NotFound, RateLimited
from flowmesh.gateway import idempotency, keys, metrics
from flowmesh.gateway.auth import bearer_token
from flowmesh.gateway.problems import from_http_exception, problem_response
from flowmesh.gateway.routes.docs import PAGE as DOCS_PAGE
from flowmesh.runtime.logs import log_context
from flowmesh.runtime.tracing import current_traceparent, new_traceparent, span, valid_traceparent
from flowmesh.runtime.tracing import enabled as tracing_enabled

log = logging.getLogger(__name__)
access_log = logging.getLogger("flowmesh.gateway.access")

API_PREFIX: Final = "/api/v1"
PUBLIC_API_PREFIXES: Final = (f"{API_PREFIX}/hooks/",)
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

SERVER: Final = "flowmesh"
"""The ``Server`` header: no library or Python version for a scanner to match against known flaws."""
API_CSP: Final = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
"""JSON answers load nothing and are never framed: a browser that renders one runs and shows nothing."""


def _docs_csp(page: str) -> str:
    """The docs page's policy: Swagger UI's script, style and icons from this origin, its one inline
    script by hash, ``openapi.json`` and "try it out" requests to this origin; ``data:`` images are
    the icons inside Swagger UI's stylesheet, and its components set inline styles."""
    inline = re.findall(r"<script>(.*?)</script>", page, flags=re.DOTALL)
    hashes = " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(s.encode()).digest()).decode()}'" for s in inline)
    return (
        f"default-src 'none'; script-src 'self' {hashes}; style-src 'self' 'unsafe-inline'; "
        "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
    )


DOCS_CSP: Final = _docs_csp(DOCS_PAGE)
SECURITY_HEADERS: Final = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": API_CSP,
    "Server": SERVER,
}


def add_security_headers(response: web.StreamResponse, path: str) -> None:
    """``nosniff``, no framing, a content security policy and a ``Server`` that names no versions."""
    response.headers.update(SECURITY_HEADERS)
    if path == "/docs":
        response.headers["Content-Security-Policy"] = DOCS_CSP


async def secure_headers(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare``: every answer of the application, errors and 404s included."""
    add_security_headers(response, request.path)


def logged_path(request: web.BaseRequest) -> str:
    """The path as logs show it: a webhook's URL token is its credential, so it is left out."""
    path = request.path
    if path.startswith(PUBLIC_API_PREFIXES):
        return f"{API_PREFIX}/hooks/{{token}}"
    return path


@web.middleware
async def observe(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Give every request an id and a trace context (a server span when tracing is on), echo the id,
    and record metrics."""
    given = request.headers.get("X-Request-Id", "")
    # unique, not secret: no system call for it (uuid4 reads os.urandom)
    request[keys.REQUEST_ID] = given if _REQUEST_ID.match(given) else f"{random.getrandbits(128):032x}"
    tp = request.headers.get("traceparent")
    # a request without a trace starts one: its span is the root (tracing on), else only an id to pass on
    parent = tp if tp is not None and valid_traceparent(tp) else (None if tracing_enabled() else new_traceparent())
    route = metrics.route_of(request)
    started = time.perf_counter()
    status = 500
    with span(
        f"{request.method} {route}", kind="server", parent=parent, attributes=_span_attributes(request, route)
    ) as s:
        request[keys.TRACEPARENT] = current_traceparent() or parent or new_traceparent()
        websocket = False
        try:
            response = await handler(request)
            status = response.status
            websocket = isinstance(response, web.WebSocketResponse)
            if not response.prepared:  # a WebSocket has sent its headers already
                response.headers["X-Request-Id"] = request[keys.REQUEST_ID]
            return response
        finally:
            elapsed = time.perf_counter() - started
            s.set_attribute("http.response.status_code", status)
            if status >= 500:
                s.set_error(f"HTTP {status}")
            metrics.request_done(request, status, elapsed, websocket=websocket)
            if request.app[keys.SETTINGS].access_log:
                _log_access(request, status, elapsed)


def _span_attributes(request: web.Request, route: str) -> dict[str, str] | None:
    """A request span's attributes (none built with tracing off)."""
    if not tracing_enabled():
        return None
    return {"http.request.method": request.method, "http.route": route, "url.path": logged_path(request)}


def _log_access(request: web.Request, status: int, elapsed: float) -> None:
    rid = request[keys.REQUEST_ID]
    ms = round(elapsed * 1000, 2)
    path = logged_path(request)
    access_log.info(
        "%s %s %s %.1fms request_id=%s",
        request.method,
        path,
        status,
        ms,
        rid,
        extra=_access_fields(request, rid, path, status, ms),
    )


def _access_fields(request: web.Request, rid: str, path: str, status: int, ms: float) -> dict[str, object]:
    fields: dict[str, object] = {
        "requestId": rid,
        "method": request.method,
        "path": path,
        "status": status,
        "durationMs": ms,
    }
    principal = request.get(keys.PRINCIPAL)
    if principal is not None:  # logged after the authenticated part of the pipeline has returned
        fields["tenant"] = principal.tenant
    return fields


def error_response(exc: FlowmeshError, request: web.Request) -> web.Response:
    """The problem response of an error, with the headers its kind calls for (``Retry-After`` on a 429)."""
    if exc.status >= 500:
        log.warning(
            "%s %s -> %s: %s (request %s)",
            request.method,
            logged_path(request),
            exc.status,
            exc.detail,
            request.get(keys.REQUEST_ID),
        )
    headers = {"Retry-After": str(exc.retry_after_s)} if isinstance(exc, RateLimited) else None
    return problem_response(exc, request, headers=headers)


@web.middleware
async def problems(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn every error into problem+json; nothing escapes as a traceback or an HTML page."""
    try:
        return await handler(request)
    except FlowmeshError as exc:
        return error_response(exc, request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return problem_response(from_http_exception(exc), request, headers=_allow(exc))
    except Exception:
        log.exception(
            "unhandled error on %s %s (request %s)", request.method, logged_path(request), request.get(keys.REQUEST_ID)
        )
        return problem_response(FlowmeshError("an unexpected error occurred; it has been logged"), request)


def _allow(exc: web.HTTPException) -> dict[str, str] | None:
    if isinstance(exc, web.HTTPMethodNotAllowed):
        return {"Allow": ", ".join(sorted(exc.allowed_methods))}
    return None


HEALTH_PATHS: Final = ("/healthz", "/readyz")
"""Served on both ports, always: probes may use either."""


def _page(path: str) -> str | None:
    """Which placed operational page a path is: ``metrics``, ``docs``, or None (the API, the probes)."""
    if path == "/metrics":
        return "metrics"
    if path in ("/docs", "/openapi.json") or path.startswith("/docs/"):
        return "docs"
    return None


def _on_health_port(request: web.Request) -> bool:
    port = request.app[keys.LISTENERS].health_port
    if port is None or request.transport is None:
        return False
    sockname = request.transport.get_extra_info("sockname")
    return isinstance(sockname, tuple) and len(sockname) >= 2 and sockname[1] == port


@web.middleware
async def placement(request: web.Request, handler: Handler) -> web.StreamResponse:
    """``/metrics`` and the docs where the settings place them; the health port serves nothing else."""
    page = _page(request.path)
    settings = request.app[keys.SETTINGS]
    where = {"metrics": settings.metrics_placement, "docs": settings.docs}.get(page or "", "public")
    if _on_health_port(request):
        served = request.path in HEALTH_PATHS or (page is not None and where != "off")
    else:
        served = where == "public"
    if not served:
        raise NotFound(f"{request.path} is not served here")
    return await handler(request)


@web.middleware
async def readable_headers(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Refuse (400) a header whose bytes are not UTF-8.

    aiohttp hands such bytes on as lone surrogates, which no JSON body, KV key or log line can hold:
    an ``If-Match`` or ``Idempotency-Key`` of them was a 500.
    """
    for name, value in request.headers.items():
        if not value.isascii():
            try:
                value.encode()
            except UnicodeEncodeError:
                raise BadRequest(f"the {name} header is not UTF-8") from None
    return await handler(request)


@web.middleware
async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every ``/api/v1`` route needs a valid bearer token, except public webhooks and CORS preflights."""
    path = request.path
    if path.startswith(API_PREFIX) and request.method != "OPTIONS" and not path.startswith(PUBLIC_API_PREFIXES):
        token = bearer_token(request.headers.get("Authorization"))
        principal = await request.app[keys.VERIFIER].verify(token)
        request[keys.PRINCIPAL] = principal
        with log_context(tenant=principal.tenant):
            return await handler(request)
    return await handler(request)


@web.middleware
async def rate_limit(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Count the request against its tenant's plan (429 with ``Retry-After`` over it)."""
    principal = request.get(keys.PRINCIPAL)
    if principal is not None:
        await request.app[keys.LIMITER].admit(principal.tenant)
    return await handler(request)


@web.middleware
async def idempotent(request: web.Request, handler: Handler) -> web.StreamResponse:
    """``Idempotency-Key`` on every authenticated POST (webhooks have ``webhook-id`` instead).

    See :mod:`flowmesh.gateway.idempotency` for the semantics.
    """
    raw_key = request.headers.get(idempotency.KEY_HEADER, "").strip()
    principal = request.get(keys.PRINCIPAL)
    resource = request.match_info.route.resource
    if request.method != hdrs.METH_POST or not raw_key or principal is None or resource is None:
        return await handler(request)
    key = idempotency.checked_key(raw_key)
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        return await handler(request)  # refused as 413 by the route, the same way every time
    route = resource.canonical
    fp = idempotency.fingerprint(request.method, request.path, request.query.items(), body)
    store = request.app[keys.IDEMPOTENCY]
    claim = await store.claim(idempotency.storage_key(principal.tenant, route, key), fp)
    if isinstance(claim, idempotency.Completed):
        if route in idempotency.SERVICE_ANSWERS_REPEATS:
            return await handler(request)
        return claim.replay()
    try:
        response = await handler(request)
    except FlowmeshError as exc:
        response = error_response(exc, request)
    except BaseException:
        await asyncio.shield(store.release(claim))
        raise
    if response.status < 500 and isinstance(response, web.Response):
        await store.complete(claim, response)
    else:
        await store.release(claim)
    return response


def _is_websocket(request: web.Request) -> bool:
    return request.path.startswith("/ws/") or request.headers.get(hdrs.UPGRADE, "").lower() == "websocket"


@web.middleware
async def deadline(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A request still unanswered after ``request_timeout_s`` is a 504; WebSockets live as long as they like."""
    if _is_websocket(request):
        return await handler(request)
    limit = request.app[keys.SETTINGS].request_timeout_s
    timeout = asyncio.timeout(limit)
    try:
        async with timeout:
            return await handler(request)
    except TimeoutError as exc:
        if not timeout.expired():
            raise
        raise GatewayTimeout(f"the request took longer than {limit:g} s; it may still complete") from exc
