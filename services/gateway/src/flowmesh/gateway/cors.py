"""CORS: allowed origins from ``FLOWMESH_CORS_ORIGINS``, a small middleware.

aiohttp-cors wants every route registered with it and is barely maintained; our needs are one
origin list for every route, which these few lines cover.

* A preflight (``OPTIONS`` with ``Access-Control-Request-Method``) from an allowed origin is a 204
  with the allow headers; from any other origin a 403 problem without them, as aiohttp-cors does
  (the browser refuses either way; the body tells a developer why).
* Any other response to an allowed origin echoes it in ``Access-Control-Allow-Origin`` and exposes
  the headers clients read. Every response varies by ``Origin``, for caches.
* Credentials are bearer tokens, never cookies: ``Access-Control-Allow-Credentials`` is not sent.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler, Middleware

from flowmesh.contracts.errors import Forbidden
from flowmesh.gateway.problems import problem_response

ALLOW_METHODS: Final = "GET, POST, PUT, PATCH, DELETE, OPTIONS"
ALLOW_HEADERS: Final = (
    "Authorization, Content-Type, Idempotency-Key, If-Match, If-None-Match, X-Request-Id, traceparent, tracestate"
)
EXPOSE_HEADERS: Final = "ETag, Location, Retry-After, X-Request-Id, Idempotent-Replayed"
MAX_AGE_S: Final = 600
"""How long a browser may cache a preflight (browsers cap it: Chromium at 2 h)."""


def _normal(origin: str) -> str:
    return origin.strip().rstrip("/").lower()


class CorsPolicy:
    """Which origins may call the API from a browser; ``*`` in the list allows any."""

    def __init__(self, origins: Iterable[str]) -> None:
        normal = {_normal(o) for o in origins if o.strip()}
        self.any = "*" in normal
        self.origins = frozenset(normal - {"*"})

    def allows(self, origin: str | None) -> bool:
        """Whether a request with this ``Origin`` header may be answered to a browser."""
        return origin is not None and (self.any or _normal(origin) in self.origins)


def _vary_origin(response: web.StreamResponse) -> None:
    vary = response.headers.get(hdrs.VARY)
    if vary is None:
        response.headers[hdrs.VARY] = hdrs.ORIGIN
    elif "origin" not in vary.lower() and vary.strip() != "*":
        response.headers[hdrs.VARY] = f"{vary}, {hdrs.ORIGIN}"


def cors_middleware(origins: Iterable[str]) -> Middleware:
    """The middleware for these allowed origins; place it outside the one that makes error responses."""
    policy = CorsPolicy(origins)

    @web.middleware
    async def cors(request: web.Request, handler: Handler) -> web.StreamResponse:
        origin = request.headers.get(hdrs.ORIGIN)
        allowed = policy.allows(origin)
        if request.method == hdrs.METH_OPTIONS and hdrs.ACCESS_CONTROL_REQUEST_METHOD in request.headers:
            if not allowed:
                refused = Forbidden(f"origin {origin} is not allowed; add it to FLOWMESH_CORS_ORIGINS")
                return problem_response(refused, request, headers={hdrs.VARY: hdrs.ORIGIN})
            return web.Response(
                status=204,
                headers={
                    hdrs.ACCESS_CONTROL_ALLOW_ORIGIN: origin or "",
                    hdrs.ACCESS_CONTROL_ALLOW_METHODS: ALLOW_METHODS,
                    hdrs.ACCESS_CONTROL_ALLOW_HEADERS: ALLOW_HEADERS,
                    hdrs.ACCESS_CONTROL_MAX_AGE: str(MAX_AGE_S),
                    hdrs.VARY: hdrs.ORIGIN,
                },
            )
        response = await handler(request)
        if not response.prepared:  # a WebSocket has sent its headers already
            _vary_origin(response)
            if allowed:
                response.headers[hdrs.ACCESS_CONTROL_ALLOW_ORIGIN] = origin or ""
                response.headers[hdrs.ACCESS_CONTROL_EXPOSE_HEADERS] = EXPOSE_HEADERS
        return response

    return cors
