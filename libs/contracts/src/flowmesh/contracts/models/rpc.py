"""Request/reply envelopes between services (``fm.rpc.<service>.<op>``).

The tenant travels in the ``Flowmesh-Tenant`` header; bodies carry only the operation's arguments.
A reply is ``{"data": ...}`` or ``{"error": <problem>}``.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from flowmesh.contracts.models.base import WireModel
from flowmesh.contracts.models.flows import FlowCreate
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
