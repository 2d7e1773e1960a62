"""The runner's half of the step-kind registry: how each step type executes.

:mod:`flowmesh.contracts.steps` holds what a step type *is* (how it runs, its handles, its timeout
policy, its catalog entry, its validation rules). Here each type registers what the runner *does*
with it, in the slots its run mode needs:

- ``pure`` kinds: ``compute`` (the step's outcome from the expression context, no I/O);
- ``wait`` kinds: ``wait`` (start waiting, or finish at once), ``expire`` (the wait's deadline
  passed), and optionally ``on_event`` (an external event offered) or ``decide`` (a person's decision);
- ``io`` and ``children`` kinds: ``attempt`` (one attempt, run by a worker with the shell's tools);
  ``children`` kinds also ``join`` (a child run ended: finish the step, or start more).

The engine and the shell ask :func:`runner_for` and never test a step's type themselves.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Final, Protocol

from flowmesh.runner.outcome import Child, Outcome

if TYPE_CHECKING:
    from nats.js import JetStreamContext

    from flowmesh.runner.engine import RunState
    from flowmesh.runner.graph import Step, StepState
    from flowmesh.runner.io_steps import HttpStep, LlmStep
    from flowmesh.runner.secrets import SecretReveal

Context = dict[str, Any]


class ChildStarter(Protocol):
    """The shell's part that starts child runs (subflow and foreach attempts use it)."""

    async def start_subflow(self, state: RunState, step: Step) -> Outcome:
        """Start a subflow's one child; the outcome says the step waits (or why it cannot start)."""
        ...

    async def start_foreach(self, state: RunState, step: Step) -> Outcome:
        """Start a foreach's first children; the outcome says the step waits (or is already done)."""
        ...


class StepTools(Protocol):
    """What a worker's attempt may use: the shell's clients."""

    @property
    def http(self) -> HttpStep:
        """HTTP requests (guarded against private addresses)."""
        ...

    @property
    def llm(self) -> LlmStep | None:
        """Chat completions with the tenant's stored key; None when the runner has none configured."""
        ...

    @property
    def secrets(self) -> SecretReveal | None:
        """The tenant's secrets (``http`` and ``llm`` steps' ``{{ secrets.NAME }}``); None without a vault."""
        ...

    @property
    def js(self) -> JetStreamContext | None:
        """JetStream, once connected."""
        ...

    @property
    def children(self) -> ChildStarter:
        """Child runs."""
        ...


Compute = Callable[["Step", Context], Outcome]
Wait = Callable[["RunState", "Step"], None]
Expire = Callable[["Step", "StepState", datetime], Outcome]
OnEvent = Callable[["RunState", "Step", Any], Outcome | None]
Decide = Callable[[str, dict[str, Any], str], Outcome]
Attempt = Callable[[StepTools, "RunState", "Step"], Awaitable[Outcome]]
Join = Callable[["Step", "StepState", list[Child]], "Joined"]


@dataclass(frozen=True, slots=True)
class Joined:
    """What a child run's end means for its parent step: its outcome when done, else how many more to start."""

    outcome: Outcome | None = None
    more: int = 0


@dataclass(frozen=True, slots=True)
class StepRunner:
    """How the runner executes one step type (the slots its run mode needs; see the module docstring)."""

    compute: Compute | None = None
    wait: Wait | None = None
    expire: Expire | None = None
    on_event: OnEvent | None = None
    """An external event for a waiting step: its outcome when the step takes it, None when it does not."""
    decide: Decide | None = None
    """A person's ``decision`` (with ``data``, by ``by``) on a waiting step, as its outcome."""
    attempt: Attempt | None = None
    join: Join | None = None


NOTHING: Final = StepRunner()
"""The runner of a type nobody registered for the runner: its steps fail as unsupported."""
_RUNNERS: dict[str, StepRunner] = {}


def register_runner(step_type: str, runner: StepRunner) -> StepRunner:
    """Register how the runner executes ``step_type`` (its kind is registered in the contracts)."""
    _RUNNERS[step_type] = runner
    return runner


def runner_for(step_type: str) -> StepRunner:
    """How the runner executes ``step_type`` (:data:`NOTHING` when it does not know how)."""
    return _RUNNERS.get(step_type, NOTHING)
