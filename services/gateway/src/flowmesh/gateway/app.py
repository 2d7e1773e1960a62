"""The gateway: the only public door (DESIGN §1, §6 to §8)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from aiohttp import web

from flowmesh.gateway import keys, middleware
from flowmesh.gateway.auth import JwtVerifier
from flowmesh.gateway.routes import catalog, flows, ops, runs, triggers
from flowmesh.gateway.settings import GatewaySettings
from flowmesh.runtime.nats import create_broker, stop_broker
from flowmesh.runtime.rpc import RpcClient

log = logging.getLogger(__name__)


async def _nats(app: web.Application) -> AsyncIterator[None]:
    broker = create_broker(app[keys.SETTINGS].nats_url, name="gateway")
    await broker.start()
    app[keys.BROKER] = broker
    app[keys.RPC] = RpcClient(broker, timeout=app[keys.SETTINGS].rpc_timeout_s)
    log.info("gateway connected to %s", app[keys.SETTINGS].nats_url)
    yield
    await stop_broker(broker)


def create_app(settings: GatewaySettings) -> web.Application:
    """The gateway application; NATS connects when it starts (``cleanup_ctx``)."""
    app = web.Application(
        client_max_size=settings.max_body_bytes,
        middlewares=[middleware.observe, middleware.problems, middleware.authenticate],
    )
    app[keys.SETTINGS] = settings
    app[keys.VERIFIER] = JwtVerifier(settings)
    app.cleanup_ctx.append(_nats)
    app.add_routes(ops.routes)
    app.add_routes(flows.routes)
    app.add_routes(triggers.routes)
    app.add_routes(catalog.routes)
    app.add_routes(runs.routes)
    return app
