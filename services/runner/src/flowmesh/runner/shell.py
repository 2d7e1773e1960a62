"""The runner's shell: the I/O around the pure :class:`~flowmesh.runner.engine.RunState`.

:class:`Runner` starts runs, applies named :mod:`~flowmesh.runner.commands` to a run under its row
lock, and executes dispatched step attempts. Its parts, each in its own module: the runnable-flow
cache and the versions (:mod:`.flow_cache`), the event publisher (:mod:`.publisher`), the
scheduler's timers (:mod:`.timer_calls`), child runs (:mod:`.children`) and recovery (:mod:`.recovery`).

Every change to a run happens in a transaction that holds the run's row lock (``SELECT … FOR
UPDATE``): concurrent workers finishing parallel branches therefore see each other's results, and a
join runs exactly once. Events are written with the change and published right after the commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import asyncpg
from nats.js import JetStreamContext

from flowmesh.contracts.errors import Conflict, InvalidInput, NotFound, QuotaExceeded, RateLimited
from flowmesh.contracts.ids import is_uuid, new_id, utcnow
from flowmesh.contracts.models import FieldError, FlowVersion, Run
from flowmesh.contracts.models.rpc import RunListQuery, StartRun, StartRunResult
from flowmesh.contracts.models.timers import TimerFired
from flowmesh.contracts.models.usage import PlanCaps
from flowmesh.contracts.models.work import StepWork
from flowmesh.runner import metrics, repo
from flowmesh.runner.children import ChildRuns
from flowmesh.runner.commands import Advance, Cancel, ClaimRetry, Command, Complete, DeliverEvent, Expire, Resume
from flowmesh.runner.engine import TIMER_OWNER, Deadline, OutputLimits, RunRecord, RunState
from flowmesh.runner.flow_cache import RunnableFlows, Versions
from flowmesh.runner.graph import Step
from flowmesh.runner.io_steps import HttpStep, LlmStep
from flowmesh.runner.kinds import runner_for
from flowmesh.runner.outcome import Outcome
from flowmesh.runner.publisher import EventPublisher, Work, work_of
from flowmesh.runner.recovery import Recovery
from flowmesh.runner.secrets import SecretReveal
from flowmesh.runner.timer_calls import TimerCalls, background
from flowmesh.runner.traces import attempt_span, db_span, record_outcome
from flowmesh.runner.writes import HeldWrites
from flowmesh.runtime.db import Database
from flowmesh.runtime.logs import log_context
from flowmesh.runtime.quota import QuotaView
from flowmesh.runtime.rpc import RpcClient
from flowmesh.runtime.tracing import current_traceparent, new_traceparent

log = logging.getLogger(__name__)
T = TypeVar("T")


def canonical_hash(value: Any) -> str:
    """A stable hash of a JSON value (key order does not matter)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class Runner:
    """Starts, changes and executes runs (and, as :class:`~flowmesh.runner.kinds.StepTools`, lends
    step attempts its clients)."""

    def __init__(
        self,
        db: Database,
        flows: RpcClient,
        http: HttpStep,
        *,
        heartbeat_s: float = 10.0,
        scheduler: RpcClient | None = None,
        default_run_timeout_ms: int | None = None,
        llm: LlmStep | None = None,
        secrets: SecretReveal | None = None,
        quotas: QuotaView | None = None,
        limits: OutputLimits | None = None,
        local_workers: int = 0,
        lease_s: float = 30.0,
    ) -> None:
        self.db = db
        self.local_free = local_workers
        """Steps this process may still take on itself, with no work message (see :meth:`_claim_local`)."""
        self.lease_s = lease_s
        self.limits = limits or OutputLimits()
        self.http = http
        self.llm = llm
        self.secrets = secrets
        self.quotas = quotas
        self.heartbeat_s = heartbeat_s
        self.runnable = RunnableFlows(flows)
        self.versions = Versions(default_run_timeout_ms)
        self.publisher = EventPublisher()
        self.timers = TimerCalls(scheduler or flows)
        self.children = ChildRuns(db, self)
        self.recovery = Recovery(db, self, self.publisher)
        self.pool: asyncpg.Pool | None = None
        self.writes = HeldWrites(lambda: self.pool)
        self._tasks: set[asyncio.Future[None]] = set()

    @property
    def js(self) -> JetStreamContext | None:
        """JetStream, once started."""
        return self.publisher.js

    def start(self, js: JetStreamContext, pool: asyncpg.Pool) -> None:
        """Begin publishing (called once connected)."""
        self.pool = pool
        self.publisher.start(js, pool)

    async def stop(self) -> None:
        """Finish publishing, stop background work; anything left is recovered by the sweep."""
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)
        await self.timers.stop()
        await self.publisher.stop()

    def output_limits(self, tenant: str) -> OutputLimits:
        """The operator's output limits, lowered to the tenant's plan caps when known here (no round trip)."""
        quota = self.quotas.known(tenant) if self.quotas is not None else None
        return self.limits if quota is None else self.limits.within(quota.plan, quota.caps)

    async def caps_of(self, tenant: str) -> tuple[str, PlanCaps] | None:
        """The tenant's plan and its caps, None when nobody can say (nothing capped then, as for quotas)."""
        quota = await self.quotas.get(tenant) if self.quotas is not None else None
        return None if quota is None else (quota.plan, quota.caps)

    def forget_flow(self, tenant: str, flow_id: str) -> None:
        """A flow changed (published, rolled back, (de)activated, deleted): ask the flows service again."""
        self.runnable.forget(tenant, flow_id)

    # --- starting a run ----------------------------------------------------------------------------

    async def start_run(self, tenant: str, req: StartRun, *, durable: bool = False) -> StartRunResult:
        """Create a run of a published, active flow (idempotent by key), queued for execution.

        A start the plan refuses raises :class:`QuotaExceeded` (monthly runs used up) or
        :class:`RateLimited` (runs in flight).

        A ``durable`` start (``fm.cmd.runs.start``: schedules, event triggers) differs in two ways:
        a monthly refusal is recorded as a ``failed`` run of error type ``quota-exceeded``, not
        billed (a schedule's owner sees why it did not run); and its key alone names it (the sender
        owns the key, and a re-send may carry a later ``firedAt``), so a repeat is the first run
        whatever its input.
        """
        if not is_uuid(req.flow_id):
            raise NotFound(f"flow {req.flow_id} not found")
        runnable = await self.runnable.get(tenant, req.flow_id, req.version)
        if not runnable.active:
            raise Conflict(f"flow {req.flow_id} is deactivated; activate it to start runs")
        self.versions.check_input(runnable.version, req.input)
        input_hash = canonical_hash(req.input)
        admitted = await self._admit(tenant, req, input_hash, durable)
        if isinstance(admitted, StartRunResult):
            return admitted
        in_flight_limit, refusal = admitted
        state = self._first_change(tenant, req, runnable.version, refusal)
        local = self._claim_local(state)
        try:
            events = await self._create(state, req, runnable.version, input_hash, in_flight_limit, local)
        except BaseException:
            self.local_free += len(local)  # not committed: nothing was leased
            raise
        if events is None:
            self.local_free += len(local)
            if req.idempotency_key and (repeat := await self._repeat(tenant, req, input_hash, durable)) is not None:
                return repeat
            raise RateLimited(
                f"{in_flight_limit} runs of this tenant are queued or running, the plan's limit; "
                "start this one when some have finished",
                retry_after_s=1,
            )
        metrics.committed(state.events)
        self.timers.send(state.timers.values())
        accepted = _accepted(state.run, req, refused=refusal is not None)
        # answer as soon as the run is committed; its events and first steps follow (a crash here is
        # the sweep's job)
        background(self._tasks, self._publish_and_continue(state, events, local))
        return StartRunResult(run=accepted, created=True)

    async def _publish_and_continue(self, state: RunState, events: list[dict[str, Any]], local: list[str]) -> None:
        """A new run's events and work, then its ``local`` first steps (their events come after these)."""
        sent = await self.publisher.send(state.run, events, work_of(state, was_final=False, local=local))
        self._continue(state, local)  # hands ``state`` on: not read here after this
        await self.publisher.confirm(sent)

    async def _admit(
        self, tenant: str, req: StartRun, input_hash: str, durable: bool
    ) -> tuple[int | None, QuotaExceeded | None] | StartRunResult:
        """The plan's word on a start: the limit of runs in flight, or a refusal; a repeat's first run."""
        if self.quotas is None or req.parent_run_id is not None:  # children are part of their run
            return None, None
        quota = await self.quotas.get(tenant)
        if quota is None:
            return None, None
        if not self.quotas.refuses_runs(quota):
            return quota.runs_in_flight_limit, None
        if req.idempotency_key and (repeat := await self._repeat(tenant, req, input_hash, durable)) is not None:
            return repeat
        refusal = QuotaExceeded(
            f"the {quota.plan} plan's {quota.runs_limit} runs of {quota.period} are used up; "
            "upgrade the plan, or wait for the next month"
        )
        if not durable:
            raise refusal
        return None, refusal

    def _first_change(
        self, tenant: str, req: StartRun, version: FlowVersion, refusal: QuotaExceeded | None
    ) -> RunState:
        """The new run and its first change: as far as it goes, or failed at once when refused."""
        now = utcnow()
        record = RunRecord(
            id=new_id(),
            tenant_id=tenant,
            flow_id=req.flow_id,
            version=version.version,
            status="queued",
            trigger_type=req.trigger_type,
            input=req.input,
            created_at=now,
            parent_run_id=req.parent_run_id,
            parent_step_id=req.parent_step_id,
            traceparent=current_traceparent() or new_traceparent(),
        )
        state = RunState(record, self.versions.graph_of(version), {}, now, limits=self.output_limits(record.tenant_id))
        if refusal is not None:
            state.fail(refusal.detail, None, refusal.code)  # one event, run.failed: never queued, not billed
        else:
            # the run goes as far as it can in the transaction that accepts it: a flow of pure steps
            # is done at commit, with no message to another worker and no second transaction
            state.queue()
            state.advance()
        return state

    async def _create(
        self,
        state: RunState,
        req: StartRun,
        version: FlowVersion,
        input_hash: str,
        in_flight_limit: int | None,
        local: list[str],
    ) -> list[dict[str, Any]] | None:
        """Write the new run with its first change, ``local`` steps leased to this process; None when
        its key was taken or the limit reached."""
        values = {
            "trigger_id": req.trigger_id,
            "idempotency_key": req.idempotency_key,
            "input_hash": input_hash,
            "parent_step_id": req.parent_step_id,
            "parent_index": req.parent_index,
            "retry_of": req.retry_of,
        }
        assert self.pool is not None
        with db_span("create_run", state.run.id), log_context(run_id=state.run.id):
            return await self._insert(state, version, values, in_flight_limit, local)

    async def _insert(
        self,
        state: RunState,
        version: FlowVersion,
        values: dict[str, Any],
        in_flight_limit: int | None,
        local: list[str],
    ) -> list[dict[str, Any]] | None:
        assert self.pool is not None
        lease = dict.fromkeys(local, state.now + timedelta(seconds=self.lease_s))
        async with self.pool.acquire() as conn:
            # the runner's copy of the version comes first (a run never points at a missing one)
            await self.versions.save(conn, version, state.run.tenant_id)
            # one statement, one round trip: the run, its steps and its events, or nothing
            return await repo.create_run(
                conn, record=state.run, values=values, state=state, leases=lease, in_flight_limit=in_flight_limit
            )

    async def _repeat(self, tenant: str, req: StartRun, input_hash: str, durable: bool) -> StartRunResult | None:
        """A start whose idempotency key was used: the same run for the same input, else 422.

        None: the key was not used.
        """
        assert req.idempotency_key is not None
        async with self.db.reading() as conn:
            found = await repo.run_by_key(conn, tenant=tenant, flow_id=req.flow_id, key=req.idempotency_key)
        if found is None:
            return None
        existing, existing_hash = found
        if existing_hash != input_hash and not durable:
            raise InvalidInput(
                f"Idempotency-Key {req.idempotency_key!r} was used for another input of this flow",
                errors=[FieldError(path="/input", message="differs from the first request with this key")],
            )
        return StartRunResult(run=existing, created=False)

    # --- changing a run under its lock ------------------------------------------------------------

    async def apply(
        self, run_id: str, command: Command[T], *, tenant: str | None = None, held: RunState | None = None
    ) -> T:
        """Apply ``command`` to a run and write it, then publish its events and work.

        ``held``: the run as this process last read or wrote it, which becomes the change's state
        if no other change came since (one statement, no lock); else, and without it, the run is
        locked and loaded.

        Raises:
            NotFound: no such run (of ``tenant``, when given).
        """
        with db_span(f"apply.{type(command).__name__.lower()}", run_id):
            changed = None if held is None else await self._change_held(held, command)
            if changed is None:
                changed = await self._change(run_id, command, tenant)
        state, was_final, result, events, local = changed
        metrics.committed(state.events)
        self.timers.send(state.timers.values())
        sent = await self.publisher.send(state.run, events, work_of(state, was_final, local))
        abandoned, timed_out = list(state.abandoned), state.run.status == "timedOut" and not was_final
        # the next step starts while JetStream acknowledges these events: its own come after them
        self._continue(state, local)  # hands ``state`` on: not read here after this
        await self.publisher.confirm(sent)
        for step_id in abandoned:
            await self.children.cancel(run_id, step_id)
        if timed_out:
            await self.children.cancel(run_id)
        return result

    async def _change(
        self, run_id: str, command: Command[T], tenant: str | None
    ) -> tuple[RunState, bool, T, list[dict[str, Any]], list[str]]:
        """One transaction: lock, load, apply ``command``, write; the state, whether it had ended, the
        command's result, the events written and the steps this process takes on (leased to it)."""
        local: list[str] = []
        assert self.pool is not None
        try:
            async with self.pool.acquire() as conn, conn.transaction():
                found = await repo.lock_for_change(conn, run_id=run_id, tenant=tenant)
                if found is None:
                    raise NotFound(f"run {run_id} not found")
                record, steps = found
                graph = await self.versions.graph(conn, record.flow_id, record.version)
                state = RunState(record, graph, steps, utcnow(), limits=self.output_limits(record.tenant_id))
                was_final = record.final
                result = command.apply(state)
                local = self._claim_local(state)
                lease = state.now + timedelta(seconds=self.lease_s)
                events = await repo.save_change(conn, state, dict.fromkeys(local, lease))
                if events is None:  # cannot be: the lock keeps every other change out
                    raise RuntimeError(f"run {run_id} changed under its lock")
        except BaseException:
            self.local_free += len(local)  # not committed: nothing was leased
            raise
        return state, was_final, result, events, local

    async def _change_held(
        self, held: RunState, command: Command[T]
    ) -> tuple[RunState, bool, T, list[dict[str, Any]], list[str]] | None:
        """:meth:`_change` from the run as ``held`` has it, in one statement that writes only if the
        run's revision is still ``held``'s (no lock, no read; shared with other runs' held changes,
        :mod:`.writes`); None when another change came first.

        ``held`` is this process's own: the state its last change of the run committed (the step it
        executes next) or a snapshot read for a step's attempt. A change in between (a timer, a
        cancel, a parallel branch, a worker that took over the step) makes the write apply nothing,
        and the caller takes the lock and applies the command to the run as it is.
        """
        state = RunState(held.run, held.graph, held.steps, utcnow(), limits=held.limits)
        was_final = state.run.final
        result = command.apply(state)
        local = self._claim_local(state)
        lease = state.now + timedelta(seconds=self.lease_s)
        try:
            events = await self.writes.save(state, dict.fromkeys(local, lease))
        except BaseException:
            self.local_free += len(local)
            raise
        if events is None:
            self.local_free += len(local)  # nothing written: ``held`` (now changed) is dropped
            return None
        return state, was_final, result, events, local

    # --- steps executed where they became ready ---------------------------------------------------

    def _claim_local(self, state: RunState) -> list[str]:
        """The dispatched steps this process executes itself, as far as it has room.

        A step made ready by a change this worker just committed (the next step of a chain, after
        a step's result, a timer or an event) is executed here, from the state in hand: no work
        message, no other worker fetching it, no second read of the run. Its row is leased to this
        process instead (``lease_until``, extended while the attempt runs): should the process die,
        the lease runs out and the sweep sends the step's work to any replica, as for a lost
        message. Steps waiting to retry, and those beyond this process's room, go as messages.
        """
        if self.local_free <= 0:
            return []
        local = [step_id for step_id in state.dispatch if state.steps[step_id].status == "running"]
        local = local[: self.local_free]
        self.local_free -= len(local)
        return local

    def _continue(self, state: RunState, local: list[str]) -> None:
        """Execute the steps :meth:`_claim_local` took, in the background, from the committed state.

        One step (a chain) takes the state over and writes its result from it when no other change
        came between; steps of parallel branches share a view of it and write theirs under the lock.
        """
        if not local:
            return
        steps = state.steps if len(local) == 1 else dict(state.steps)
        view = RunState(state.run, state.graph, steps, utcnow(), limits=state.limits)
        for step_id in local:
            background(self._tasks, self._execute_local(view, step_id, held=len(local) == 1))

    async def _execute_local(self, state: RunState, step_id: str, *, held: bool) -> None:
        freed = False

        def free() -> None:
            nonlocal freed
            if not freed:
                freed, self.local_free = True, self.local_free + 1

        try:
            await self._execute(state, step_id, None, held=held, attempted=free)
        except Exception as exc:
            # the lease runs out and the sweep sends the step's work to any replica
            log.warning("step %r of run %s failed here, it will be re-sent: %s", step_id, state.run.id, exc)
        finally:
            free()

    async def _extend_lease(self, run_id: str, step_id: str, attempt: int) -> None:
        assert self.pool is not None
        async with self.pool.acquire() as conn:
            until = utcnow() + timedelta(seconds=self.lease_s)
            await repo.extend_lease(conn, run_id=run_id, step_id=step_id, attempt=attempt, until=until)

    async def reopen(self, run_id: str, *, tenant: str) -> None:
        """Retry a failed run in place: failed and downstream steps reset, succeeded outputs kept."""
        now = utcnow()
        assert self.pool is not None
        async with self.pool.acquire() as conn, conn.transaction():
            found = await repo.lock_for_change(conn, run_id=run_id, tenant=tenant)
            if found is None:
                raise NotFound(f"run {run_id} not found")
            record, steps = found
            if record.status != "failed":
                raise Conflict(f"only a failed run can be retried; run {run_id} is {record.status}")
            graph = await self.versions.graph(conn, record.flow_id, record.version)
            kept = {k: v for k, v in steps.items() if v.status == "succeeded"}
            record.retry_count = await repo.reset_for_retry(conn, run_id=run_id, keep=set(kept), now=now)
            state = RunState(record, graph, kept, now, limits=self.output_limits(record.tenant_id))
            state.requeue()
            events = await repo.save_change(conn, state, {})
            if events is None:  # cannot be: the lock keeps every other change out
                raise RuntimeError(f"run {run_id} changed under its lock")
        metrics.committed(state.events)
        self.timers.send(state.timers.values())
        advance = Work(StepWork(run_id=run_id, kind="advance"), f"{run_id}:{record.retry_count}:start")
        await self.publisher.publish(record, events, [advance])

    async def advance(self, run_id: str) -> None:
        """Advance a run as far as it goes (the work message of a new or reopened run)."""
        with contextlib.suppress(NotFound):
            await self.apply(run_id, Advance())

    async def cancel(self, run_id: str, *, tenant: str) -> None:
        """Cancel a run that has not ended (409 when it has), and its open child runs."""
        await self.apply(run_id, Cancel(), tenant=tenant)
        await self.children.cancel(run_id)

    async def resume(
        self, run_id: str, step_id: str, decision: str, data: dict[str, Any], *, by: str, tenant: str
    ) -> None:
        """A person's decision on a waiting approval step (409 when none waits)."""
        await self.apply(run_id, Resume(step_id, decision, data, by), tenant=tenant)

    async def deliver_event(self, run_id: str, step_id: str, attempt: int, payload: Any) -> None:
        """Offer an external event to a step waiting for one."""
        await self.apply(run_id, DeliverEvent(step_id, attempt, payload))

    async def child_done(self, run_id: str, step_id: str) -> None:
        """One of a step's child runs ended."""
        await self.children.ended(run_id, step_id)

    async def sweep(self, *, stalled_run: timedelta, stalled_step: timedelta, overdue: timedelta) -> int:
        """Recover what crashes and lost messages left behind (:class:`~flowmesh.runner.recovery.Recovery`)."""
        return await self.recovery.sweep(stalled_run=stalled_run, stalled_step=stalled_step, overdue=overdue)

    async def timer_fired(self, fired: TimerFired) -> float | None:
        """A durable timer of the runner came due: act on it if it is still current.

        Returns seconds to wait when its deadline has not come by our clock yet, else None.
        """
        deadline = Deadline.from_payload(fired.payload) if fired.owner == TIMER_OWNER else None
        if deadline is None or not is_uuid(deadline.run_id):
            log.warning("ignoring a fired timer that is not the runner's: %s", fired.key)
            return None
        try:
            return await self.apply(deadline.run_id, Expire(deadline, _aware(fired.due_at), _aware(fired.fired_at)))
        except NotFound:
            return None

    # --- executing a dispatched step ------------------------------------------------------------

    async def run_of(self, tenant: str, run_id: str) -> Run | None:
        """A run of ``tenant`` as it is now (the API's read: one statement on the driver pool)."""
        assert self.pool is not None
        async with self.pool.acquire() as conn:
            return await repo.get_run_on(conn, tenant=tenant, run_id=run_id)

    async def runs_of(self, tenant: str, q: RunListQuery) -> tuple[list[Run], int]:
        """A page of ``tenant``'s runs and how many match (the API's list: on the driver pool)."""
        assert self.pool is not None
        return await repo.list_runs(self.pool, tenant=tenant, q=q)

    async def snapshot(self, run_id: str) -> RunState | None:
        """A read-only view of a run (no lock): enough to build a step's expression context."""
        with db_span("snapshot", run_id):
            return await self._read(run_id)

    async def _read(self, run_id: str) -> RunState | None:
        assert self.pool is not None
        async with self.pool.acquire() as conn:
            found = await repo.read_for_change(conn, run_id=run_id)
            if found is None:
                return None
            record, steps = found
            graph = await self.versions.graph(conn, record.flow_id, record.version)
        return RunState(record, graph, steps, utcnow(), limits=self.output_limits(record.tenant_id))

    async def execute(self, run_id: str, step_id: str, heartbeat: Callable[[], Awaitable[None]]) -> float | None:
        """Run one attempt of a dispatched step and record it; returns a delay when it is not due yet.

        Runs after the worker died mid-attempt execute again (at least once); the recording is
        guarded by the attempt number, so a result is recorded exactly once.
        """
        claimed = await self._current_attempt(run_id, step_id)
        if not isinstance(claimed, RunState):
            return claimed
        await self._execute(claimed, step_id, heartbeat, held=True)
        return None

    async def _execute(
        self,
        claimed: RunState,
        step_id: str,
        heartbeat: Callable[[], Awaitable[None]] | None,
        *,
        held: bool,
        attempted: Callable[[], None] | None = None,
    ) -> None:
        """Run the attempt of ``step_id`` that ``claimed`` holds running, and record it (from
        ``claimed`` itself when ``held``: it is this attempt's alone). ``attempted`` is called once
        the attempt ended, before its result is recorded: a local step's room goes to the steps that
        result makes ready (a chain keeps one, not two, while its next step starts).

        While it runs, every few seconds: ``heartbeat`` (a work message's "in progress") and the
        step's lease extended (when it has one: executed where it became ready, or re-sent after).
        """
        run_id = claimed.run.id
        attempt = claimed.steps[step_id].attempt
        step = claimed.graph.steps[step_id]

        async def beat() -> None:
            if heartbeat is not None:
                await heartbeat()
            await self._extend_lease(run_id, step_id, attempt)

        with attempt_span(claimed.run, step, attempt) as span, log_context(tenant=claimed.run.tenant_id, run_id=run_id):
            work = self._attempt(claimed, step)
            timeout_ms = step.data.timeout_ms
            if timeout_ms is not None and step.kind.timeout == "attempt":
                # the worker bounds its own attempt (steps that bound their own I/O do it themselves);
                # the durable timer fires a little later, for a worker that died or hung
                work = _bounded(work, timeout_ms, f"attempt {attempt} of step {step_id!r}")
            outcome = await _with_heartbeat(work, beat, self.heartbeat_s)
            record_outcome(span, step, attempt, outcome)
            if attempted is not None:
                attempted()
            await self.apply(run_id, Complete(step_id, attempt, outcome), held=claimed if held else None)
        if outcome.wait:
            # children that ended before the step was recorded waiting told nobody: look now
            await self.children.ended(run_id, step_id)

    async def _current_attempt(self, run_id: str, step_id: str) -> RunState | float | None:
        """The run with the step's attempt running now (claiming a retry that is due), else a delay or None."""
        snap = await self.snapshot(run_id)
        state = snap.steps.get(step_id) if snap is not None else None
        if snap is None or state is None or snap.run.final:
            return None
        if state.status == "pending":
            if await self.apply(run_id, ClaimRetry(step_id)) is None:
                due = state.next_attempt_at
                wait = (due - utcnow()).total_seconds() if due is not None else 0
                return wait if wait > 0 else None
            snap = await self.snapshot(run_id)
            if snap is None:
                return None
        current = snap.steps.get(step_id)
        if current is None or current.status != "running" or snap.run.final:
            return None
        return snap

    async def _attempt(self, state: RunState, step: Step) -> Outcome:
        attempt = runner_for(step.type).attempt
        if attempt is None:
            return Outcome.failure(f"step type {step.type!r} is not available in this runner yet", "unsupported")
        return await attempt(self, state, step)


def _accepted(record: RunRecord, req: StartRun, *, refused: bool) -> Run:
    """The answer to a start: the run as accepted (queued, or failed when refused); its progress is in its events."""
    return Run(
        id=record.id,
        flow_id=record.flow_id,
        version=record.version,
        tenant_id=record.tenant_id,
        status="failed" if refused else "queued",
        trigger_type=req.trigger_type,
        trigger_id=req.trigger_id,
        input=req.input,
        error=record.error if refused else None,
        idempotency_key=req.idempotency_key,
        parent_run_id=req.parent_run_id,
        retry_of=req.retry_of,
        created_at=record.created_at,
        completed_at=record.completed_at,
    )


def _aware(value: datetime) -> datetime:
    """A time from the wire, as UTC when it came without an offset."""
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


async def _bounded(work: Awaitable[Outcome], timeout_ms: int, what: str) -> Outcome:
    """``work`` within ``timeout_ms``, else a retryable timeout."""
    try:
        async with asyncio.timeout(timeout_ms / 1000):
            return await work
    except TimeoutError:
        return Outcome.failure(f"{what} did not finish within {timeout_ms} ms", "timeout", retryable=True)


async def _with_heartbeat(
    work: Awaitable[Outcome], heartbeat: Callable[[], Awaitable[None]], every_s: float
) -> Outcome:
    """Await ``work`` while telling JetStream every few seconds that the message is still in progress."""
    task = asyncio.ensure_future(work)
    while True:
        done, _ = await asyncio.wait({task}, timeout=every_s)
        if done:
            return task.result()
        with contextlib.suppress(Exception):
            await heartbeat()
