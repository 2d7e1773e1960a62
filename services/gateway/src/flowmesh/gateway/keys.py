"""Typed keys of application and request state."""

from typing import Final

from aiohttp import web
from faststream.nats import NatsBroker

from flowmesh.gateway.auth import JwtVerifier, Principal
from flowmesh.gateway.settings import GatewaySettings
from flowmesh.runtime.rpc import RpcClient

SETTINGS: Final = web.AppKey("settings", GatewaySettings)
BROKER: Final = web.AppKey("broker", NatsBroker)
RPC: Final = web.AppKey("rpc", RpcClient)
VERIFIER: Final = web.AppKey("verifier", JwtVerifier)

PRINCIPAL: Final = web.RequestKey("principal", Principal)
REQUEST_ID: Final = web.RequestKey("request_id", str)
TRACEPARENT: Final = web.RequestKey("traceparent", str)
