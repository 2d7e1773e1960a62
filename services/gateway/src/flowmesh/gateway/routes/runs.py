"""``/api/v1/flows/{id}/runs`` and ``/api/v1/runs``: start, read and control runs."""

from __future__ import annotations

from aiohttp import web
from pydantic import Field

from flowmesh.contracts.models import Page, Run, RunEvent, RunStart, StepRun
from flowmesh.contracts.models.rpc import (
    RunEventsQuery,
    RunListQuery,
    RunRef,
    RunResumeRequest,
    RunRetryRequest,
    RunStepsQuery,
    StartRun,
)
from flowmesh.contracts.models.runs import RunResume, RunRetry
from flowmesh.contracts.subjects import RunsOp
from flowmesh.gateway import keys
from flowmesh.gateway.body import MESSAGE_HEADROOM, check_fits, read_body, read_query
from flowmesh.gateway.openapi.operation import Operation
from flowmesh.gateway.routes.common import call, json_response

routes = web.RouteTableDef()


class RunPage(Page[Run]):
    """A page of runs, newest first."""


class StepRunPage(Page[StepRun]):
    """A page of a run's steps, in the order they started."""


class RunEventPage(Page[RunEvent]):
    """The run's events after the ``after`` cursor, in ``seq`` order (``page`` is always 1)."""

    page_size: int = Field(ge=1, le=1000)  # a cursor page may be larger than a numbered one


@routes.post("/api/v1/flows/{flow_id}/runs")
@Operation(
    "startRun",
    "Start a run of the flow's active (or a given) version",
    tag="runs",
    responses={201: Run, 200: Run},
    errors=(403, 409, 422),
    notes={
        200: "An idempotent repeat (same `Idempotency-Key`, same input): the run it started.",
        201: "The run, `queued`.",
        403: "The plan's monthly runs are used up (`quota-exceeded`).",
        409: "The flow is deactivated or has no published version.",
        422: "The input does not match the version's `inputSchema`, or the `Idempotency-Key` was used with "
        "another input.",
        429: "Too many requests, or too many runs in flight for the plan.",
    },
    description="`Idempotency-Key` here is kept for ever per (tenant, flow): a repeat returns the same run.",
    body=RunStart,
    location=True,
)
async def start_run(request: web.Request) -> web.Response:
    """Start a run of the flow's active (or a given) version; ``Idempotency-Key`` makes repeats safe."""
    body = await read_body(request, RunStart)
    limit = request.app[keys.BROKER].connection.max_payload - MESSAGE_HEADROOM
    if len(await request.read()) > limit:  # only a body this large can hold an input too large to send
        check_fits(body.input, limit)
    req = StartRun(
        flow_id=request.match_info["flow_id"],
        input=body.input,
        version=body.version,
        idempotency_key=request.headers.get("Idempotency-Key") or None,
    )
    result = await call(request, RunsOp.START, req)
    run = result["run"]
    return json_response(
        run, status=201 if result["created"] else 200, headers={"Location": f"/api/v1/runs/{run['id']}"}
    )


@routes.get("/api/v1/runs")
@Operation("listRuns", "List runs, newest first", tag="runs", responses={200: RunPage}, query=RunListQuery)
async def list_runs(request: web.Request) -> web.Response:
    """The tenant's runs, newest first (filters: flowId, status, since, until)."""
    return json_response(await call(request, RunsOp.LIST, read_query(request, RunListQuery)))


@routes.get("/api/v1/runs/{run_id}")
@Operation("getRun", "One run", tag="runs", responses={200: Run})
async def get_run(request: web.Request) -> web.Response:
    """One run."""
    return json_response(await call(request, RunsOp.GET, RunRef(run_id=request.match_info["run_id"])))


@routes.get("/api/v1/runs/{run_id}/steps")
@Operation(
    "listRunSteps",
    "The run's steps, in the order they started",
    tag="runs",
    responses={200: StepRunPage},
    query=RunStepsQuery,
)
async def list_steps(request: web.Request) -> web.Response:
    """The run's steps, in the order they started."""
    q = read_query(request, RunStepsQuery, runId=request.match_info["run_id"])
    return json_response(await call(request, RunsOp.STEPS, q))


@routes.get("/api/v1/runs/{run_id}/events")
@Operation(
    "listRunEvents",
    "The run's events after `?after=seq`, in `seq` order",
    tag="runs",
    responses={200: RunEventPage},
    query=RunEventsQuery,
)
async def list_events(request: web.Request) -> web.Response:
    """The run's events after ``?after=seq``, in ``seq`` order."""
    q = read_query(request, RunEventsQuery, runId=request.match_info["run_id"])
    return json_response(await call(request, RunsOp.EVENTS, q))


@routes.post("/api/v1/runs/{run_id}/cancel")
@Operation(
    "cancelRun",
    "Cancel a run that has not finished",
    tag="runs",
    responses={200: Run},
    errors=(409,),
    notes={409: "The run has already finished."},
)
async def cancel_run(request: web.Request) -> web.Response:
    """Cancel a run that has not finished (409 if it has)."""
    return json_response(await call(request, RunsOp.CANCEL, RunRef(run_id=request.match_info["run_id"])))


@routes.post("/api/v1/runs/{run_id}/resume")
@Operation(
    "resumeRun",
    "Approve or reject a waiting approval step",
    tag="runs",
    responses={200: Run},
    errors=(409,),
    notes={409: "The step is not waiting for an approval."},
    body=RunResume,
)
async def resume_run(request: web.Request) -> web.Response:
    """Approve or reject a waiting approval step."""
    body = await read_body(request, RunResume)
    req = RunResumeRequest(
        run_id=request.match_info["run_id"], step_id=body.step_id, decision=body.decision, data=body.data
    )
    return json_response(await call(request, RunsOp.RESUME, req))


@routes.post("/api/v1/runs/{run_id}/retry")
@Operation(
    "retryRun",
    "Retry a failed run",
    tag="runs",
    responses={200: Run, 201: Run},
    errors=(403, 409),
    notes={
        200: "`fromFailed`: the same run, reopened (`queued`).",
        201: "`fromStart`: a new run with `triggerType: retry` and `retryOf`.",
        403: "The plan's monthly runs are used up (`quota-exceeded`).",
        409: "Only a failed run can be retried.",
    },
    body=RunRetry,
)
async def retry_run(request: web.Request) -> web.Response:
    """Retry a failed run: in place from the failed steps (200), or as a new run from the start (201)."""
    body = await read_body(request, RunRetry)
    req = RunRetryRequest(run_id=request.match_info["run_id"], mode=body.mode, version=body.version)
    result = await call(request, RunsOp.RETRY, req)
    return json_response(result["run"], status=201 if result["created"] else 200)
