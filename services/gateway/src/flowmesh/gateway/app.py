"""The gateway: the only public door: HTTP and WebSocket, JWT, the only thing clients reach."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from aiohttp import web

from flowmesh.contracts.models.ws import WsClose
from flowmesh.contracts.streams import IDEMPOTENCY_BUCKET, IDEMPOTENCY_TTL_S, WS_TICKET_TTL_S, WS_TICKETS_BUCKET
from flowmesh.gateway import body, keys, middleware
from flowmesh.gateway.auth import JwtVerifier
from flowmesh.gateway.cors import cors_middleware
from flowmesh.gateway.idempotency import IN_FLIGHT_MARGIN_S, IdempotencyStore
from flowmesh.gateway.live import Flusher, Hub
from flowmesh.gateway.ratelimit import AddressLimiter, PlanSource, RateLimiter, SocketCounts, webhooks_rate
from flowmesh.gateway.routes import audit, catalog, docs, events, flows, hooks, ops, runs, secrets, triggers, usage, ws
from flowmesh.gateway.settings import GatewaySettings
from flowmesh.runtime.nats import NatsRefusals, create_broker, ensure_bucket, stop_broker
from flowmesh.runtime.rpc import RpcClient
from flowmesh.runtime.service import check_authenticated, redact_url, settled, starting

log = logging.getLogger(__name__)


async def _nats(app: web.Application) -> AsyncIterator[None]:
    settings = app[keys.SETTINGS]
    login = settings.nats_login
    refusals = NatsRefusals(login.user or "gateway")
    broker = create_broker(settings.nats_url, name="gateway", login=login, refusals=refusals)
    async with starting("gateway", settings, refusals):
        await broker.start()
        check_authenticated(broker, settings)
        app[keys.BROKER] = broker
        app[keys.RPC] = RpcClient(broker, timeout=settings.rpc_timeout_s)
        js = broker.connection.jetstream()
        app[keys.JETSTREAM] = js
        app[keys.HUB] = Hub(js)
        replicas = settings.stream_replicas
        app[keys.WS_TICKETS] = await ensure_bucket(js, WS_TICKETS_BUCKET, ttl_s=WS_TICKET_TTL_S, replicas=replicas)
        app[keys.IDEMPOTENCY] = IdempotencyStore(
            await ensure_bucket(js, IDEMPOTENCY_BUCKET, ttl_s=IDEMPOTENCY_TTL_S, replicas=replicas),
            # a claim outlives any request it guards, so only a replica that died leaves one to expire
            in_flight_s=settings.request_timeout_s + IN_FLIGHT_MARGIN_S,
        )
        await settled(broker)
    log.info("gateway connected to %s", redact_url(settings.nats_url))
    yield
    await stop_broker(broker)


async def _close_sockets(app: web.Application) -> None:
    """On shutdown, live streams end with 1001: clients reconnect (to any replica) with ``?after=``."""
    sockets = app[keys.SOCKETS]
    for socket in tuple(sockets):
        await socket.close(code=WsClose.GONE, message=b"gateway stopping; reconnect with ?after=<last seq>")


async def _close_connections_when_draining(request: web.Request, response: web.StreamResponse) -> None:
    """While draining, each answer closes its connection: the client's next request goes elsewhere."""
    if request.app[keys.DRAINING].is_set() and not isinstance(response, web.WebSocketResponse):
        response.force_close()
        # aiohttp wrote its Connection header before this hook: say it, or the client reuses the socket
        response.headers["Connection"] = "close"


def create_app(settings: GatewaySettings) -> web.Application:
    """The gateway application; NATS connects when it starts (``cleanup_ctx``)."""
    app = web.Application(
        client_max_size=settings.max_body_bytes,
        middlewares=[
            middleware.observe,
            cors_middleware(settings.cors_origin_list),
            middleware.problems,
            middleware.placement,
            middleware.readable_headers,
            middleware.authenticate,
            body.storable_path,
            middleware.rate_limit,
            middleware.idempotent,
            middleware.deadline,
        ],
    )
    app[keys.SETTINGS] = settings
    app[keys.VERIFIER] = JwtVerifier(settings)
    plans = PlanSource(settings.default_plan, usage.plan_lookup(app), ttl_s=settings.plan_cache_s)
    app[keys.LIMITER] = RateLimiter(plans)
    app[keys.WEBHOOK_LIMITER] = RateLimiter(plans, rate_of=webhooks_rate, what="webhook deliveries")
    app[keys.UNKNOWN_HOOKS] = AddressLimiter(settings.webhook_unknown_per_s)
    app[keys.WS_COUNTS] = SocketCounts()
    app[keys.SOCKETS] = set()
    app[keys.LISTENERS] = keys.Listeners()
    app[keys.DRAINING] = asyncio.Event()
    app.on_response_prepare.append(middleware.secure_headers)
    app.on_response_prepare.append(_close_connections_when_draining)
    app[keys.FLUSHER] = Flusher()
    app.cleanup_ctx.append(_nats)
    app.on_shutdown.append(_close_sockets)
    app.add_routes(ops.routes)
    app.add_routes(flows.routes)
    app.add_routes(triggers.routes)
    app.add_routes(catalog.routes)
    app.add_routes(runs.routes)
    app.add_routes(usage.routes)
    app.add_routes(audit.routes)
    app.add_routes(secrets.routes)
    app.add_routes(events.routes)
    app.add_routes(ws.routes)
    app.add_routes(docs.routes)
    hooks.setup(app)
    return app
