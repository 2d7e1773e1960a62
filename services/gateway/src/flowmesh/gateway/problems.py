"""Every error leaves the gateway here, as ``application/problem+json`` (RFC 9457)."""

from __future__ import annotations

import json
import logging

from aiohttp import web

from flowmesh.contracts.errors import (
    BadRequest,
    FlowmeshError,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
)

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"


def problem_response(error: FlowmeshError, request: web.Request, headers: dict[str, str] | None = None) -> web.Response:
    """The problem+json response of an error."""
    body = error.to_problem(instance=request.path).wire(exclude_none=True)
    return web.Response(
        status=error.status,
        text=json.dumps(body),
        content_type=PROBLEM_JSON,
        headers=headers,
    )


def from_http_exception(exc: web.HTTPException) -> FlowmeshError:
    """aiohttp's own refusals (no route, wrong method, body too large) in our vocabulary."""
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return PayloadTooLarge(f"the body is over the {exc.text or 'size'} limit")
    if isinstance(exc, web.HTTPNotFound):
        return NotFound("no such route")
    if isinstance(exc, web.HTTPMethodNotAllowed):
        return MethodNotAllowed(f"{exc.method} is not allowed here; allowed: {', '.join(sorted(exc.allowed_methods))}")
    if 400 <= exc.status < 500:
        return BadRequest(exc.reason)
    return FlowmeshError(exc.reason)
