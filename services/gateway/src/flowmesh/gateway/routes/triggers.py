"""``/api/v1/flows/{id}/triggers`` and ``/api/v1/triggers/{id}``: webhook, schedule and event triggers."""

from __future__ import annotations

from aiohttp import web

from flowmesh.contracts.models import FlowRef, Trigger, TriggerCreate, TriggerUpdate
from flowmesh.contracts.models.flows import TriggerList
from flowmesh.contracts.models.rpc import TriggerCreateRequest, TriggerPatchRequest, TriggerRef
from flowmesh.contracts.subjects import FlowsOp
from flowmesh.gateway.body import read_body
from flowmesh.gateway.openapi.operation import Operation
from flowmesh.gateway.routes.common import absolute_url, call, json_response

routes = web.RouteTableDef()


@routes.get("/api/v1/flows/{flow_id}/triggers")
@Operation("listTriggers", "A flow's triggers", tag="triggers", responses={200: TriggerList})
async def list_triggers(request: web.Request) -> web.Response:
    """A flow's triggers (webhook URLs and secrets are never shown again after creation)."""
    return json_response(await call(request, FlowsOp.TRIGGERS, FlowRef(flow_id=request.match_info["flow_id"])))


@routes.post("/api/v1/flows/{flow_id}/triggers")
@Operation(
    "createTrigger",
    "Add a webhook, schedule or event trigger",
    tag="triggers",
    responses={201: Trigger},
    errors=(403,),
    notes={
        201: "The trigger; a webhook's `url` (and a signed one's `secret`) is shown in this response only.",
        403: "The flow has the plan's triggers per flow (`quota-exceeded`).",
    },
    description=(
        "`config` by type: `webhook` `{signed?}`; `schedule` `{cron, timezone (IANA, default UTC), misfire "
        "(skip | fireOnce | fireAll)}`, 5 cron fields or 6 with seconds first; `event` `{eventType, filter? "
        "(CEL)}`. A config that does not fit its type is a 422, and so is a cron that fires more often than "
        "the plan's shortest cron interval."
    ),
    body=TriggerCreate,
)
async def create_trigger(request: web.Request) -> web.Response:
    """Add a trigger; a webhook's URL (and a signed one's secret) is in this response only."""
    trigger = await read_body(request, TriggerCreate)
    req = TriggerCreateRequest(flow_id=request.match_info["flow_id"], trigger=trigger)
    created = absolute_url(request, await call(request, FlowsOp.TRIGGER_CREATE, req))
    return json_response({k: v for k, v in created.items() if v is not None}, status=201)


@routes.patch("/api/v1/triggers/{trigger_id}")
@Operation(
    "updateTrigger",
    "Rename, reconfigure, enable or disable a trigger",
    tag="triggers",
    responses={200: Trigger},
    body=TriggerUpdate,
)
async def update_trigger(request: web.Request) -> web.Response:
    """Rename, reconfigure, enable or disable a trigger."""
    patch = await read_body(request, TriggerUpdate)
    req = TriggerPatchRequest(trigger_id=request.match_info["trigger_id"], patch=patch.wire(exclude_unset=True))
    updated = await call(request, FlowsOp.TRIGGER_UPDATE, req)
    return json_response({k: v for k, v in updated.items() if v is not None})


@routes.delete("/api/v1/triggers/{trigger_id}")
@Operation(
    "deleteTrigger",
    "Remove a trigger; a webhook URL stops working at once",
    tag="triggers",
    responses={204: None},
)
async def delete_trigger(request: web.Request) -> web.Response:
    """Remove a trigger; a webhook URL stops working at once."""
    await call(request, FlowsOp.TRIGGER_DELETE, TriggerRef(trigger_id=request.match_info["trigger_id"]))
    return web.Response(status=204)
