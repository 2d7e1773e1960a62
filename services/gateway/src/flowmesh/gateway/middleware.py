"""Request pipeline: request id and trace context, metrics, errors as problems, authentication."""

from __future__ import annotations

import logging
import re
import time
import uuid
from typing import Final

from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import Counter, Histogram

from flowmesh.contracts.errors import FlowmeshError
from flowmesh.gateway import keys
from flowmesh.gateway.auth import bearer_token
from flowmesh.gateway.problems import from_http_exception, problem_response
from flowmesh.runtime.tracing import new_traceparent, valid_traceparent

log = logging.getLogger(__name__)

HTTP_REQUESTS: Final = Counter("flowmesh_http_requests_total", "HTTP requests", ["method", "route", "status"])
HTTP_SECONDS: Final = Histogram(
    "flowmesh_http_request_seconds",
    "HTTP request latency",
    ["method", "route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)

API_PREFIX: Final = "/api/v1"
PUBLIC_API_PREFIXES: Final = (f"{API_PREFIX}/hooks/",)
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def _route_label(request: web.Request) -> str:
    info = request.match_info.route.resource
    return info.canonical if info is not None else "unmatched"


@web.middleware
async def observe(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Give every request an id and a trace context, echo the id, and record metrics."""
    given = request.headers.get("X-Request-Id", "")
    request[keys.REQUEST_ID] = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
    tp = request.headers.get("traceparent")
    request[keys.TRACEPARENT] = tp if tp is not None and valid_traceparent(tp) else new_traceparent()
    started = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        response.headers["X-Request-Id"] = request[keys.REQUEST_ID]
        return response
    finally:
        route = _route_label(request)
        HTTP_REQUESTS.labels(request.method, route, str(status)).inc()
        HTTP_SECONDS.labels(request.method, route).observe(time.perf_counter() - started)


@web.middleware
async def problems(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn every error into problem+json; nothing escapes as a traceback or an HTML page."""
    try:
        return await handler(request)
    except FlowmeshError as exc:
        if exc.status >= 500:
            log.warning("%s %s -> %s: %s", request.method, request.path, exc.status, exc.detail)
        return problem_response(exc, request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return problem_response(from_http_exception(exc), request, headers=_allow(exc))
    except Exception:
        log.exception(
            "unhandled error on %s %s (request %s)", request.method, request.path, request.get(keys.REQUEST_ID)
        )
        return problem_response(FlowmeshError("an unexpected error occurred; it has been logged"), request)


def _allow(exc: web.HTTPException) -> dict[str, str] | None:
    if isinstance(exc, web.HTTPMethodNotAllowed):
        return {"Allow": ", ".join(sorted(exc.allowed_methods))}
    return None


@web.middleware
async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every ``/api/v1`` route needs a valid bearer token, except public webhooks and CORS preflights."""
    path = request.path
    if path.startswith(API_PREFIX) and request.method != "OPTIONS" and not path.startswith(PUBLIC_API_PREFIXES):
        token = bearer_token(request.headers.get("Authorization"))
        request[keys.PRINCIPAL] = await request.app[keys.VERIFIER].verify(token)
    return await handler(request)
