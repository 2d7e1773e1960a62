"""Typed keys of application and request state."""

from typing import Final

from aiohttp import web
from faststream.nats import NatsBroker
from nats.js.kv import KeyValue

from flowmesh.gateway.auth import JwtVerifier, Principal
from flowmesh.gateway.live import Hub
from flowmesh.gateway.settings import GatewaySettings
from flowmesh.runtime.rpc import RpcClient

SETTINGS: Final = web.AppKey("settings", GatewaySettings)
BROKER: Final = web.AppKey("broker", NatsBroker)
RPC: Final = web.AppKey("rpc", RpcClient)
VERIFIER: Final = web.AppKey("verifier", JwtVerifier)
HUB: Final = web.AppKey("hub", Hub)
WS_TICKETS: Final = web.AppKey("ws_tickets", KeyValue)
SOCKETS: Final = web.AppKey("sockets", set[web.WebSocketResponse])

PRINCIPAL: Final = web.RequestKey("principal", Principal)
REQUEST_ID: Final = web.RequestKey("request_id", str)
TRACEPARENT: Final = web.RequestKey("traceparent", str)
