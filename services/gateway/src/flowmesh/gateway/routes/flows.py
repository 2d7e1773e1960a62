"""``/api/v1/flows``: flow CRUD, forwarded to the flows service."""

from __future__ import annotations

from aiohttp import web

from flowmesh.contracts.errors import InvalidInput, NotFound
from flowmesh.contracts.models import (
    FieldError,
    Flow,
    FlowCreate,
    FlowDeleteRequest,
    FlowListQuery,
    FlowPatchRequest,
    FlowRef,
    FlowReplaceRequest,
    FlowSummary,
    FlowUpdate,
    FlowVersion,
    Page,
    PageQuery,
)
from flowmesh.contracts.models.base import MAX_INT4
from flowmesh.contracts.models.flows import FlowExport, ImportedFlow, Rollback, ValidationReport
from flowmesh.contracts.models.rpc import VersionRef
from flowmesh.contracts.strict import parse_strict
from flowmesh.contracts.subjects import FlowsOp
from flowmesh.gateway.body import read_body, read_json, read_query
from flowmesh.gateway.openapi.operation import Operation
from flowmesh.gateway.routes.common import absolute_url, call, json_response

routes = web.RouteTableDef()


class FlowPage(Page[FlowSummary]):
    """A page of flows, newest update first."""


class VersionPage(Page[FlowVersion]):
    """A page of a flow's versions, newest first."""


def _with_etag(flow: dict[str, object], *, status: int = 200) -> web.Response:
    return json_response(flow, status=status, headers={"ETag": f'"{flow["revision"]}"'})


@routes.get("/api/v1/flows")
@Operation("listFlows", "List flows, newest update first", tag="flows", responses={200: FlowPage}, query=FlowListQuery)
async def list_flows(request: web.Request) -> web.Response:
    """List the tenant's flows, newest update first."""
    return json_response(await call(request, FlowsOp.LIST, read_query(request, FlowListQuery)))


@routes.post("/api/v1/flows")
@Operation(
    "createFlow",
    "Create a draft flow",
    tag="flows",
    responses={201: Flow},
    errors=(403,),
    notes={403: "The plan's flow limit is reached (`quota-exceeded`)."},
    body=FlowCreate,
    etag=True,
    location=True,
)
async def create_flow(request: web.Request) -> web.Response:
    """Create a draft flow."""
    flow = await call(request, FlowsOp.CREATE, await read_body(request, FlowCreate))
    response = _with_etag(flow, status=201)
    response.headers["Location"] = f"/api/v1/flows/{flow['id']}"
    return response


@routes.get("/api/v1/flows/{flow_id}")
@Operation("getFlow", "A flow with its draft definition", tag="flows", responses={200: Flow}, etag=True)
async def get_flow(request: web.Request) -> web.Response:
    """A flow with its draft definition."""
    return _with_etag(await call(request, FlowsOp.GET, FlowRef(flow_id=request.match_info["flow_id"])))


@routes.patch("/api/v1/flows/{flow_id}")
@Operation(
    "updateFlow",
    "Change some fields of the draft",
    tag="flows",
    responses={200: Flow},
    errors=(412,),
    body=FlowUpdate,
    if_match=True,
    etag=True,
)
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
@Operation(
    "replaceFlow",
    "Replace the whole draft (a canvas save)",
    tag="flows",
    responses={200: Flow},
    errors=(412,),
    body=FlowCreate,
    if_match=True,
    etag=True,
)
async def replace_flow(request: web.Request) -> web.Response:
    """Replace the whole draft (a canvas save); ``If-Match`` guards against lost updates."""
    flow = await read_body(request, FlowCreate)
    req = FlowReplaceRequest(flow_id=request.match_info["flow_id"], if_match=request.headers.get("If-Match"), flow=flow)
    return _with_etag(await call(request, FlowsOp.REPLACE, req))


@routes.delete("/api/v1/flows/{flow_id}")
@Operation(
    "deleteFlow",
    "Delete a flow",
    tag="flows",
    responses={204: None},
    errors=(409, 412),
    notes={409: "The flow has published versions; delete with `?force=true` (keeps its run history)."},
    query_params=(
        {
            "name": "force",
            "in": "query",
            "required": False,
            "description": "Also delete a published flow: deactivates it, keeps its run history.",
            "schema": {"type": "boolean", "default": False},
        },
    ),
    if_match=True,
)
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
@Operation("validateFlow", "Every problem of the draft at once", tag="flows", responses={200: ValidationReport})
async def validate_flow(request: web.Request) -> web.Response:
    """Every problem of the draft at once (200 either way)."""
    return json_response(await call(request, FlowsOp.VALIDATE, _flow_ref(request)))


@routes.post("/api/v1/flows/{flow_id}/publish")
@Operation(
    "publishFlow",
    "Freeze the draft as a new active version",
    tag="flows",
    responses={201: FlowVersion, 200: FlowVersion},
    errors=(422,),
    notes={
        200: "The draft is identical to the active version: that version.",
        201: "A new version (n+1), now active.",
        422: "The draft is not valid; `errors` lists every problem.",
    },
)
async def publish_flow(request: web.Request) -> web.Response:
    """Freeze the draft as a new active version (201), or return the identical active one (200)."""
    result = await call(request, FlowsOp.PUBLISH, _flow_ref(request))
    return json_response(result["version"], status=201 if result["created"] else 200)


@routes.get("/api/v1/flows/{flow_id}/versions")
@Operation(
    "listVersions",
    "A flow's versions, newest first",
    tag="flows",
    responses={200: VersionPage},
    query=PageQuery,
)
async def list_versions(request: web.Request) -> web.Response:
    """The flow's versions, newest first."""
    page = read_query(request, PageQuery)
    body = {**_flow_ref(request).wire(), **page.wire()}
    return json_response(await call(request, FlowsOp.VERSIONS, body))


@routes.get("/api/v1/flows/{flow_id}/versions/{version}")
@Operation("getVersion", "One immutable version", tag="flows", responses={200: FlowVersion})
async def get_version(request: web.Request) -> web.Response:
    """One immutable version."""
    raw = request.match_info["version"]
    if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= MAX_INT4:
        raise NotFound(f"no version {raw}")
    ref = VersionRef(flow_id=request.match_info["flow_id"], version=int(raw))
    return json_response(await call(request, FlowsOp.VERSION, ref))


@routes.post("/api/v1/flows/{flow_id}/rollback")
@Operation(
    "rollbackFlow",
    "Make an earlier version the active one",
    tag="flows",
    responses={200: Flow},
    notes={404: "No such flow, or it has no such version."},
    body=Rollback,
    etag=True,
)
async def rollback_flow(request: web.Request) -> web.Response:
    """Make an earlier version the active one."""
    target = await read_body(request, Rollback)
    return _with_etag(await call(request, FlowsOp.ROLLBACK, {**_flow_ref(request).wire(), **target.wire()}))


@routes.post("/api/v1/flows/{flow_id}/activate")
@Operation(
    "activateFlow", "Let the flow's triggers fire and its runs start", tag="flows", responses={200: Flow}, etag=True
)
async def activate_flow(request: web.Request) -> web.Response:
    """Let the flow's triggers fire and its runs start."""
    return _with_etag(await call(request, FlowsOp.ACTIVATE, _flow_ref(request)))


@routes.post("/api/v1/flows/{flow_id}/deactivate")
@Operation(
    "deactivateFlow",
    "Stop the flow's triggers; starts answer 409 until it is activated again",
    tag="flows",
    responses={200: Flow},
    etag=True,
)
async def deactivate_flow(request: web.Request) -> web.Response:
    """Stop the flow's triggers; starts answer 409 until it is activated again."""
    return _with_etag(await call(request, FlowsOp.DEACTIVATE, _flow_ref(request)))


@routes.post("/api/v1/flows/{flow_id}/duplicate")
@Operation(
    "duplicateFlow",
    'A new draft with the same content, named "<name> (copy)"',
    tag="flows",
    responses={201: Flow},
    errors=(403,),
    notes={403: "The plan's flow limit is reached (`quota-exceeded`)."},
    etag=True,
)
async def duplicate_flow(request: web.Request) -> web.Response:
    """A new draft with the same content, named "<name> (copy)"."""
    flow = await call(request, FlowsOp.DUPLICATE, _flow_ref(request))
    return _with_etag(flow, status=201)


@routes.get("/api/v1/flows/{flow_id}/export")
@Operation(
    "exportFlow",
    "A portable document of the flow and its triggers (no tokens, no secrets)",
    tag="flows",
    responses={200: FlowExport},
)
async def export_flow(request: web.Request) -> web.Response:
    """A portable document of the flow and its triggers (no tokens, no secrets)."""
    return json_response(await call(request, FlowsOp.EXPORT, _flow_ref(request)))


@routes.post("/api/v1/flows/import")
@Operation(
    "importFlow",
    "A new draft from an export document",
    tag="flows",
    responses={201: ImportedFlow},
    errors=(403,),
    notes={
        201: "The new draft; webhook triggers got new URLs (and signed ones new secrets), shown here only.",
        403: "The plan's flow limit is reached, or the document has more triggers than the plan's triggers "
        "per flow (`quota-exceeded`).",
    },
    body=FlowExport,
    etag=True,
)
async def import_flow(request: web.Request) -> web.Response:
    """A new draft from an export document; webhook triggers get new URLs (shown once, here)."""
    flow = await call(request, FlowsOp.IMPORT, _export_document(await read_json(request)))
    for trigger in flow.get("triggers", []):
        absolute_url(request, trigger)
    return _with_etag(flow, status=201)


def _export_document(raw: object) -> FlowExport:
    """An export document read strictly; another ``formatVersion`` is refused by name before its fields."""
    if isinstance(raw, dict) and "formatVersion" in raw and raw["formatVersion"] != 1:
        raise InvalidInput(
            f"unsupported formatVersion {raw['formatVersion']!r}; this server reads formatVersion 1",
            errors=[FieldError(path="/formatVersion", message="must be 1")],
        )
    return parse_strict(FlowExport, raw)
