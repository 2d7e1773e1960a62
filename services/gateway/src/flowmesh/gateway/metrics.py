"""The gateway's Prometheus metrics: requests by route template, latency, live WebSockets.

Every label has a bounded set of values, whatever clients send: the route is the template a request
matched (``/api/v1/flows/{flowId}``, the OpenAPI document's path), never the raw path, and
``unmatched`` for any path no route serves; a method outside HTTP's usual ones is ``other``. Label
children are cached (one dictionary lookup per request).
"""

from __future__ import annotations

import functools
import re
from typing import Final

from aiohttp import web
from prometheus_client import Counter, Gauge, Histogram
from pydantic.alias_generators import to_camel

HTTP_REQUESTS: Final = Counter(
    "flowmesh_http_requests_total", "HTTP requests, by method, route template and status", ["method", "route", "status"]
)
HTTP_SECONDS: Final = Histogram(
    "flowmesh_http_request_seconds",
    "HTTP request latency by method, route template and status class (WebSocket sessions are left out: "
    "their time is the connection's life)",
    ["method", "route", "status_class"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
WEBSOCKETS: Final = Gauge(
    "flowmesh_gateway_websocket_connections", "Live WebSocket connections open on this gateway", ["kind"]
)

METHODS: Final = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
UNMATCHED: Final = "unmatched"
_PARAM = re.compile(r"\{(\w+)\}")


@functools.cache
def route_template(canonical: str) -> str:
    """aiohttp's route (``/api/v1/flows/{flow_id}``) as the API documents it (``/api/v1/flows/{flowId}``)."""
    return _PARAM.sub(lambda m: "{" + to_camel(m.group(1)) + "}", canonical)


def route_of(request: web.Request) -> str:
    """The template of the route ``request`` matched, or ``unmatched``."""
    resource = request.match_info.route.resource
    return route_template(resource.canonical) if resource is not None else UNMATCHED


@functools.cache
def _requests(method: str, route: str, status: int) -> Counter:
    return HTTP_REQUESTS.labels(method, route, str(status))


@functools.cache
def _seconds(method: str, route: str, status: int) -> Histogram:
    return HTTP_SECONDS.labels(method, route, f"{status // 100}xx")


def request_done(request: web.Request, status: int, elapsed: float, *, websocket: bool) -> None:
    """Count one answered request and, unless it was a WebSocket session, its latency."""
    method = request.method if request.method in METHODS else "other"
    route = route_of(request)
    _requests(method, route, status).inc()
    if not websocket:
        _seconds(method, route, status).observe(elapsed)
