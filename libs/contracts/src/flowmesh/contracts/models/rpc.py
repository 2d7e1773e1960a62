"""Request/reply envelopes between services (``fm.rpc.<service>.<op>``).

The tenant travels in the ``Flowmesh-Tenant`` header; bodies carry only the operation's arguments.
A reply is ``{"data": ...}`` or ``{"error": <problem>}``.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator

from flowmesh.contracts.models.base import MAX_INT4, Timestamp, WireModel, rfc3339_only
from flowmesh.contracts.models.flows import FlowCreate, FlowVersion, Trigger, TriggerCreate
from flowmesh.contracts.models.problem import PageQuery, Problem
from flowmesh.contracts.models.runs import Run, RunResume, RunRetry, RunTriggerType


class RpcReply(WireModel):
    """What every request/reply subscriber answers."""

    data: Any = None
    error: Problem | None = None


class FlowRef(WireModel):
    """Names one flow of the caller's tenant."""

    flow_id: str


class FlowListQuery(PageQuery):
    """``GET /flows`` filters."""

    status: str | None = None
    q: str | None = Field(default=None, max_length=200)


class FlowPatchRequest(FlowRef):
    """``PATCH /flows/{id}``: the fields to change (only those given) and the expected ETag."""

    if_match: str | None = None
    patch: dict[str, Any]


class FlowReplaceRequest(FlowRef):
    """``PUT /flows/{id}``: the new draft and the expected ETag."""

    if_match: str | None = None
    flow: FlowCreate


class FlowDeleteRequest(FlowRef):
    """``DELETE /flows/{id}``."""

    if_match: str | None = None
    force: bool = False


class VersionRef(FlowRef):
    """One version of a flow; ``None`` means the active one."""

    version: int | None = None


class PublishResult(WireModel):
    """``publish``: the version now active, and whether it was created by this call."""

    version: FlowVersion
    created: bool


class TriggerRef(WireModel):
    """Names one trigger of the caller's tenant."""

    trigger_id: str


class TriggerCreateRequest(FlowRef):
    """``POST /flows/{id}/triggers``."""

    trigger: TriggerCreate


class TriggerPatchRequest(TriggerRef):
    """``PATCH /triggers/{id}``: the fields given."""

    patch: dict[str, Any]


class RunnableFlow(WireModel):
    """What the runner needs to start a run: the frozen version and whether starts are allowed."""

    flow_id: str
    tenant_id: str
    active: bool
    version: FlowVersion


class WebhookLookup(WireModel):
    """``webhook``: which trigger a URL token belongs to."""

    token: str


class WebhookTarget(WireModel):
    """The trigger behind a webhook token, with what the gateway needs to accept a delivery."""

    trigger: Trigger
    tenant_id: str
    flow_active: bool
    published: bool
    signing_secrets: list[str] = Field(default_factory=list)


class StartRun(WireModel):
    """``fm.rpc.runs.start`` and ``fm.cmd.runs.start``: start a run of a published flow."""

    flow_id: str
    input: Any = Field(default_factory=dict)
    version: int | None = None
    idempotency_key: str | None = Field(default=None, max_length=255)
    trigger_type: RunTriggerType = "manual"
    trigger_id: str | None = None
    parent_run_id: str | None = None
    parent_step_id: str | None = None
    parent_index: int | None = None
    retry_of: str | None = None


class StartRunResult(WireModel):
    """The run, and whether this call created it (else an idempotent repeat)."""

    run: Run
    created: bool


class RunRef(WireModel):
    """Names one run of the caller's tenant."""

    run_id: str


class RunListQuery(PageQuery):
    """``GET /runs`` filters."""

    flow_id: str | None = None
    status: str | None = None
    since: Timestamp | None = None
    until: Timestamp | None = None

    @field_validator("since", "until", mode="before")
    @classmethod
    def _not_a_number(cls, value: Any) -> Any:
        return rfc3339_only(value)


class RunStepsQuery(RunRef, PageQuery):
    """``GET /runs/{id}/steps``."""

    page_size: int = Field(default=100, ge=1, le=100)


class RunEventsQuery(RunRef):
    """``GET /runs/{id}/events?after=seq``: events in ``seq`` order after a cursor."""

    after: int = Field(default=0, ge=0, le=MAX_INT4)
    page_size: int = Field(default=100, ge=1, le=1000)


class RunResumeRequest(RunRef, RunResume):
    """``POST /runs/{id}/resume``."""


class RunRetryRequest(RunRef, RunRetry):
    """``POST /runs/{id}/retry``."""
