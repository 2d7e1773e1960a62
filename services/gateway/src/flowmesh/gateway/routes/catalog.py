"""``/api/v1/catalog/steps``: the step types a canvas can offer."""

from __future__ import annotations

from aiohttp import web

from flowmesh.contracts.models.flows import StepCatalog
from flowmesh.contracts.subjects import FlowsOp
from flowmesh.gateway.openapi.operation import Operation
from flowmesh.gateway.routes.common import call, json_response

routes = web.RouteTableDef()


@routes.get("/api/v1/catalog/steps")
@Operation(
    "listStepTypes",
    "Every step type with its handles and the JSON Schema of its `data`",
    tag="catalog",
    responses={200: StepCatalog},
)
async def catalog(request: web.Request) -> web.Response:
    """Every step type with its handles and the JSON Schema of its ``data``."""
    return json_response(await call(request, FlowsOp.CATALOG))
