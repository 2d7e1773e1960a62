"""Runs, step runs and run events (each event's ``data``: :mod:`.run_events`)."""

from __future__ import annotations

from typing import Annotated, Any, Final, Literal

from pydantic import (
    Field,
    JsonValue,
    WithJsonSchema,
    field_serializer,
    model_validator,
)

from flowmesh.contracts.models.base import MAX_INT4, Timestamp, WireModel
from flowmesh.contracts.models.run_events import EVENT_DATA, EventData, event_data

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

    # ``data`` is read as the model of the event's ``type`` (run_events.EVENT_DATA), so one
    # ``RunEvent.model_validate`` reads the envelope and its data; written, ``data`` keeps exactly the
    # keys it was given (nulls included), whatever the envelope's own dump options.

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
    # documented as an open object, as before: the per-type models add no required key
    data: Annotated[EventData, WithJsonSchema({"additionalProperties": True, "type": "object"})] = Field(
        default_factory=EventData
    )

    @model_validator(mode="before")
    @classmethod
    def _data_of_type(cls, value: Any) -> Any:
        """Read ``data`` with the model of the event's ``type`` (the union's discriminator is the envelope's)."""
        if isinstance(value, dict) and not isinstance(value.get("data"), EventData):
            value = {**value, "data": event_data(str(value.get("type")), value.get("data"))}
        return value

    @field_serializer("data")
    def _data_as_given(self, data: EventData) -> dict[str, Any]:
        return data.dump()


assert set(EVENT_DATA) == set(RUN_EVENT_TYPES), "every run event type has its data model"


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


class EventAccepted(WireModel):
    """``202`` of ``POST /events/{eventType}``: the event is in the ``EVENTS`` stream under this id.

    The id is also the message's ``Nats-Msg-Id``; a request repeated with the same ``Idempotency-Key``
    gets the same id, and JetStream keeps one copy of the event.
    """

    event_id: str


class RunRetry(WireModel):
    """Body of ``POST /runs/{id}/retry``."""

    mode: Literal["fromFailed", "fromStart"] = "fromFailed"
    version: Literal["same", "active"] = "same"
