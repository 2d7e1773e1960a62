"""Live runs over WebSocket: ``/ws/runs/{runId}``, ``/ws/flows/{flowId}``, and tickets."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import socket
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp import WSCloseCode, web
from nats.js.errors import InvalidKeyError, KeyNotFoundError, KeyWrongLastSequenceError

from flowmesh.contracts import subjects
from flowmesh.contracts.errors import BadRequest, Forbidden, Unauthorized
from flowmesh.contracts.models import FlowRef
from flowmesh.contracts.models.base import MAX_INT4
from flowmesh.contracts.models.rpc import RunEventsQuery, RunRef
from flowmesh.contracts.models.ws import BEARER_PREFIX, SUBPROTOCOL, WsClose, WsEvent, WsSnapshot, WsTicket
from flowmesh.contracts.streams import WS_TICKET_TTL_S
from flowmesh.contracts.subjects import FlowsOp, RunsOp
from flowmesh.gateway import keys, metrics
from flowmesh.gateway.auth import Principal
from flowmesh.gateway.cors import CorsPolicy
from flowmesh.gateway.live import FILL_PAGE, Watcher
from flowmesh.gateway.openapi.operation import Operation
from flowmesh.gateway.routes.common import call, json_response

routes = web.RouteTableDef()

HEARTBEAT_S = 20.0
"""WebSocket ping frames (no JSON pings): browsers answer them without any code."""
SEND_BUFFER_BYTES = 64 * 1024
DIRECT_WRITE_LIMIT = 64 * 1024
"""Above this many bytes waiting in the connection, frames queue and are sent with flow control."""


def _handshake(messages: str) -> str:
    """The OpenAPI description of a live route: its handshake, then the ``messages`` it sends."""
    return (
        f"A WebSocket handshake. Offer the subprotocols `{SUBPROTOCOL}` and `{BEARER_PREFIX}<token>` "
        "(browsers cannot set an Authorization header on a WebSocket), or pass `?ticket=` from "
        f"`POST /api/v1/ws-tickets`; the server selects `{SUBPROTOCOL}`. `Origin`, when sent, must be one of the "
        "CORS origins. A refused handshake is an ordinary problem+json response, never a stream. Messages (server "
        f"to client, JSON text frames): {messages}. Keep-alive is WebSocket ping frames every 20 s; a client that "
        "falls 1,000 events behind is closed with code 1013 and reconnects with `?after=<last seq>`; a stopping "
        "gateway closes with 1001."
    )


@routes.post("/api/v1/ws-tickets")
@Operation(
    "createWsTicket",
    "A single-use, 30-second credential for a browser's WebSocket (`?ticket=`)",
    tag="live",
    responses={201: WsTicket},
    calls_service=False,
)
async def create_ticket(request: web.Request) -> web.Response:
    """A single-use, 30-second credential for a browser's WebSocket (``?ticket=``)."""
    principal = request[keys.PRINCIPAL]
    ticket = "wst_" + secrets.token_urlsafe(24)
    expires = datetime.now(UTC) + timedelta(seconds=WS_TICKET_TTL_S)
    value = {"sub": principal.sub, "tenant": principal.tenant, "role": principal.role, "exp": expires.timestamp()}
    await request.app[keys.WS_TICKETS].create(ticket, json.dumps(value).encode())
    return json_response(WsTicket(ticket=ticket, expires_at=expires).wire(), status=201)


@routes.get("/ws/runs/{run_id}")
@Operation(
    "watchRun",
    "Live run: a snapshot, then every event (WebSocket)",
    tag="live",
    responses={101: None},
    errors=(400, 401, 403, 404, 429),
    notes={
        101: "Switching to the WebSocket protocol `flowmesh.v1`.",
        429: "The token (its subject) or the tenant already has the plan's WebSockets open on this gateway "
        "(`websocketsPerToken`, `websocketsPerTenant`); close one, then retry.",
        400: "`after` is not an integer ≥ 0, or `Sec-WebSocket-Protocol` does not offer `flowmesh.v1`.",
        401: "No credentials, or an invalid token or ticket.",
        403: "The `Origin` is not allowed.",
    },
    description=_handshake(
        "without `after`, first `WsSnapshot` (`{type: snapshot, run, steps, seq}`), then `WsEvent` "
        "(`{type: event, seq, event}`) for every event with a greater `seq`; with `?after=k`, no snapshot, "
        "every event after `k` from history then live — never a gap or a duplicate"
    ),
    query_params=(
        {
            "name": "after",
            "in": "query",
            "required": False,
            "description": "Replay the events after this `seq` instead of sending a snapshot.",
            "schema": {"type": "integer", "minimum": 0, "maximum": MAX_INT4},
        },
    ),
    headers=("SecWebSocketProtocol",),
    websocket=True,
    messages=(WsSnapshot, WsEvent),
)
async def watch_run(request: web.Request) -> web.StreamResponse:
    """A run's snapshot then its live events; with ``?after=seq``, its events after ``seq`` then live."""
    after = _after(request)
    await _authenticate(request)
    run_id = request.match_info["run_id"]
    run = await call(request, RunsOp.GET, RunRef(run_id=run_id))  # 404 for another tenant's run
    subject = subjects.run_events_of_run(run["tenantId"], run["flowId"], run_id)
    async with _counted(request):
        return await _serve_run(request, run_id, subject, after)


async def _serve_run(request: web.Request, run_id: str, subject: str, after: int | None) -> web.WebSocketResponse:
    ws = _socket()
    watcher = _watcher(request, ws)
    hub = request.app[keys.HUB]
    try:
        # live first, then the state: nothing published after the snapshot's read is missed (and
        # a failure here is still an HTTP answer: the connection is upgraded only after)
        await hub.watch(subject, watcher)
        snapshot = await call(request, RunsOp.SNAPSHOT, RunRef(run_id=run_id)) if after is None else None
        await _open(request, ws, "run")
        if snapshot is not None:
            watcher.start({run_id: snapshot["seq"]}, first=json.dumps(snapshot, separators=(",", ":")))
        else:
            watcher.start({run_id: after or 0})
            watcher.catch_up(run_id)
        await _serve(ws, watcher)
    finally:
        _closed(request, ws, "run")
        await hub.unwatch(subject, watcher)
        await watcher.close()
    return ws


@routes.get("/ws/flows/{flow_id}")
@Operation(
    "watchFlow",
    "Live flow: every event of every run of the flow (WebSocket)",
    tag="live",
    responses={101: None},
    errors=(400, 401, 403, 404, 429),
    notes={
        101: "Switching to the WebSocket protocol `flowmesh.v1`.",
        429: "The token (its subject) or the tenant already has the plan's WebSockets open on this gateway "
        "(`websocketsPerToken`, `websocketsPerTenant`); close one, then retry.",
        400: "`since` is not an RFC 3339 time with a zone, or `Sec-WebSocket-Protocol` does not offer `flowmesh.v1`.",
        401: "No credentials, or an invalid token or ticket.",
        403: "The `Origin` is not allowed.",
    },
    description=_handshake(
        "`WsEvent` (`{type: event, seq, event}`, the event carries its `runId`) for every event of every "
        "run of the flow from the moment of connecting; `?since=` first replays the history from then"
    ),
    query_params=(
        {
            "name": "since",
            "in": "query",
            "required": False,
            "description": (
                "First replay the flow's events since this time (RFC 3339 with a zone); a time still to come "
                "replays nothing."
            ),
            "schema": {"type": "string", "format": "date-time"},
        },
    ),
    headers=("SecWebSocketProtocol",),
    websocket=True,
    messages=(WsEvent,),
)
async def watch_flow(request: web.Request) -> web.StreamResponse:
    """Every event of every run of a flow from now on; ``?since=<RFC 3339>`` first replays history."""
    since = _since(request)
    await _authenticate(request)
    flow_id = request.match_info["flow_id"]
    await call(request, FlowsOp.GET, FlowRef(flow_id=flow_id))  # 404 for another tenant's flow
    subject = subjects.run_events_of_flow(request[keys.PRINCIPAL].tenant, flow_id)
    async with _counted(request):
        return await _serve_flow(request, subject, since)


async def _serve_flow(request: web.Request, subject: str, since: datetime | None) -> web.WebSocketResponse:
    ws = _socket()
    watcher = _watcher(request, ws)
    hub = request.app[keys.HUB]
    replay = None
    try:
        if since is None or since >= datetime.now(UTC):
            # a ``since`` still to come has no history: live from now (JetStream would replay it all)
            await hub.watch(subject, watcher)
        else:
            # the stream's history from ``since`` and then live, on one consumer of its own
            replay = await hub.replay(subject, since, watcher)
        await _open(request, ws, "flow")
        watcher.start({})
        await _serve(ws, watcher)
    finally:
        _closed(request, ws, "flow")
        if replay is not None:
            await replay.unsubscribe()
        else:
            await hub.unwatch(subject, watcher)
        await watcher.close()
    return ws


# --- handshake -----------------------------------------------------------------------------------


async def _authenticate(request: web.Request) -> None:
    """Origin, then credentials: a ``bearer.<token>`` subprotocol or a ``?ticket=``; refused before upgrading."""
    origin = request.headers.get("Origin")
    if origin is not None and not CorsPolicy(request.app[keys.SETTINGS].cors_origin_list).allows(origin):
        raise Forbidden(f"origin {origin} is not allowed; add it to FLOWMESH_CORS_ORIGINS")
    offered = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()]
    if offered and SUBPROTOCOL not in offered:
        # refused here, naming nothing offered: aiohttp would log the offer, token included, at WARNING
        raise BadRequest(f"offer the subprotocol `{SUBPROTOCOL}` (with `{BEARER_PREFIX}<token>` or a ?ticket=)")
    token = next((p[len(BEARER_PREFIX) :] for p in offered if p.startswith(BEARER_PREFIX)), None)
    ticket = request.query.get("ticket")
    if token:
        request[keys.PRINCIPAL] = await request.app[keys.VERIFIER].verify(token)
    elif ticket:
        request[keys.PRINCIPAL] = await _redeem(request, ticket)
    else:
        raise Unauthorized(
            f"offer the subprotocols `{SUBPROTOCOL}` and `{BEARER_PREFIX}<token>`, "
            "or pass ?ticket= from POST /api/v1/ws-tickets"
        )


async def _redeem(request: web.Request, ticket: str) -> Principal:
    """Use a ticket once: deleting it at the revision read makes a second use fail on any replica."""
    kv = request.app[keys.WS_TICKETS]
    try:
        entry = await kv.get(ticket)
        await kv.delete(ticket, last=entry.revision)
    except (KeyNotFoundError, KeyWrongLastSequenceError, InvalidKeyError, ValueError) as exc:
        raise Unauthorized("the ticket is unknown, expired or already used; get a new one") from exc
    value = json.loads(entry.value or b"{}")
    if value.get("exp", 0) < datetime.now(UTC).timestamp():
        raise Unauthorized("the ticket has expired; get a new one")
    return Principal(sub=value["sub"], tenant=value["tenant"], role=value["role"])


@contextlib.asynccontextmanager
async def _counted(request: web.Request) -> AsyncIterator[None]:
    """Hold one of the plan's WebSockets of the token's subject and of the tenant (429, before upgrading, if none)."""
    principal = request[keys.PRINCIPAL]
    plan = await request.app[keys.LIMITER].plans.plan_of(principal.tenant)
    counts = request.app[keys.WS_COUNTS]
    counts.open(principal.tenant, principal.sub, plan)
    try:
        yield
    finally:
        counts.close(principal.tenant, principal.sub)


def _socket() -> web.WebSocketResponse:
    # no permessage-deflate: with context takeover it costs a compressor per socket and CPU per
    # message per watcher, where the same encoded text is otherwise written to every watcher
    return web.WebSocketResponse(
        protocols=(SUBPROTOCOL,), heartbeat=HEARTBEAT_S, max_msg_size=64 * 1024, compress=False
    )


def _watcher(request: web.Request, ws: web.WebSocketResponse) -> Watcher:
    """What writes events to ``ws``: straight to the connection when it can, filling gaps from run history."""
    return Watcher(ws.send_str, _direct(request, ws), _history(request), flusher=request.app[keys.FLUSHER])


async def _open(request: web.Request, ws: web.WebSocketResponse, kind: str) -> None:
    sock = request.transport.get_extra_info("socket") if request.transport is not None else None
    if sock is not None:
        # a fixed kernel buffer per watcher (no autotuning to megabytes): memory stays bounded with
        # thousands of sockets, and "behind" is measured in our queue, where the 1013 rule sees it
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
    await ws.prepare(request)
    request.app[keys.SOCKETS].add(ws)
    metrics.WEBSOCKETS.labels(kind).inc()


def _closed(request: web.Request, ws: web.WebSocketResponse, kind: str) -> None:
    """Forget a socket: the gauge goes down only for one :func:`_open` counted (a handshake may fail first)."""
    sockets = request.app[keys.SOCKETS]
    if ws in sockets:
        sockets.discard(ws)
        metrics.WEBSOCKETS.labels(kind).dec()


async def _serve(ws: web.WebSocketResponse, watcher: Watcher) -> None:
    """Read (and ignore) what the client sends until it closes, or close it when it falls behind."""
    reader = _reader(ws)
    slow = watcher.too_slow.wait()
    _, pending = await asyncio.wait(
        {asyncio.ensure_future(reader), asyncio.ensure_future(slow)}, return_when=asyncio.FIRST_COMPLETED
    )
    for task in pending:
        task.cancel()
    if watcher.too_slow.is_set() and not ws.closed:
        if watcher.failed is not None:
            await ws.close(code=WSCloseCode.INTERNAL_ERROR, message=b"history unavailable; reconnect with ?after=")
        else:
            await ws.close(code=WsClose.TOO_SLOW, message=b"too far behind; reconnect with ?after=<last seq>")


async def _reader(ws: web.WebSocketResponse) -> None:
    async for _ in ws:
        pass


def _direct(request: web.Request, ws: web.WebSocketResponse) -> Callable[[bytes], bool]:
    """Write a ready frame straight to the connection when its buffer has room (no task per watcher)."""

    def write(frame: bytes) -> bool:
        transport = request.transport
        if transport is None or transport.is_closing() or ws.closed:
            return False
        if transport.get_write_buffer_size() > DIRECT_WRITE_LIMIT:
            return False
        transport.write(frame)
        return True

    return write


def _history(request: web.Request) -> Any:
    async def fill(run_id: str, after: int) -> list[dict[str, Any]]:
        page = await call(request, RunsOp.EVENTS, RunEventsQuery(run_id=run_id, after=after, page_size=FILL_PAGE))
        items: list[dict[str, Any]] = page["items"]
        return items

    return fill


def _after(request: web.Request) -> int | None:
    raw = request.query.get("after")
    if raw is None:
        return None
    if not (raw.isascii() and raw.isdigit()) or int(raw) > MAX_INT4:
        raise BadRequest("after must be a run event seq (an integer ≥ 0)")
    return int(raw)


def _since(request: web.Request) -> datetime | None:
    raw = request.query.get("since")
    if raw is None:
        return None
    try:
        since = datetime.fromisoformat(raw)
    except ValueError as exc:
        raise BadRequest("since must be an RFC 3339 time, e.g. 2026-01-31T12:00:00Z") from exc
    if since.tzinfo is None:
        raise BadRequest("since needs a time zone, e.g. 2026-01-31T12:00:00Z")
    return since
