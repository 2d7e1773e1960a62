"""``/api/v1/flows``: flow CRUD, forwarded to the flows service (DESIGN §6)."""

from __future__ import annotations

from aiohttp import web

from flowmesh.contracts.models import (
    FlowCreate,
    FlowDeleteRequest,
    FlowListQuery,
    FlowPatchRequest,
    FlowRef,
    FlowReplaceRequest,
    FlowUpdate,
)
from flowmesh.contracts.subjects import FlowsOp
from flowmesh.gateway.body import read_body, read_query
from flowmesh.gateway.routes.common import call, json_response

routes = web.RouteTableDef()


def _with_etag(flow: dict[str, object], *, status: int = 200) -> web.Response:
    return json_response(flow, status=status, headers={"ETag": f'"{flow["revision"]}"'})


@routes.get("/api/v1/flows")
async def list_flows(request: web.Request) -> web.Response:
    """List the tenant's flows, newest update first."""
    return json_response(await call(request, FlowsOp.LIST, read_query(request, FlowListQuery)))


@routes.post("/api/v1/flows")
async def create_flow(request: web.Request) -> web.Response:
    """Create a draft flow."""
    flow = await call(request, FlowsOp.CREATE, await read_body(request, FlowCreate))
    response = _with_etag(flow, status=201)
    response.headers["Location"] = f"/api/v1/flows/{flow['id']}"
    return response


@routes.get("/api/v1/flows/{flow_id}")
async def get_flow(request: web.Request) -> web.Response:
    """A flow with its draft definition."""
    return _with_etag(await call(request, FlowsOp.GET, FlowRef(flow_id=request.match_info["flow_id"])))


@routes.patch("/api/v1/flows/{flow_id}")
async def patch_flow(request: web.Request) -> web.Response:
    """Change some fields of the draft; ``If-Match`` guards against lost updates."""
    patch = await read_body(request, FlowUpdate)
    req = FlowPatchRequest(
        flow_id=request.match_info["flow_id"],
        if_match=request.headers.get("If-Match"),
        patch=patch.wire(exclude_unset=True),
    )
    return _with_etag(await call(request, FlowsOp.UPDATE, req))


@routes.put("/api/v1/flows/{flow_id}")
async def replace_flow(request: web.Request) -> web.Response:
    """Replace the whole draft (a canvas save); ``If-Match`` guards against lost updates."""
    flow = await read_body(request, FlowCreate)
    req = FlowReplaceRequest(flow_id=request.match_info["flow_id"], if_match=request.headers.get("If-Match"), flow=flow)
    return _with_etag(await call(request, FlowsOp.REPLACE, req))


@routes.delete("/api/v1/flows/{flow_id}")
async def delete_flow(request: web.Request) -> web.Response:
    """Delete a flow (``?force=true`` also for a published one)."""
    req = FlowDeleteRequest(
        flow_id=request.match_info["flow_id"],
        if_match=request.headers.get("If-Match"),
        force=request.query.get("force", "").lower() in ("1", "true", "yes"),
    )
    await call(request, FlowsOp.DELETE, req)
    return web.Response(status=204)
