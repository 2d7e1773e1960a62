"""Operational endpoints at the root: liveness, readiness, metrics."""

from __future__ import annotations

import asyncio
from typing import Literal

from aiohttp import web
from pydantic import BaseModel, Field

from flowmesh.contracts import subjects
from flowmesh.contracts.errors import FlowmeshError
from flowmesh.contracts.models import WireModel
from flowmesh.gateway import keys
from flowmesh.gateway.body import read_query
from flowmesh.gateway.openapi.operation import Operation, Raw
from flowmesh.runtime.health import metrics_response

routes = web.RouteTableDef()


class Health(WireModel):
    """``GET /healthz``: the process serves requests."""

    status: Literal["ok"]


class Readiness(WireModel):
    """``GET /readyz``: NATS and every service, each ``true`` when it answered."""

    status: Literal["ok", "unavailable", "draining"]
    checks: dict[str, bool]


@routes.get("/healthz")
@Operation("healthz", "Liveness", tag="operations", responses={200: Health}, public=True, calls_service=False)
async def healthz(_: web.Request) -> web.Response:
    """Liveness: the process serves requests."""
    return web.json_response({"status": "ok"})


class ReadinessQuery(BaseModel):
    """``GET /readyz`` parameters."""

    scope: Literal["all", "self"] = Field(
        default="all",
        description="`all`: NATS and every service answer; `self`: this replica can serve (NATS connected, not "
        "draining), what a load balancer should ask, so that one service down does not take every gateway out",
    )


@routes.get("/readyz")
@Operation(
    "readyz",
    "Readiness: NATS and every service reachable",
    tag="operations",
    responses={200: Readiness, 503: Readiness},
    query=ReadinessQuery,
    notes={503: "Something is not reachable (`checks` says what), or the replica is draining before it stops."},
    public=True,
    calls_service=False,
)
async def readyz(request: web.Request) -> web.Response:
    """Readiness: NATS is connected and every service answers its ping (``?scope=self``: this replica only)."""
    if request.app[keys.DRAINING].is_set():
        return web.json_response({"status": "draining", "checks": {}}, status=503)
    query = read_query(request, ReadinessQuery)
    broker = request.app[keys.BROKER]
    connected = broker.connection is not None and broker.connection.is_connected
    checks = {"nats": connected}
    if query.scope == "all":
        checks |= await _services_answer(request.app, connected=connected)
    ok = all(checks.values())
    return web.json_response({"status": "ok" if ok else "unavailable", "checks": checks}, status=200 if ok else 503)


async def _services_answer(app: web.Application, *, connected: bool) -> dict[str, bool]:
    """Each service, ``True`` when it answered its ping in time (all ``False`` without NATS: none can)."""
    names = list(subjects.RPC_PREFIXES)
    if not connected:
        return dict.fromkeys(names, False)
    rpc = app[keys.RPC]
    timeout = app[keys.SETTINGS].ready_timeout_s

    async def ping(service: str) -> bool:
        try:
            await rpc.call(subjects.ping(service), tenant="", timeout=timeout)
        except FlowmeshError:
            return False
        return True

    results = await asyncio.gather(*(ping(n) for n in names))
    return dict(zip(names, results, strict=True))


@routes.get("/metrics")
@Operation(
    "metrics",
    "Prometheus metrics",
    tag="operations",
    responses={200: Raw({"text/plain": {"type": "string"}})},
    public=True,
    calls_service=False,
)
async def metrics(_: web.Request) -> web.Response:
    """Prometheus metrics."""
    return metrics_response()
