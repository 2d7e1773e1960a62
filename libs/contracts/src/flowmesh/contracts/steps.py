"""The step-kind registry: one :class:`StepKind` per step type, asked wherever step types differ.

A kind holds what is particular to its type and declarative: how it runs, its handles, what its
``timeoutMs`` means, its catalog entry, and the rules validation checks on its ``data``. The flows
service validates and builds the catalog from it; the runner registers the execution part of each
kind against the same ``type`` (``flowmesh.runner.kinds``). Adding a step type is one
:func:`register` call here and one in the runner (``docs/steps.md#adding-a-step-type``).
"""

from __future__ import annotations

import builtins
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Final, Literal

from flowmesh.contracts.expressions import CONTEXT_NAMES, EVENT_NAMES, FOREACH_NAMES, SECRET_NAMES
from flowmesh.contracts.models.definition import (
    ApprovalData,
    ConditionData,
    DelayData,
    FailData,
    ForeachData,
    HttpData,
    LlmData,
    PublishData,
    StepData,
    SubflowData,
    SwitchData,
    TransformData,
    TriggerData,
    WaitEventData,
    case_handle,
)
from flowmesh.contracts.models.flows import CatalogStep

RunMode = Literal["pure", "io", "wait", "children"]
"""How a step runs once its turn comes:

- ``pure``: computed from the run's state alone, inline in the transaction that reaches it (a chain
  of pure steps costs one transaction);
- ``io``: dispatched to a worker (``fm.work.steps``), whose attempt does I/O and reports an outcome;
- ``wait``: waits for something outside the run (a durable timer, a decision, an event);
- ``children``: dispatched like ``io``, starts child runs of another flow, then waits for them.
"""

TimeoutPolicy = Literal["none", "attempt", "self", "children", "handle"]
"""What a step's ``timeoutMs`` does:

- ``none``: nothing (pure steps; a delay's wait is its own deadline);
- ``attempt``: the worker bounds each attempt; a durable timer a little later covers a worker that
  died; a timed-out attempt may be retried;
- ``self``: as ``attempt``, but the step bounds its own I/O with it (an HTTP request's timeout);
- ``children``: bounds the wait for child runs; on timeout they are cancelled and the step fails;
- ``handle``: bounds the wait; on timeout the step takes its ``timeout`` handle.
"""


@dataclass(frozen=True, slots=True)
class StepKind:
    """One step type: everything about it that does not need the runner's I/O."""

    type: str
    title: str
    description: str
    model: builtins.type[StepData]
    runs: RunMode
    handles: tuple[str, ...] = ()
    """The handles it always offers; edges without ``sourceHandle`` follow the first."""
    timeout: TimeoutPolicy = "attempt"
    expressions: Mapping[str, frozenset[str]] = field(default_factory=dict)
    """Fields (as on the wire) whose whole value is one CEL expression, and the names it may use."""
    templates: Mapping[str, frozenset[str]] = field(default_factory=dict)
    """Fields whose ``{{ expr }}`` templates may use more names than ``input``, ``steps``, ``run``."""
    subject_fields: tuple[str, ...] = ()
    """Fields that become a subject token (``eventType``, ``name``): letters, digits, ``_``, ``-``, dots."""
    extra_handles: Callable[[StepData], list[str]] | None = None
    """Handles that depend on the step's data (a switch's cases), offered before ``handles``."""

    @property
    def runs_flows(self) -> bool:
        """Whether its ``flowId`` names a published flow it runs as child runs."""
        return self.runs == "children"

    def handles_of(self, data: StepData | None) -> list[str]:
        """The handles a step of this kind offers; the first is the one plain edges follow."""
        extra = self.extra_handles(data) if self.extra_handles is not None and data is not None else []
        return [*extra, *self.handles]

    def catalog(self) -> CatalogStep:
        """Its entry of ``GET /catalog/steps``; ``dataSchema`` is generated from the model validation uses."""
        return CatalogStep(
            type=self.type,
            title=self.title,
            description=self.description,
            handles=list(self.handles),
            data_schema=self.model.model_json_schema(by_alias=True),
        )


ENTRY_TYPE: Final = "trigger"
"""The type of a flow's entry node: exactly one per flow, no incoming edges, its output the run input."""

STEP_TYPES: Final[dict[str, StepKind]] = {}
"""Every step type, keyed by ``type``, in catalog order."""


def register(kind: StepKind) -> StepKind:
    """Add a step type (or replace the kind of a type: a test's own step type, for instance)."""
    STEP_TYPES[kind.type] = kind
    return kind


def step_kind(step_type: str) -> StepKind | None:
    """The kind of ``step_type``, or None for a type nobody registered."""
    return STEP_TYPES.get(step_type)


def types_that_run(mode: RunMode) -> tuple[str, ...]:
    """Every registered type that runs so (the runner's SQL filters by it)."""
    return tuple(k.type for k in STEP_TYPES.values() if k.runs == mode)


def handles_of(step_type: str, data: StepData | None) -> list[str]:
    """The handles a step offers (none for an unknown type); the first is the one plain edges follow."""
    kind = STEP_TYPES.get(step_type)
    return kind.handles_of(data) if kind is not None else []


def _switch_cases(data: StepData) -> list[str]:
    return [case_handle(c) for c in data.cases] if isinstance(data, SwitchData) else []


_CHOOSE = {"expression": CONTEXT_NAMES}
# the only fields where ``{{ secrets.NAME }}`` may appear: requests the runner sends and records redacted
_HTTP_SECRETS = dict.fromkeys(("url", "headers", "query", "body"), CONTEXT_NAMES | SECRET_NAMES)
_LLM_SECRETS = {"messages": CONTEXT_NAMES | SECRET_NAMES}

for _kind in (
    StepKind(
        ENTRY_TYPE,
        "Trigger",
        "The entry node, exactly one per flow; outputs the run input.",
        TriggerData,
        "pure",
        timeout="none",
    ),
    StepKind("transform", "Transform", "Builds JSON from expressions.", TransformData, "pure", timeout="none"),
    StepKind(
        "condition",
        "Condition",
        "Branches on a boolean expression.",
        ConditionData,
        "pure",
        ("true", "false"),
        timeout="none",
        expressions=_CHOOSE,
    ),
    StepKind(
        "switch",
        "Switch",
        "Branches on the value of an expression.",
        SwitchData,
        "pure",
        ("default",),
        timeout="none",
        expressions=_CHOOSE,
        extra_handles=_switch_cases,
    ),
    StepKind(
        "http", "HTTP request", "Calls an HTTP endpoint.", HttpData, "io", timeout="self", templates=_HTTP_SECRETS
    ),
    StepKind("delay", "Delay", "Waits for a duration or until a time, durably.", DelayData, "wait", timeout="none"),
    StepKind(
        "approval",
        "Approval",
        "Pauses until a person approves or rejects.",
        ApprovalData,
        "wait",
        ("approved", "rejected", "timeout"),
        timeout="handle",
    ),
    StepKind(
        "waitEvent",
        "Wait for event",
        "Waits for an external event.",
        WaitEventData,
        "wait",
        ("event", "timeout"),
        timeout="handle",
        expressions={"match": CONTEXT_NAMES | EVENT_NAMES},
        subject_fields=("eventType",),
    ),
    StepKind(
        "foreach",
        "For each",
        "Runs a published flow for every item.",
        ForeachData,
        "children",
        timeout="children",
        expressions={"items": CONTEXT_NAMES},
        templates={"input": CONTEXT_NAMES | FOREACH_NAMES},
    ),
    StepKind(
        "subflow", "Subflow", "Runs a published flow and waits for it.", SubflowData, "children", timeout="children"
    ),
    StepKind("publish", "Publish", "Publishes a message on NATS.", PublishData, "io", subject_fields=("name",)),
    StepKind(
        "llm",
        "LLM",
        "Chat completion with the tenant's own API key.",
        LlmData,
        "io",
        timeout="self",
        templates=_LLM_SECRETS,
    ),
    StepKind("fail", "Fail", "Ends the run as failed.", FailData, "pure", timeout="none"),
):
    register(_kind)
