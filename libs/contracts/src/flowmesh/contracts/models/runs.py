"""Runs, step runs and run events (DESIGN §5)."""

from __future__ import annotations

from typing import Any, Final, Literal

from pydantic import Field, JsonValue

from flowmesh.contracts.models.base import MAX_INT4, Timestamp, WireModel

RunStatus = Literal["queued", "running", "waiting", "succeeded", "failed", "cancelled", "timedOut"]
StepStatus = Literal["pending", "running", "waiting", "succeeded", "failed", "skipped", "cancelled"]
RunTriggerType = Literal["manual", "webhook", "schedule", "event", "subflow", "retry"]

FINAL_RUN_STATUSES: Final[frozenset[str]] = frozenset({"succeeded", "failed", "cancelled", "timedOut"})
FINAL_STEP_STATUSES: Final[frozenset[str]] = frozenset({"succeeded", "failed", "skipped", "cancelled"})

RUN_EVENT_TYPES: Final = (
    "run.queued",
    "run.started",
    "step.started",
    "step.succeeded",
    "step.failed",
    "step.retrying",
    "step.waiting",
    "step.skipped",
    "run.waiting",
    "run.resumed",
    "run.succeeded",
    "run.failed",
    "run.cancelled",
    "run.timedOut",
)
"""Every run event type, in lifecycle order."""


class RunError(WireModel):
    """Why a run or step failed."""

    message: str
    step_id: str | None = None
    type: str = "error"


class Run(WireModel):
    """One execution of a published flow version."""

    id: str
    flow_id: str
    version: int
    tenant_id: str
    status: RunStatus
    trigger_type: RunTriggerType
    trigger_id: str | None = None
    input: JsonValue = None
    output: JsonValue = None
    error: RunError | None = None
    idempotency_key: str | None = None
    parent_run_id: str | None = None
    retry_of: str | None = None
    retry_count: int = 0
    created_at: Timestamp
    started_at: Timestamp | None = None
    completed_at: Timestamp | None = None
    duration_ms: int | None = None


class StepRun(WireModel):
    """The record of one step of a run."""

    run_id: str
    step_id: str
    type: str
    status: StepStatus
    handled: bool = False
    attempt: int = 0
    input: JsonValue = None
    output: JsonValue = None
    error: RunError | None = None
    started_at: Timestamp | None = None
    completed_at: Timestamp | None = None
    duration_ms: int | None = None
    next_attempt_at: Timestamp | None = None


class RunEvent(WireModel):
    """A run lifecycle event, with a per-run gap-free ``seq`` from 1."""

    id: str
    seq: int = Field(ge=1)
    type: str
    ts: Timestamp
    tenant_id: str
    run_id: str
    flow_id: str
    version: int
    step_id: str | None = None
    attempt: int | None = None
    data: dict[str, Any] = Field(default_factory=dict)


class RunStart(WireModel):
    """Body of ``POST /flows/{id}/runs``."""

    input: JsonValue = Field(default_factory=dict)
    version: int | None = Field(default=None, ge=1, le=MAX_INT4)


class RunResume(WireModel):
    """Body of ``POST /runs/{id}/resume``: the decision on a waiting approval step."""

    step_id: str = Field(min_length=1)
    decision: Literal["approved", "rejected"]
    data: dict[str, JsonValue] = Field(default_factory=dict)


class RunAccepted(WireModel):
    """``202`` of ``POST /hooks/{token}``: the run a delivery started (a redelivery gets the same run)."""

    run_id: str


class RunRetry(WireModel):
    """Body of ``POST /runs/{id}/retry``."""

    mode: Literal["fromFailed", "fromStart"] = "fromFailed"
    version: Literal["same", "active"] = "same"
