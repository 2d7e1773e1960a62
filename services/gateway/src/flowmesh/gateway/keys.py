"""Typed keys of application and request state."""

import asyncio
from dataclasses import dataclass
from typing import Final

from aiohttp import web
from faststream.nats import NatsBroker
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from flowmesh.gateway.auth import JwtVerifier, Principal
from flowmesh.gateway.idempotency import IdempotencyStore
from flowmesh.gateway.live import Flusher, Hub
from flowmesh.gateway.ratelimit import AddressLimiter, RateLimiter, SocketCounts
from flowmesh.gateway.settings import GatewaySettings
from flowmesh.runtime.rpc import RpcClient

SETTINGS: Final = web.AppKey("settings", GatewaySettings)
BROKER: Final = web.AppKey("broker", NatsBroker)
RPC: Final = web.AppKey("rpc", RpcClient)
JETSTREAM: Final = web.AppKey("jetstream", JetStreamContext)
"""Publishes what the gateway sends to streams itself (events of ``POST /api/v1/events/{eventType}``)."""
VERIFIER: Final = web.AppKey("verifier", JwtVerifier)
HUB: Final = web.AppKey("hub", Hub)
FLUSHER: Final = web.AppKey("flusher", Flusher)
WS_TICKETS: Final = web.AppKey("ws_tickets", KeyValue)
SOCKETS: Final = web.AppKey("sockets", set[web.WebSocketResponse])
LIMITER: Final = web.AppKey("limiter", RateLimiter)
"""Per-tenant API request rate limits: ``await app[LIMITER].admit(tenant)``; ``.plans`` answers tenants' plans."""
WEBHOOK_LIMITER: Final = web.AppKey("webhook_limiter", RateLimiter)
"""Per-tenant webhook rate limits, a bucket apart from the API's (the plan's ``webhooksPerSecond``)."""
UNKNOWN_HOOKS: Final = web.AppKey("unknown_hooks", AddressLimiter)
"""Lookups of unknown webhook tokens per client address."""
WS_COUNTS: Final = web.AppKey("ws_counts", SocketCounts)
"""Open WebSockets per token subject and per tenant (this replica's)."""
IDEMPOTENCY: Final = web.AppKey("idempotency", IdempotencyStore)


@dataclass
class Listeners:
    """The ports the gateway listens on, known once it does (an application's state is frozen by then)."""

    health_port: int | None = None


LISTENERS: Final = web.AppKey("listeners", Listeners)
DRAINING: Final = web.AppKey("draining", asyncio.Event)
"""Set on SIGTERM: ``/readyz`` answers 503 and every response closes its connection, for a drain period."""

PRINCIPAL: Final = web.RequestKey("principal", Principal)
REQUEST_ID: Final = web.RequestKey("request_id", str)
TRACEPARENT: Final = web.RequestKey("traceparent", str)
