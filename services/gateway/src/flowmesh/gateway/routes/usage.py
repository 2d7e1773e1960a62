"""Usage, flow statistics, BYOK keys and plans: forwarded to the usage service."""

from __future__ import annotations

import re
from typing import Final

from aiohttp import web

from flowmesh.contracts.errors import Forbidden, InvalidInput, NotFound
from flowmesh.contracts.models import FieldError, FlowRef
from flowmesh.contracts.models.usage import (
    ApiKeyCreate,
    ApiKeyInfo,
    ApiKeyList,
    ApiKeyRef,
    AssignedPlan,
    FlowStats,
    FlowStatsRequest,
    Plan,
    PlanAssignment,
    PlanRef,
    TenantPlan,
    UsageExport,
    UsageExportQuery,
    UsageQuery,
    UsageSummary,
)
from flowmesh.contracts.subjects import FlowsOp, UsageOp
from flowmesh.gateway import keys
from flowmesh.gateway.body import read_body, read_query
from flowmesh.gateway.openapi.operation import Operation, Raw
from flowmesh.gateway.ratelimit import PlanLookup
from flowmesh.gateway.routes.common import call, json_response

routes = web.RouteTableDef()

PROVIDER: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")
MAX_TENANT_ID: Final = 255
PLAN_LOOKUP_TIMEOUT_S: Final = 1.0
"""A plan lookup is on the path of a request: a slow usage service must not hold it long."""


@routes.get("/api/v1/usage")
@Operation(
    "getUsage",
    "The tenant's usage in a billing period against its plan",
    tag="usage",
    responses={200: UsageSummary},
    description=(
        "Billing periods are calendar months (UTC); `periodEnd` is the first instant of the next month. "
        "`runsUsed` counts top-level runs started (a retry in place is not a new run; children of "
        "subflow/foreach steps are not counted); `stepsUsed` finished steps but the trigger; `tokensUsed` the "
        "input and output tokens of `llm` steps. `estimatedOverage` is in USD, pro rata to the cent. Metering "
        "follows run events, usually within a second."
    ),
    query=UsageQuery,
)
async def usage(request: web.Request) -> web.Response:
    """The tenant's usage in a billing period against its plan."""
    return json_response(await call(request, UsageOp.SUMMARY, read_query(request, UsageQuery)))


@routes.get("/api/v1/usage/export")
@Operation(
    "exportUsage",
    "Metered usage per day, for a billing system",
    tag="usage",
    responses={200: Raw({"application/json": UsageExport, "text/csv": {"type": "string"}})},
    notes={200: "The days with usage, oldest first: JSON, or CSV (RFC 4180, a header line) with `format=csv`."},
    description="Days are UTC. By default, this month up to today; at most 366 days per request.",
    query=UsageExportQuery,
)
async def export_usage(request: web.Request) -> web.Response:
    """Metered usage per day, as JSON or CSV, for a billing system."""
    q = read_query(request, UsageExportQuery)
    data = await call(request, UsageOp.EXPORT, q)
    if q.format == "csv":
        return web.Response(
            text=data["csv"],
            content_type="text/csv",
            charset="utf-8",
            headers={"Content-Disposition": 'attachment; filename="usage.csv"'},
        )
    return json_response(data)


@routes.get("/api/v1/flows/{flow_id}/stats")
@Operation(
    "getFlowStats",
    "Executions of a flow: outcomes, average and p95 duration, the last one",
    tag="flows",
    responses={200: FlowStats},
    description=(
        "From metered run events (eventually consistent, usually within a second). `executionsTotal` counts "
        "every run of the flow (children of subflow/foreach steps too), running ones included; `succeeded`, "
        "`failed`, `cancelled`, `timedOut` count finished runs by their latest outcome; durations are over "
        "finished runs; `lastExecutedAt` is when the latest run was queued."
    ),
)
async def flow_stats(request: web.Request) -> web.Response:
    """Executions of one flow: outcomes, average and p95 duration, the last one."""
    flow_id = request.match_info["flow_id"]
    await call(request, FlowsOp.GET, FlowRef(flow_id=flow_id))  # 404 unless it is the tenant's flow
    return json_response(await call(request, UsageOp.FLOW_STATS, FlowStatsRequest(flow_id=flow_id)))


@routes.get("/api/v1/api-keys")
@Operation("listApiKeys", "Stored LLM provider keys (never shown whole)", tag="usage", responses={200: ApiKeyList})
async def list_api_keys(request: web.Request) -> web.Response:
    """The tenant's stored provider keys, each shown only by a hint."""
    return json_response(await call(request, UsageOp.KEYS_LIST))


@routes.post("/api/v1/api-keys")
@Operation(
    "putApiKey",
    "Store a provider's key, replacing the one before",
    tag="usage",
    responses={201: ApiKeyInfo},
    notes={201: "Stored (encrypted); only `keyHint`, its last four characters, is ever shown."},
    description="`llm` steps use the tenant's key of their `provider`. A key must be printable ASCII without spaces.",
    body=ApiKeyCreate,
)
async def put_api_key(request: web.Request) -> web.Response:
    """Store a provider's key (replacing the one before)."""
    return json_response(await call(request, UsageOp.KEYS_PUT, await read_body(request, ApiKeyCreate)), status=201)


@routes.delete("/api/v1/api-keys/{provider}")
@Operation(
    "deleteApiKey",
    "Forget a provider's key",
    tag="usage",
    responses={204: None},
    notes={404: "No key of this provider is stored."},
)
async def delete_api_key(request: web.Request) -> web.Response:
    """Forget a provider's key."""
    provider = request.match_info["provider"]
    if not PROVIDER.fullmatch(provider):
        raise NotFound(f"no {provider[:64]} key is stored")
    await call(request, UsageOp.KEYS_DELETE, ApiKeyRef(provider=provider))
    return web.Response(status=204)


@routes.put("/api/v1/admin/tenants/{tenant_id}/plan")
@Operation(
    "setTenantPlan",
    "Give a tenant a plan (platform admins only)",
    tag="usage",
    responses={200: TenantPlan},
    errors=(403,),
    notes={403: "The token's role is not `admin`."},
    description="Creates the tenant's record if it has none. Rate limits follow within a minute.",
    body=PlanAssignment,
)
async def set_tenant_plan(request: web.Request) -> web.Response:
    """Give a tenant a plan (platform admins only)."""
    if not request[keys.PRINCIPAL].is_admin:
        raise Forbidden("only a platform admin (role admin) may change a tenant's plan")
    body = await read_body(request, PlanAssignment)
    ref = PlanRef(tenant_id=_tenant_id(request), plan=body.plan)
    return json_response(await call(request, UsageOp.PLAN_SET, ref))


def _tenant_id(request: web.Request) -> str:
    """The tenant of the path, refused (422) when longer than a tenant id can be."""
    tenant_id = request.match_info["tenant_id"]
    if len(tenant_id) > MAX_TENANT_ID:
        raise InvalidInput(
            f"a tenant id has at most {MAX_TENANT_ID} characters",
            errors=[FieldError(path="/tenantId", message=f"at most {MAX_TENANT_ID} characters")],
        )
    return tenant_id


def plan_lookup(app: web.Application) -> PlanLookup:
    """The rate limiter's source of tenants' plans: the usage service (the limiter caches and falls back).

    A tenant without a plan of its own has ``FLOWMESH_DEFAULT_PLAN``, which every service reads alike.
    """

    async def lookup(tenant: str) -> str | Plan:
        data = await app[keys.RPC].call(UsageOp.PLAN, tenant=tenant, role="gateway", timeout=PLAN_LOOKUP_TIMEOUT_S)
        answer = AssignedPlan.model_validate(data)
        name = answer.plan if answer.assigned else app[keys.SETTINGS].default_plan
        # the plans table's figures when the answer is about that plan (an older usage service sends none)
        return answer.limits if answer.limits is not None and answer.limits.name == name else name

    return lookup
