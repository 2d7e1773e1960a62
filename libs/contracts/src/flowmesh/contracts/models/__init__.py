"""Pydantic models of every payload on the wire."""

from flowmesh.contracts.models.base import OpenModel, Timestamp, WireModel
from flowmesh.contracts.models.definition import Edge, FlowDefinition, Node, Position, StepData
from flowmesh.contracts.models.flows import (
    Flow,
    FlowCreate,
    FlowSettings,
    FlowStatus,
    FlowSummary,
    FlowUpdate,
    FlowVersion,
    Trigger,
    TriggerCreate,
    TriggerUpdate,
)
from flowmesh.contracts.models.problem import FieldError, Page, PageQuery, Problem
from flowmesh.contracts.models.rpc import (
    FlowDeleteRequest,
    FlowListQuery,
    FlowPatchRequest,
    FlowRef,
    FlowReplaceRequest,
    RpcReply,
)
from flowmesh.contracts.models.runs import Run, RunEvent, RunStart, StepRun

__all__ = [
    "Edge",
    "FieldError",
    "Flow",
    "FlowCreate",
    "FlowDefinition",
    "FlowDeleteRequest",
    "FlowListQuery",
    "FlowPatchRequest",
    "FlowRef",
    "FlowReplaceRequest",
    "FlowSettings",
    "FlowStatus",
    "FlowSummary",
    "FlowUpdate",
    "FlowVersion",
    "Node",
    "OpenModel",
    "Page",
    "PageQuery",
    "Position",
    "Problem",
    "RpcReply",
    "Run",
    "RunEvent",
    "RunStart",
    "StepData",
    "StepRun",
    "Timestamp",
    "Trigger",
    "TriggerCreate",
    "TriggerUpdate",
    "WireModel",
]
