"""The ``data`` of each run event type: one model per type, chosen by the event's ``type``.

The runner writes these; the usage service meters ``run.queued``, the final run events and the
final step events; the gateway and integrators read them as they are. Only the keys a sender set
are written back (``dump``), so an event read from the stream or the database is published again
with exactly its keys: ``parentRunId: null`` on a new run's ``run.queued`` stays, and a reopened
run's ``run.queued`` (which carries ``retryCount`` instead) does not gain it.

Fields are optional and read tolerantly, as everything on NATS: a newer sender adding keys never
breaks an older reader (extra keys are kept), and a count that is not a non-negative whole number
reads as absent rather than refusing the whole event.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, ClassVar, Final

from pydantic import BeforeValidator, ConfigDict

from flowmesh.contracts.models.base import WireModel


def _count(value: Any) -> int | None:
    """A non-negative whole number (a float is cut), or None for anything else (booleans included)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return int(value) if value >= 0 else None


Count = Annotated[int | None, BeforeValidator(_count)]
"""A duration or token count: absent when it is not a non-negative whole number."""


class EventModel(WireModel):
    """A model inside a run event's ``data``: extra keys kept, written back with only the keys set."""

    model_config = ConfigDict(extra="allow")

    def dump(self) -> dict[str, Any]:
        """The JSON form with exactly the keys that were set (explicit nulls included)."""
        return self.model_dump(mode="json", by_alias=True, exclude_unset=True)


class TokenUsage(EventModel):
    """Tokens an ``llm`` attempt used."""

    input_tokens: Count = None
    output_tokens: Count = None


class StepError(EventModel):
    """Why a step attempt failed."""

    message: str | None = None
    type: str | None = None


class RunFailure(EventModel):
    """Why a run ended without succeeding; ``stepId`` is null when no step caused it."""

    message: str | None = None
    step_id: str | None = None
    type: str | None = None


class EventData(EventModel):
    """The data of a run event; each subclass is one event type (``TYPE``)."""

    TYPE: ClassVar[str] = ""


# --- run events ----------------------------------------------------------------------------------


class RunQueuedData(EventData):
    """A new run (``parentRunId`` set, null for a top-level run) or a reopened one (``retryCount``)."""

    TYPE: ClassVar[str] = "run.queued"
    status: str | None = None
    trigger_type: str | None = None
    parent_run_id: str | None = None
    retry_count: int | None = None


class RunStatusData(EventData):
    """A run changed status without ending."""

    status: str | None = None


class RunStartedData(RunStatusData):
    """The run's first advance."""

    TYPE: ClassVar[str] = "run.started"


class RunWaitingData(RunStatusData):
    """Every open step waits for something outside."""

    TYPE: ClassVar[str] = "run.waiting"


class RunResumedData(RunStatusData):
    """A waiting run has work again."""

    TYPE: ClassVar[str] = "run.resumed"


class RunEndedData(EventData):
    """A run ended; ``error`` only when it failed or timed out."""

    status: str | None = None
    duration_ms: Count = None
    trigger_type: str | None = None
    parent_run_id: str | None = None
    error: RunFailure | None = None


class RunSucceededData(RunEndedData):
    """The run succeeded."""

    TYPE: ClassVar[str] = "run.succeeded"


class RunFailedData(RunEndedData):
    """The run failed (a refused start too: error type ``quota-exceeded``)."""

    TYPE: ClassVar[str] = "run.failed"


class RunCancelledData(RunEndedData):
    """The run was cancelled."""

    TYPE: ClassVar[str] = "run.cancelled"


class RunTimedOutData(RunEndedData):
    """The run's time limit passed."""

    TYPE: ClassVar[str] = "run.timedOut"


# --- step events ---------------------------------------------------------------------------------


class StepEventData(EventData):
    """Every step event names the step's type."""

    step_type: str | None = None


class StepStartedData(StepEventData):
    """An attempt started."""

    TYPE: ClassVar[str] = "step.started"


class StepWaitingData(StepEventData):
    """The step waits (a timer, a decision, an event, child runs)."""

    TYPE: ClassVar[str] = "step.waiting"


class StepSkippedData(EventData):
    """No edge into the step was taken."""

    TYPE: ClassVar[str] = "step.skipped"
    status: str | None = None
    step_type: str | None = None


class StepSucceededData(EventData):
    """The step succeeded; ``usage`` for an ``llm`` step."""

    TYPE: ClassVar[str] = "step.succeeded"
    status: str | None = None
    duration_ms: Count = None
    step_type: str | None = None
    usage: TokenUsage | None = None


class StepRetryingData(EventData):
    """An attempt failed and another one is due at ``nextAttemptAt``."""

    TYPE: ClassVar[str] = "step.retrying"
    error: StepError | None = None
    next_attempt_at: str | None = None
    step_type: str | None = None


class StepFailedData(EventData):
    """The step failed for good; ``handled`` when the run goes on (``onError: continue``)."""

    TYPE: ClassVar[str] = "step.failed"
    status: str | None = None
    duration_ms: Count = None
    step_type: str | None = None
    error: StepError | None = None
    handled: bool | None = None


RunEventData = (
    RunQueuedData
    | RunStartedData
    | RunWaitingData
    | RunResumedData
    | RunSucceededData
    | RunFailedData
    | RunCancelledData
    | RunTimedOutData
    | StepStartedData
    | StepWaitingData
    | StepSkippedData
    | StepSucceededData
    | StepRetryingData
    | StepFailedData
)
"""The data of any run event."""

EVENT_DATA: Final[dict[str, type[EventData]]] = {
    m.TYPE: m
    for m in (
        RunQueuedData,
        RunStartedData,
        StepStartedData,
        StepSucceededData,
        StepFailedData,
        StepRetryingData,
        StepWaitingData,
        StepSkippedData,
        RunWaitingData,
        RunResumedData,
        RunSucceededData,
        RunFailedData,
        RunCancelledData,
        RunTimedOutData,
    )
}
"""The data model of each event type, in lifecycle order."""

RUN_ENDED: Final[dict[str, type[RunEndedData]]] = {
    "succeeded": RunSucceededData,
    "failed": RunFailedData,
    "cancelled": RunCancelledData,
    "timedOut": RunTimedOutData,
}
"""The final run event of each final status."""


def event_data(event_type: str, data: Any) -> EventData:
    """The data of an event of ``event_type`` as its model (an unknown type keeps its keys as given)."""
    model = EVENT_DATA.get(event_type, EventData)
    return model.model_validate(data if isinstance(data, dict) else {})
