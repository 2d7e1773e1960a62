"""The HTTP server under the application: requests the parser refuses are answered as problems too.

aiohttp answers a request it cannot parse (a header or request line over 8,190 bytes, a bad
character in a header name) itself, before any middleware: a ``text/plain`` 400 whose body quotes
the offending bytes, and an ERROR traceback whose message quotes them again, so an over-long
``Authorization`` header put part of its token in the logs. aiohttp has no public hook for this
(aio-libs/aiohttp#3287), so the gateway runs its application with :class:`GatewayRunner`, whose
connections are :class:`_Protocol`: the same handler, with ``handle_error`` answering
``application/problem+json`` (431 for a line too long, 400 otherwise) with the security headers, and
logging one WARNING that names the kind of error only, never a byte of the request.

It reaches into ``aiohttp.web.Server`` (its ``_loop`` and ``_kwargs``) and ``AppRunner._make_server``;
aiohttp is pinned, and ``tests/test_server.py`` fails if an upgrade changes either.
"""

from __future__ import annotations

import json
import logging
from typing import Final

from aiohttp import http_exceptions, web
from aiohttp.web_protocol import RequestHandler

from flowmesh.contracts.errors import BadRequest, FlowmeshError
from flowmesh.gateway.middleware import add_security_headers
from flowmesh.gateway.problems import PROBLEM_JSON

log = logging.getLogger("flowmesh.gateway.server")

MAX_LINE_BYTES: Final = 8190
"""aiohttp's limit on the request line and on each header field (``max_line_size``, ``max_field_size``)."""


class HeadersTooLarge(FlowmeshError):
    """A request line or header field over the parser's limit (RFC 6585 §5)."""

    status = 431
    code = "headers-too-large"
    title = "Request header fields too large"


def refusal(exc: BaseException | None) -> FlowmeshError:
    """What to answer a request the parser refused, in words that quote nothing of it."""
    if isinstance(exc, http_exceptions.LineTooLong):
        return HeadersTooLarge(
            f"the request line or a header field is longer than {MAX_LINE_BYTES} bytes; "
            "send a shorter URL or header (a bearer token belongs in Authorization, once)"
        )
    return BadRequest("the request is not valid HTTP/1.1 (a malformed request line or header)")


class _Protocol(RequestHandler):
    """aiohttp's connection handler, answering its own refusals as problems."""

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """The parser's refusals (4xx) as a problem and one WARNING naming the error's kind only.

        A 5xx here is an error that escaped every middleware (a bug): aiohttp's handling logs its
        traceback, and the client gets a problem that says nothing of it.
        """
        if status >= 500:
            super().handle_error(request, status, exc, message)  # logs it; its text/plain answer is dropped
            error = FlowmeshError("an unexpected error occurred; it has been logged")
        else:
            error = refusal(exc)
            # as aiohttp does: a first "request" with no HTTP method is TLS or a scanner, not a client
            first_garbage = self._request_count == 1 and isinstance(exc, http_exceptions.BadHttpMethod)
            log.log(
                logging.DEBUG if first_garbage else logging.WARNING,
                "refused a request that is not valid HTTP (%s) from %s: answered %s",
                type(exc).__name__ if exc is not None else "unknown",
                request.remote,
                error.status,
            )
        if request.writer.output_size > 0:
            raise ConnectionError("the response has started; no problem can follow it")
        response = web.Response(
            status=error.status,
            text=json.dumps(error.to_problem().wire(exclude_none=True)),
            content_type=PROBLEM_JSON,
        )
        add_security_headers(response, "")
        response.force_close()
        return response


class _Server(web.Server):
    def __call__(self) -> RequestHandler:
        return _Protocol(self, loop=self._loop, **self._kwargs)


class GatewayRunner(web.AppRunner):
    """``web.AppRunner`` whose connections answer unparseable requests with problems."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        mine = _Server(
            server.request_handler,
            request_factory=server.request_factory,
            handler_cancellation=server.handler_cancellation,
            loop=server._loop,
            **server._kwargs,
        )
        return mine
