"""Request/reply envelopes between services (``fm.rpc.<service>.<op>``).

The tenant travels in the ``Flowmesh-Tenant`` header; bodies carry only the operation's arguments.
A reply is ``{"data": ...}`` or ``{"error": <problem>}``.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from flowmesh.contracts.models.base import WireModel
from flowmesh.contracts.models.flows import FlowCreate, FlowVersion, Trigger, TriggerCreate
from flowmesh.contracts.models.problem import PageQuery, Problem


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
