"""The named changes the shell makes to a run under its lock, one per reason. Pure.

:meth:`flowmesh.runner.shell.Runner.apply` locks a run, loads its :class:`RunState`, applies one of
these and writes the result; each says what it does to the state and what it returns.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol, TypeVar

from flowmesh.contracts.errors import Conflict
from flowmesh.runner.engine import Deadline, RunState
from flowmesh.runner.outcome import Child, Outcome

T_co = TypeVar("T_co", covariant=True)


class Command(Protocol[T_co]):
    """A change to one run's state."""

    def apply(self, state: RunState) -> T_co:
        """Change ``state``; the result goes back to whoever asked."""
        ...


@dataclass(frozen=True, slots=True)
class Advance:
    """Move a new or reopened run as far as it goes."""

    def apply(self, state: RunState) -> None:
        state.advance()


@dataclass(frozen=True, slots=True)
class Complete:
    """Record how attempt ``attempt`` of a step ended; False when it is not the current attempt."""

    step_id: str
    attempt: int
    outcome: Outcome

    def apply(self, state: RunState) -> bool:
        return state.complete(self.step_id, self.attempt, self.outcome)


@dataclass(frozen=True, slots=True)
class ClaimRetry:
    """Start the next attempt of a step waiting to retry; the attempt, or None when not due."""

    step_id: str

    def apply(self, state: RunState) -> int | None:
        return state.claim_retry(self.step_id)


@dataclass(frozen=True, slots=True)
class Expire:
    """A deadline came (a timer, or the sweep); seconds still to wait when it has not by our clock."""

    deadline: Deadline
    due_at: datetime | None = None
    fired_at: datetime | None = None

    def apply(self, state: RunState) -> float | None:
        return state.expire(self.deadline, self.due_at, self.fired_at)


@dataclass(frozen=True, slots=True)
class DeliverEvent:
    """Offer an external event to a waiting step; True when it took it."""

    step_id: str
    attempt: int
    payload: Any

    def apply(self, state: RunState) -> bool:
        return state.deliver_event(self.step_id, self.attempt, self.payload)


@dataclass(frozen=True, slots=True)
class ChildrenEnded:
    """Some of a step's child runs ended; how many more children may start now."""

    step_id: str
    children: list[Child]

    def apply(self, state: RunState) -> int:
        return state.children_done(self.step_id, self.children)


@dataclass(frozen=True, slots=True)
class Cancel:
    """End the run as cancelled; a run already ended is a conflict, unless ``if_open`` (a child run)."""

    if_open: bool = False

    def apply(self, state: RunState) -> None:
        if state.run.final:
            if self.if_open:
                return
            raise Conflict(f"run {state.run.id} is already {state.run.status}")
        state.cancel()


@dataclass(frozen=True, slots=True)
class Resume:
    """A person's decision on a waiting approval step."""

    step_id: str
    decision: str
    data: dict[str, Any]
    by: str

    def apply(self, state: RunState) -> None:
        state.resume(self.step_id, self.decision, self.data, self.by)
