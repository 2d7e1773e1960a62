"""``/api/v1/flows``: flow CRUD, forwarded to the flows service (DESIGN §6)."""

from __future__ import annotations

from aiohttp import web

from flowmesh.contracts.errors import InvalidInput, NotFound
from flowmesh.contracts.models import (
    FieldError,
    FlowCreate,
    FlowDeleteRequest,
    FlowListQuery,
    FlowPatchRequest,
    FlowRef,
    FlowReplaceRequest,
    FlowUpdate,
    PageQuery,
)
from flowmesh.contracts.models.base import MAX_INT4
from flowmesh.contracts.models.flows import FlowExport, Rollback
from flowmesh.contracts.models.rpc import VersionRef
from flowmesh.contracts.strict import parse_strict
from flowmesh.contracts.subjects import FlowsOp
from flowmesh.gateway.body import read_body, read_json, read_query
from flowmesh.gateway.routes.common import absolute_url, call, json_response

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


def _flow_ref(request: web.Request) -> FlowRef:
    return FlowRef(flow_id=request.match_info["flow_id"])


@routes.post("/api/v1/flows/{flow_id}/validate")
async def validate_flow(request: web.Request) -> web.Response:
    """Every problem of the draft at once (200 either way)."""
    return json_response(await call(request, FlowsOp.VALIDATE, _flow_ref(request)))


@routes.post("/api/v1/flows/{flow_id}/publish")
async def publish_flow(request: web.Request) -> web.Response:
    """Freeze the draft as a new active version (201), or return the identical active one (200)."""
    result = await call(request, FlowsOp.PUBLISH, _flow_ref(request))
    return json_response(result["version"], status=201 if result["created"] else 200)


@routes.get("/api/v1/flows/{flow_id}/versions")
async def list_versions(request: web.Request) -> web.Response:
    """The flow's versions, newest first."""
    page = read_query(request, PageQuery)
    body = {**_flow_ref(request).wire(), **page.wire()}
    return json_response(await call(request, FlowsOp.VERSIONS, body))


@routes.get("/api/v1/flows/{flow_id}/versions/{version}")
async def get_version(request: web.Request) -> web.Response:
    """One immutable version."""
    raw = request.match_info["version"]
    if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= MAX_INT4:
        raise NotFound(f"no version {raw}")
    ref = VersionRef(flow_id=request.match_info["flow_id"], version=int(raw))
    return json_response(await call(request, FlowsOp.VERSION, ref))


@routes.post("/api/v1/flows/{flow_id}/rollback")
async def rollback_flow(request: web.Request) -> web.Response:
    """Make an earlier version the active one."""
    target = await read_body(request, Rollback)
    return _with_etag(await call(request, FlowsOp.ROLLBACK, {**_flow_ref(request).wire(), **target.wire()}))


@routes.post("/api/v1/flows/{flow_id}/activate")
async def activate_flow(request: web.Request) -> web.Response:
    """Let the flow's triggers fire and its runs start."""
    return _with_etag(await call(request, FlowsOp.ACTIVATE, _flow_ref(request)))


@routes.post("/api/v1/flows/{flow_id}/deactivate")
async def deactivate_flow(request: web.Request) -> web.Response:
    """Stop the flow's triggers; starts answer 409 until it is activated again."""
    return _with_etag(await call(request, FlowsOp.DEACTIVATE, _flow_ref(request)))


@routes.post("/api/v1/flows/{flow_id}/duplicate")
async def duplicate_flow(request: web.Request) -> web.Response:
    """A new draft with the same content, named "<name> (copy)"."""
    flow = await call(request, FlowsOp.DUPLICATE, _flow_ref(request))
    return _with_etag(flow, status=201)


@routes.get("/api/v1/flows/{flow_id}/export")
async def export_flow(request: web.Request) -> web.Response:
    """A portable document of the flow and its triggers (no tokens, no secrets)."""
    return json_response(await call(request, FlowsOp.EXPORT, _flow_ref(request)))


@routes.post("/api/v1/flows/import")
async def import_flow(request: web.Request) -> web.Response:
    """A new draft from an export document; webhook triggers get new URLs (shown once, here)."""
    raw = await read_json(request)
    if isinstance(raw, dict) and "formatVersion" in raw and raw["formatVersion"] != 1:
        raise InvalidInput(
            f"unsupported formatVersion {raw['formatVersion']!r}; this server reads formatVersion 1",
            errors=[FieldError(path="/formatVersion", message="must be 1")],
        )
    doc = parse_strict(FlowExport, raw)
    flow = await call(request, FlowsOp.IMPORT, doc)
    for trigger in flow.get("triggers", []):
        absolute_url(request, trigger)
    return _with_etag(flow, status=201)
