"""A published definition as an executable graph, and the graph rules over it. Pure.

An edge is *taken* when its source succeeded (or failed handled) and the edge's handle is the one
the source chose (plain edges follow the default path). A node waits until every incoming edge is
*resolved*; then it runs if at least one is taken, else it is skipped.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Final

from flowmesh.contracts.models import FlowDefinition
from flowmesh.contracts.models.definition import ERROR_HANDLE, RetryPolicy, StepData
from flowmesh.contracts.models.runs import FINAL_STEP_STATUSES
from flowmesh.contracts.steps import ENTRY_TYPE, STEP_TYPES, StepKind

RAN: Final = frozenset({"succeeded", "failed"})


@dataclass(frozen=True, slots=True)
class Edge:
    """An edge of the graph."""

    id: str
    source: str
    target: str
    handle: str | None


@dataclass(slots=True)
class Step:
    """A node of the graph with its parsed configuration."""

    id: str
    kind: StepKind
    data: StepData
    handles: list[str]
    incoming: list[Edge] = field(default_factory=list)
    outgoing: list[Edge] = field(default_factory=list)

    @property
    def type(self) -> str:
        """The step's type (its kind's)."""
        return self.kind.type

    @property
    def has_error_edges(self) -> bool:
        """Whether a handled failure takes ``error`` edges (else the plain ones)."""
        return any(e.handle == ERROR_HANDLE for e in self.outgoing)

    def edges_on(self, handle: str) -> list[Edge]:
        """Outgoing edges a choice of ``handle`` takes (plain edges follow the first handle)."""
        default = self.handles[0] if self.handles else None
        return [e for e in self.outgoing if e.handle == handle or (e.handle is None and handle == default)]


@dataclass(slots=True)
class StepState:
    """What the run knows of one step."""

    status: str
    attempt: int = 0
    handle: str | None = None
    handled: bool = False
    output: Any = None
    error: dict[str, Any] | None = None
    input: Any = None
    started_at: datetime | None = None
    completed_at: datetime | None = None
    next_attempt_at: datetime | None = None
    wait_for: str | None = None
    deadline_at: datetime | None = None
    """When the open attempt or wait expires (a durable timer, the sweep as fallback)."""

    @property
    def final(self) -> bool:
        """Succeeded, failed, skipped or cancelled."""
        return self.status in FINAL_STEP_STATUSES


class Graph:
    """A frozen version's definition, parsed once and kept (versions are immutable).

    ``run_timeout_ms`` is the flow's own ``settings.runTimeoutMs`` (the run's timer is armed only
    then); ``default_run_timeout_ms`` applies when the flow sets none (enforced by the sweep alone).
    """

    def __init__(
        self,
        definition: Mapping[str, Any],
        *,
        run_timeout_ms: int | None = None,
        default_run_timeout_ms: int | None = None,
    ) -> None:
        self.run_timer = run_timeout_ms is not None
        self.run_timeout_ms = run_timeout_ms if run_timeout_ms is not None else default_run_timeout_ms
        parsed = FlowDefinition.model_validate(definition)
        self.steps: dict[str, Step] = {}
        for node in parsed.nodes:
            kind = STEP_TYPES[node.type]
            data = kind.model.model_validate(node.data)
            self.steps[node.id] = Step(node.id, kind, data, kind.handles_of(data))
        for e in parsed.edges:
            edge = Edge(e.id, e.source, e.target, e.source_handle)
            self.steps[e.source].outgoing.append(edge)
            self.steps[e.target].incoming.append(edge)
        self.trigger = next(s.id for s in self.steps.values() if s.type == ENTRY_TYPE)
        self.order = list(self.steps)
        self.position = {step_id: i for i, step_id in enumerate(self.order)}

    def taken(self, edge: Edge, source: StepState) -> bool:
        """Whether an edge carries the run on, given its source's state."""
        step = self.steps[edge.source]
        if source.status == "succeeded":
            if edge.handle is None:
                return source.handle is None or source.handle == (step.handles[0] if step.handles else None)
            return edge.handle == source.handle
        if source.status == "failed" and source.handled:
            return edge.handle == ERROR_HANDLE if step.has_error_edges else edge.handle is None
        return False

    def frontier(
        self, states: Mapping[str, StepState], candidates: Iterable[str] | None = None
    ) -> tuple[list[str], list[str]]:
        """Steps with no state yet that can now run, and those that must be skipped.

        ``candidates`` limits the look to some steps (those after steps that just finished), so a
        long chain is walked in linear time.
        """
        ready: list[str] = []
        skip: list[str] = []
        look = self.order if candidates is None else sorted(set(candidates), key=self.position.__getitem__)
        for step_id in look:
            if step_id in states:
                continue
            step = self.steps[step_id]
            if step_id == self.trigger:
                ready.append(step_id)
                continue
            sources = [states.get(e.source) for e in step.incoming]
            if not step.incoming or any(s is None or not s.final for s in sources):
                continue
            if any(self.taken(e, s) for e, s in zip(step.incoming, sources, strict=True) if s is not None):
                ready.append(step_id)
            else:
                skip.append(step_id)
        return ready, skip

    def output(self, states: Mapping[str, StepState]) -> Any:
        """The run's output: its terminal steps' outputs (one → itself, several → keyed by step id)."""
        terminal = [
            step_id
            for step_id in self.order
            if (s := states.get(step_id)) is not None
            and s.status == "succeeded"
            and not any(
                (t := states.get(e.target)) is not None and t.status in RAN for e in self.steps[step_id].outgoing
            )
        ]
        if len(terminal) == 1:
            return states[terminal[0]].output
        return {step_id: states[step_id].output for step_id in terminal}


def retry_delay(policy: RetryPolicy, attempt: int, rng: random.Random | None = None) -> timedelta:
    """How long to wait after failed ``attempt`` (1-based) before the next one."""
    base = policy.initial_delay_ms if policy.backoff == "fixed" else policy.initial_delay_ms * 2 ** (attempt - 1)
    delay = min(base, policy.max_delay_ms)
    if policy.jitter:
        delay *= 1 + (rng or random).uniform(-policy.jitter, policy.jitter)
    return timedelta(milliseconds=max(0.0, delay))
