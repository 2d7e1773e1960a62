"""Child runs of ``subflow`` and ``foreach`` steps: starting them, hearing that they ended, cancelling them.

A child is started through the same start as any run, keyed by ``child:{run}:{retry}:{step}:{index}``
so a re-run attempt finds the same child; a child that ends tells its parent step with a work
message (``kind: child``), and the sweep covers a lost one.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Final

from flowmesh.contracts.errors import Conflict, InvalidInput, NotFound
from flowmesh.contracts.expressions import ExpressionError, evaluate, expression_source, render
from flowmesh.contracts.models.definition import ChildFlowData, ForeachData, SubflowData
from flowmesh.contracts.models.rpc import StartRun
from flowmesh.runner import repo
from flowmesh.runner.commands import Cancel, ChildrenEnded, Complete
from flowmesh.runner.engine import RunRecord, RunState
from flowmesh.runner.graph import Step
from flowmesh.runner.outcome import Outcome
from flowmesh.runtime.db import Database

LIMIT_EXCEEDED: Final = "limit-exceeded"
"""The error type of a step that would go over one of its plan's caps (foreach items, children per run)."""

if TYPE_CHECKING:
    from flowmesh.runner.shell import Runner


class ChildRuns:
    """Starts, follows and cancels the child runs of a run's steps."""

    def __init__(self, db: Database, runner: Runner) -> None:
        self.db = db
        self.runner = runner

    async def start_subflow(self, state: RunState, step: Step) -> Outcome:
        """Start a subflow's child; the step then waits for it."""
        data = step.data
        assert isinstance(data, SubflowData)
        try:
            child_input = render(data.input, state.context()) if data.input is not None else {}
        except ExpressionError as exc:
            return Outcome.failure(f"step {step.id!r}: {exc}", exc.error_type)
        failure = await self._over_caps(state.run, step, 1) or await self._start(state.run, step, 0, child_input)
        return failure or Outcome(ok=True, wait=True, input={"flowId": data.flow_id, "input": child_input})

    async def start_foreach(self, state: RunState, step: Step) -> Outcome:
        """Start a foreach's first children (as many as its concurrency); the step then waits for them."""
        data = step.data
        assert isinstance(data, ForeachData)
        try:
            items = evaluate(expression_source(data.items), state.context())
        except ExpressionError as exc:
            return Outcome.failure(f"step {step.id!r}: {exc}", exc.error_type)
        if not isinstance(items, list):
            return Outcome.failure(f"step {step.id!r}: items gave {type(items).__name__}, not a list", "expression")
        if not items:
            return Outcome(ok=True, output=[], input={"items": []})
        if (refused := await self._over_caps(state.run, step, len(items))) is not None:
            return refused
        for index in range(min(data.concurrency, len(items))):
            failure = await self._start_element(state, step, items, index)
            if failure is not None:
                return failure
        return Outcome(ok=True, wait=True, input={"items": items})

    async def _over_caps(self, run: RunRecord, step: Step, planned: int) -> Outcome | None:
        """A ``limit-exceeded`` failure when ``planned`` more children are over the plan's caps, else None.

        Checked once, when the step starts, against every item it will start (a foreach whose items
        are over the cap starts none) and the children other steps of this attempt of the run started.
        """
        found = await self.runner.caps_of(run.tenant_id)
        if found is None:
            return None
        plan, caps = found
        if isinstance(step.data, ForeachData) and caps.foreach_items is not None and planned > caps.foreach_items:
            return Outcome.failure(
                f"step {step.id!r}: {planned} items, over the {plan} plan's cap of {caps.foreach_items} foreach items",
                LIMIT_EXCEEDED,
            )
        if (cap := caps.children_per_run) is None:
            return None
        async with self.db.reading() as conn:
            started = await repo.count_children(conn, parent_run_id=run.id, retry_count=run.retry_count, but=step.id)
        if started + planned > cap:
            return Outcome.failure(
                f"step {step.id!r} would start {planned} child run{'s' if planned != 1 else ''} after the {started} "
                f"this run started: over the {plan} plan's cap of {cap} child runs per run",
                LIMIT_EXCEEDED,
            )
        return None

    async def _start_element(self, state: RunState, step: Step, items: list[Any], index: int) -> Outcome | None:
        data = step.data
        assert isinstance(data, ForeachData)
        try:
            scope = {**state.context(), "item": items[index], "index": index}
            child_input = render(data.input, scope) if data.input is not None else {"item": items[index]}
        except ExpressionError as exc:
            return Outcome.failure(f"step {step.id!r}, item {index}: {exc}", exc.error_type)
        return await self._start(state.run, step, index, child_input)

    async def _start(self, run: RunRecord, step: Step, index: int, child_input: Any) -> Outcome | None:
        """Start one child run (idempotent: a re-run attempt finds the same child); a failure if it cannot."""
        data = step.data
        assert isinstance(data, ChildFlowData)
        req = StartRun(
            flow_id=data.flow_id,
            input=child_input,
            trigger_type="subflow",
            parent_run_id=run.id,
            parent_step_id=step.id,
            parent_index=index,
            idempotency_key=f"child:{run.id}:{run.retry_count}:{step.id}:{index}",
        )
        try:
            await self.runner.start_run(run.tenant_id, req)
        except (NotFound, Conflict, InvalidInput) as exc:
            return Outcome.failure(f"step {step.id!r} cannot start flow {data.flow_id}: {exc.detail}", "child-start")
        return None

    async def ended(self, run_id: str, step_id: str) -> None:
        """One of a step's child runs ended: finish the step, or start the next foreach elements."""
        async with self.db.reading() as conn:
            kids = await repo.children(conn, parent_run_id=run_id, parent_step_id=step_id)
        more = await self.runner.apply(run_id, ChildrenEnded(step_id, kids))
        if not more:
            return
        snap = await self.runner.snapshot(run_id)
        state = snap.steps.get(step_id) if snap is not None else None
        if snap is None or state is None or state.status != "waiting":
            return
        items = (state.input or {}).get("items", [])
        started = {k.index for k in kids}
        for index in [i for i in range(len(items)) if i not in started][:more]:
            failure = await self._start_element(snap, snap.graph.steps[step_id], items, index)
            if failure is not None:
                await self.runner.apply(run_id, Complete(step_id, state.attempt, failure))
                return

    async def cancel(self, run_id: str, step_id: str | None = None) -> None:
        """Cancel every child run still open (and theirs), of a run or of one of its steps."""
        async with self.db.reading() as conn:
            open_ids = await repo.open_children(conn, parent_run_id=run_id, parent_step_id=step_id)
        for child_id in open_ids:
            with contextlib.suppress(NotFound):
                await self.runner.apply(child_id, Cancel(if_open=True))
            await self.cancel(child_id)
