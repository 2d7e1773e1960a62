"""The gateway: the only public door (DESIGN §1, §6 to §8)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from aiohttp import web

from flowmesh.contracts.models.ws import WsClose
from flowmesh.contracts.streams import WS_TICKET_TTL_S, WS_TICKETS_BUCKET
from flowmesh.gateway import keys, middleware
from flowmesh.gateway.auth import JwtVerifier
from flowmesh.gateway.live import Hub
from flowmesh.gateway.routes import catalog, flows, ops, runs, triggers, ws
from flowmesh.gateway.settings import GatewaySettings
from flowmesh.runtime.nats import create_broker, ensure_bucket, stop_broker
from flowmesh.runtime.rpc import RpcClient

log = logging.getLogger(__name__)


async def _nats(app: web.Application) -> AsyncIterator[None]:
    broker = create_broker(app[keys.SETTINGS].nats_url, name="gateway")
    await broker.start()
    app[keys.BROKER] = broker
    app[keys.RPC] = RpcClient(broker, timeout=app[keys.SETTINGS].rpc_timeout_s)
    js = broker.connection.jetstream()
    app[keys.HUB] = Hub(js)
    app[keys.WS_TICKETS] = await ensure_bucket(js, WS_TICKETS_BUCKET, ttl_s=WS_TICKET_TTL_S)
    log.info("gateway connected to %s", app[keys.SETTINGS].nats_url)
    yield
    await stop_broker(broker)


async def _close_sockets(app: web.Application) -> None:
    """On shutdown, live streams end with 1001: clients reconnect (to any replica) with ``?after=``."""
    sockets = app[keys.SOCKETS]
    for socket in tuple(sockets):
        await socket.close(code=WsClose.GONE, message=b"gateway stopping; reconnect with ?after=<last seq>")


def create_app(settings: GatewaySettings) -> web.Application:
    """The gateway application; NATS connects when it starts (``cleanup_ctx``)."""
    app = web.Application(
        client_max_size=settings.max_body_bytes,
        middlewares=[middleware.observe, middleware.problems, middleware.authenticate],
    )
    app[keys.SETTINGS] = settings
    app[keys.VERIFIER] = JwtVerifier(settings)
    app[keys.SOCKETS] = set()
    app.cleanup_ctx.append(_nats)
    app.on_shutdown.append(_close_sockets)
    app.add_routes(ops.routes)
    app.add_routes(flows.routes)
    app.add_routes(triggers.routes)
    app.add_routes(catalog.routes)
    app.add_routes(runs.routes)
    app.add_routes(ws.routes)
    return app
