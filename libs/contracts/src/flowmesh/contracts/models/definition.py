"""The flow definition: the graph a React Flow canvas saves, step config in each node's ``data``.

Drafts are saved as given, so a canvas gets back what it saved: nodes and edges keep any extra key
a canvas adds and ``type`` may be any string; only validation judges a definition, using the step
models below and the step-kind registry (:mod:`flowmesh.contracts.steps`).
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Final, Literal

from pydantic import ConfigDict, Field, JsonValue, model_validator

from flowmesh.contracts.models.base import OpenModel, WireModel


def _absent(value: object) -> bool:
    return value is None


class Position(OpenModel):
    """Where a node sits on the canvas (numbers kept as given: ``0`` stays ``0``)."""

    x: int | float = 0
    y: int | float = 0


class Node(OpenModel):
    """A step of the graph; ``data`` holds the step's configuration."""

    id: Annotated[str, Field(min_length=1)]
    type: Annotated[str, Field(min_length=1)]
    position: Position | None = Field(default=None, exclude_if=_absent)
    data: dict[str, Any] = Field(default_factory=dict)


class Edge(OpenModel):
    """A directed edge; ``sourceHandle`` picks the branch of a branching step."""

    id: Annotated[str, Field(min_length=1)]
    source: Annotated[str, Field(min_length=1)]
    target: Annotated[str, Field(min_length=1)]
    source_handle: str | None = Field(default=None, exclude_if=_absent)
    target_handle: str | None = Field(default=None, exclude_if=_absent)


class FlowDefinition(OpenModel):
    """``{nodes, edges}`` (plus whatever else the canvas saves, such as ``viewport``)."""

    nodes: list[Node] = Field(default_factory=list)
    edges: list[Edge] = Field(default_factory=list)

    def dump(self) -> dict[str, Any]:
        """The definition as it was given: set fields and extra keys only, camelCase."""
        return self.model_dump(mode="json", by_alias=True, exclude_unset=True)


# --- step configuration (node ``data``) -------------------------------------------------------


class RetryPolicy(WireModel):
    """How often and how soon a failed step is tried again."""

    model_config = ConfigDict(extra="forbid")

    max_attempts: int = Field(default=1, ge=1, le=100, description="all attempts, 1 = no retry")
    backoff: Literal["fixed", "exponential"] = "exponential"
    initial_delay_ms: int = Field(default=1000, ge=0, le=86_400_000)
    max_delay_ms: int = Field(default=60_000, ge=0, le=86_400_000)
    jitter: float = Field(default=0.0, ge=0.0, le=1.0)


class StepData(WireModel):
    """Settings every step may carry, plus canvas labels."""

    model_config = ConfigDict(extra="forbid")

    label: str | None = None
    description: str | None = None
    retry: RetryPolicy | None = None
    timeout_ms: int | None = Field(default=None, ge=1, le=7 * 86_400_000)
    on_error: Literal["fail", "continue"] = "fail"


class TriggerData(StepData):
    """The entry node; its output is the run input."""


class TransformData(StepData):
    """Builds ``output``: any JSON, strings may hold ``{{ expr }}``."""

    output: JsonValue


class ConditionData(StepData):
    """A boolean CEL expression choosing the ``true`` or ``false`` handle."""

    expression: str = Field(min_length=1)


class SwitchData(StepData):
    """A CEL expression whose value picks one of ``cases`` (else ``default``)."""

    expression: str = Field(min_length=1)
    cases: list[JsonValue] = Field(default_factory=list)


class HttpData(StepData):
    """An HTTP request."""

    method: Literal["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"] = "GET"
    url: str = Field(min_length=1)
    headers: dict[str, str] = Field(default_factory=dict)
    query: dict[str, str] = Field(default_factory=dict)
    body: JsonValue = None
    accept_status: list[int] | None = None


class DelayData(StepData):
    """Waits ``durationMs`` or until ``until`` (RFC 3339 or an expression), durably."""

    duration_ms: int | None = Field(default=None, ge=0, le=366 * 86_400_000)
    until: str | None = None

    @model_validator(mode="after")
    def _one_of(self) -> DelayData:
        if (self.duration_ms is None) == (self.until is None):
            raise ValueError("set exactly one of durationMs and until")
        return self


class ApprovalData(StepData):
    """Pauses the run until resumed (or ``timeoutMs`` passes)."""

    message: str | None = None


class WaitEventData(StepData):
    """Waits for an external event of ``eventType`` matching ``match``."""

    event_type: str = Field(min_length=1)
    match: str | None = None


class ChildFlowData(StepData):
    """A step that runs published flow ``flowId`` as child runs."""

    flow_id: str = Field(min_length=1)


class ForeachData(ChildFlowData):
    """Runs a published flow once per element of ``items``."""

    items: str = Field(min_length=1)
    input: JsonValue = None
    concurrency: int = Field(default=10, ge=1, le=100)


class SubflowData(ChildFlowData):
    """Runs a published flow and waits for it."""

    input: JsonValue = None


class PublishData(StepData):
    """Publishes ``payload`` on ``fm.out.{t}.<name>``."""

    name: str = Field(min_length=1)
    payload: JsonValue = None


class LlmMessage(WireModel):
    """One chat message; ``content`` may hold ``{{ expr }}``."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str


class LlmData(StepData):
    """A chat completion on an OpenAI-compatible API with the tenant's stored key."""

    provider: str = Field(min_length=1)
    model: str = Field(min_length=1)
    messages: list[LlmMessage] = Field(min_length=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    max_tokens: int | None = Field(default=None, ge=1)


class FailData(StepData):
    """Ends the run as failed."""

    message: str = "failed"


def case_handle(case: JsonValue) -> str:
    """The handle name of a switch case: strings as they are, other JSON values in JSON form."""
    return case if isinstance(case, str) else json.dumps(case, separators=(",", ":"))


ERROR_HANDLE: Final = "error"
"""The handle a step with ``onError: continue`` takes when it failed for good."""


def __getattr__(name: str) -> Any:
    """``STEP_TYPES`` and ``handles_of`` moved to :mod:`flowmesh.contracts.steps` (the step-kind registry)."""
    if name in ("STEP_TYPES", "handles_of"):
        from flowmesh.contracts import steps  # here, not at the top: the registry imports this module

        return getattr(steps, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
