"""The runner's I/O around the pure engine: transactions, JetStream, step execution, recovery.

Every change to a run happens in a transaction that holds the run's row lock (``SELECT … FOR
UPDATE``): concurrent workers finishing parallel branches therefore see each other's results, and a
join runs exactly once. Events are written with the change and published right after the commit;
``published_seq`` records what reached JetStream, and the sweep re-publishes the rest after a crash
(JetStream drops duplicates by ``Nats-Msg-Id`` = event id).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any, Final, NamedTuple

import asyncpg
import orjson
from jsonschema.protocols import Validator
from jsonschema.validators import validator_for
from nats.js import JetStreamContext
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from flowmesh.contracts import headers as h
from flowmesh.contracts.errors import Conflict, InvalidInput, NotFound, QuotaExceeded, RateLimited
from flowmesh.contracts.expressions import ExpressionError, evaluate, expression_source, render
from flowmesh.contracts.ids import is_uuid, new_id, utcnow
from flowmesh.contracts.models import FieldError, FlowVersion, Run
from flowmesh.contracts.models.definition import ChildFlowData, ForeachData, SubflowData
from flowmesh.contracts.models.flows import FlowSettings
from flowmesh.contracts.models.rpc import RunnableFlow, StartRun, StartRunResult
from flowmesh.contracts.models.run_events import RunQueuedData
from flowmesh.contracts.models.timers import TimerFired, TimerRef, TimerSet
from flowmesh.contracts.models.work import StepWork
from flowmesh.contracts.strict import json_pointer
from flowmesh.contracts.subjects import STEP_WORK, FlowsOp, SchedulerOp, run_event
from flowmesh.runner import repo
from flowmesh.runner.engine import TIMER_OWNER, Deadline, Outcome, RunRecord, RunState, TimerOp
from flowmesh.runner.graph import Graph, Step
from flowmesh.runner.io_steps import HttpStep, LlmStep
from flowmesh.runner.kinds import runner_for
from flowmesh.runtime.quota import QuotaView
from flowmesh.runtime.rpc import RpcClient

log = logging.getLogger(__name__)

RUNNABLE_TTL_S: Final = 5.0
PUBLISH_TIMEOUT_S: Final = 5.0
PUBLISHED_PENDING_S: Final = 5.0
"""How long a published span waits for the events before it to be recorded, before the sweep's turn."""
TIMER_RPC_TIMEOUT_S: Final = 2.0
RUNNABLE_CACHE_SIZE: Final = 10_000

CHILD_DONE = ":child"
"""Message ids of work telling a parent step that one of its child runs ended end so."""


class Work(NamedTuple):
    """A step-work message and its ``Nats-Msg-Id`` (one per run retry and step attempt, per ended child)."""

    body: StepWork
    msg_id: str


def canonical_hash(value: Any) -> str:
    """A stable hash of a JSON value (key order does not matter)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class Executor:
    """Starts, advances and executes runs."""

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        flows: RpcClient,
        http: HttpStep,
        *,
        heartbeat_s: float = 10.0,
        scheduler: RpcClient | None = None,
        default_run_timeout_ms: int | None = None,
        llm: LlmStep | None = None,
        quotas: QuotaView | None = None,
    ) -> None:
        self.heartbeat_s = heartbeat_s
        self.quotas = quotas
        self.llm = llm
        self.sessions = sessions
        self.flows = flows
        self.scheduler = scheduler or flows
        self.default_run_timeout_ms = default_run_timeout_ms
        self.http = http
        self.js: JetStreamContext | None = None
        self.pool: asyncpg.Pool | None = None
        self._graphs: dict[tuple[str, int], Graph] = {}
        self._validators: dict[tuple[str, int], Validator | None] = {}
        # per run, the spans of events (first seq, last seq, when) that reached JetStream and are
        # not yet recorded in published_seq
        self._published: dict[str, list[tuple[int, int, float]]] = {}
        self._saved_versions: set[tuple[str, int]] = set()
        self._tasks: set[asyncio.Future[None]] = set()
        self._runnable: dict[tuple[str, str, int | None], tuple[float, RunnableFlow]] = {}
        self._runnable_lookups: dict[tuple[str, str, int | None], asyncio.Future[RunnableFlow]] = {}
        self._forgets = 0
        self._flush_task: asyncio.Task[None] | None = None

    def _background(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def start(self, js: JetStreamContext, pool: asyncpg.Pool) -> None:
        """Begin publishing (called once connected)."""
        self.js = js
        self.pool = pool
        self._flush_task = asyncio.create_task(self._flush_published(), name="published-seq")

    async def stop(self) -> None:
        """Finish publishing, stop background work; anything left is recovered by the sweep."""
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)
        if self._flush_task is not None:
            self._flush_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flush_task
        await self._write_published()

    # --- versions ---------------------------------------------------------------------------------

    async def _graph(self, s: AsyncSession, flow_id: str, version: int) -> Graph:
        key = (flow_id, version)
        graph = self._graphs.get(key)
        if graph is None:
            row = await repo.get_version(s, flow_id=flow_id, version=version)
            if row is None:
                raise NotFound(f"version {version} of flow {flow_id} is unknown to the runner")
            graph = self._graphs[key] = self._parse(row["definition"], row["settings"])
        return graph

    def _parse(self, definition: Any, settings: Any) -> Graph:
        run_timeout_ms = FlowSettings.model_validate(settings or {}).run_timeout_ms
        return Graph(definition, run_timeout_ms=run_timeout_ms, default_run_timeout_ms=self.default_run_timeout_ms)

    def _check_input(self, runnable: RunnableFlow, value: Any) -> None:
        key = (runnable.flow_id, runnable.version.version)
        if key not in self._validators:
            schema = runnable.version.input_schema
            self._validators[key] = validator_for(schema)(schema) if schema else None
        validator = self._validators[key]
        if validator is None:
            return
        errors = [
            FieldError(path=json_pointer(("input", *e.absolute_path)), message=e.message)
            for e in validator.iter_errors(value)
        ]
        if errors:
            raise InvalidInput("the input does not match the flow's inputSchema", errors=errors)

    # --- start ------------------------------------------------------------------------------------

    async def runnable(self, tenant: str, flow_id: str, version: int | None) -> RunnableFlow:
        """What the flows service says about starting a flow, cached until it announces a change.

        Entries are dropped by ``fm.flows.{t}.*`` announcements (the flows service publishes them
        before it answers the change), and expire after a few seconds in case one was missed.
        """
        key = (tenant, flow_id, version)
        hit = self._runnable.get(key)
        now = time.monotonic()
        if hit is not None and hit[0] > now:
            return hit[1]
        # one question per flow at a time: when an entry expires, the starts in flight share it
        pending = self._runnable_lookups.get(key)
        if pending is None:
            pending = self._runnable_lookups[key] = asyncio.ensure_future(self._lookup_runnable(key))
            pending.add_done_callback(lambda _: self._runnable_lookups.pop(key, None))
        return await asyncio.shield(pending)

    async def _lookup_runnable(self, key: tuple[str, str, int | None]) -> RunnableFlow:
        tenant, flow_id, version = key
        forgets = self._forgets
        found = RunnableFlow.model_validate(
            await self.flows.call(FlowsOp.RUNNABLE, {"flowId": flow_id, "version": version}, tenant=tenant)
        )
        if forgets == self._forgets:  # no announcement raced the question: the answer may be kept
            if len(self._runnable) > RUNNABLE_CACHE_SIZE:
                self._runnable.clear()
            self._runnable[key] = (time.monotonic() + RUNNABLE_TTL_S, found)
        return found

    def forget_flow(self, tenant: str, flow_id: str) -> None:
        """A flow changed (published, rolled back, (de)activated, deleted): ask the flows service again."""
        self._forgets += 1
        for key in [k for k in self._runnable if k[0] == tenant and k[1] == flow_id]:
            self._runnable.pop(key, None)

    async def start_run(self, tenant: str, req: StartRun, *, durable: bool = False) -> StartRunResult:
        """Create a run of a published, active flow (idempotent by key), queued for execution.

        A start the plan refuses raises :class:`QuotaExceeded` (monthly runs used up) or
        :class:`RateLimited` (runs in flight).

        A ``durable`` start (``fm.cmd.runs.start``: schedules, event triggers) differs in two ways:
        a monthly refusal is recorded as a ``failed`` run of error type ``quota-exceeded``, not
        billed (DESIGN §6); and its key alone names it (the sender owns the key, and a re-send may
        carry a later ``firedAt``), so a repeat is the first run whatever its input.
        """
        if not is_uuid(req.flow_id):
            raise NotFound(f"flow {req.flow_id} not found")
        runnable = await self.runnable(tenant, req.flow_id, req.version)
        if not runnable.active:
            raise Conflict(f"flow {req.flow_id} is deactivated; activate it to start runs")
        self._check_input(runnable, req.input)
        input_hash = canonical_hash(req.input)
        in_flight_limit, refusal = None, None
        if self.quotas is not None and req.parent_run_id is None:  # children are part of their run
            quota = await self.quotas.get(tenant)
            if quota is not None and self.quotas.refuses_runs(quota):
                if req.idempotency_key and (repeat := await self._repeat(tenant, req, input_hash, durable)) is not None:
                    return repeat
                refusal = QuotaExceeded(
                    f"the {quota.plan} plan's {quota.runs_limit} runs of {quota.period} are used up; "
                    "upgrade the plan, or wait for the next month"
                )
                if not durable:
                    raise refusal
            elif quota is not None:
                in_flight_limit = quota.runs_in_flight_limit
        version = runnable.version
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
        )
        extra = {
            "trigger_id": req.trigger_id,
            "idempotency_key": req.idempotency_key,
            "input_hash": input_hash,
            "parent_step_id": req.parent_step_id,
            "parent_index": req.parent_index,
            "retry_of": req.retry_of,
        }
        graph = await self._version_graph(version)
        ex = RunState(record, graph, {}, now)
        if refusal is not None:
            ex.fail(refusal.detail, None, refusal.code)  # one event, run.failed: never queued, not billed
        else:
            # the run goes as far as it can in the transaction that accepts it: a flow of pure steps
            # is done at commit, with no message to another worker and no second transaction
            ex.queue()
            ex.advance()
        assert self.pool is not None
        async with self.pool.acquire() as conn:
            if (version.flow_id, version.version) not in self._saved_versions:
                # the runner's copy of the version comes first (a run never points at a missing one)
                await repo.insert_version(
                    conn,
                    flow_id=version.flow_id,
                    version=version.version,
                    tenant=tenant,
                    definition=version.definition,
                    input_schema=version.input_schema,
                    settings=version.settings,
                )
                self._saved_versions.add((version.flow_id, version.version))
            # one statement, one round trip: the run, its steps and its events, or nothing
            events = await repo.create_run(conn, record=record, values=extra, ex=ex, in_flight_limit=in_flight_limit)
        if events is None:
            if req.idempotency_key and (repeat := await self._repeat(tenant, req, input_hash, durable)) is not None:
                return repeat
            raise RateLimited(
                f"{in_flight_limit} runs of this tenant are queued or running, the plan's limit; "
                "start this one when some have finished",
                retry_after_s=1,
            )
        work = [_attempt_work(ex, step_id) for step_id in ex.dispatch]
        work += _parent_work(ex, was_final=False)
        # answer as soon as the run is committed; its events follow (a crash here is the sweep's job)
        self._background(self._after_commit(record, events, work))
        self._set_timers(ex.timers.values())
        # the answer is the run as accepted (queued); its progress is in its events
        accepted = Run(
            id=record.id,
            flow_id=record.flow_id,
            version=record.version,
            tenant_id=tenant,
            status="queued" if refusal is None else "failed",
            trigger_type=req.trigger_type,
            trigger_id=req.trigger_id,
            input=req.input,
            error=record.error if refusal is not None else None,
            idempotency_key=req.idempotency_key,
            parent_run_id=req.parent_run_id,
            retry_of=req.retry_of,
            created_at=now,
            completed_at=record.completed_at,
        )
        return StartRunResult(run=accepted, created=True)

    async def _version_graph(self, version: FlowVersion) -> Graph:
        """The parsed graph of a frozen version (parsed once: versions never change)."""
        key = (version.flow_id, version.version)
        graph = self._graphs.get(key)
        if graph is None:
            graph = self._graphs[key] = self._parse(version.definition, version.settings)
        return graph

    async def _repeat(
        self, tenant: str, req: StartRun, input_hash: str, durable: bool = False
    ) -> StartRunResult | None:
        """A start whose idempotency key was used: the same run for the same input, else 422.

        None: the key was not used.
        """
        assert req.idempotency_key is not None
        async with self.sessions() as s:
            found = await repo.run_by_key(s, tenant=tenant, flow_id=req.flow_id, key=req.idempotency_key)
        if found is None:
            return None
        existing, existing_hash = found
        if existing_hash != input_hash and not durable:
            raise InvalidInput(
                f"Idempotency-Key {req.idempotency_key!r} was used for another input of this flow",
                errors=[FieldError(path="/input", message="differs from the first request with this key")],
            )
        return StartRunResult(run=existing, created=False)

    # --- changing a run under its lock ----------------------------------------------------------

    async def change(
        self, run_id: str, apply: Callable[[RunState], Awaitable[Any] | Any], *, tenant: str | None = None
    ) -> Any:
        """Lock a run, load its state, apply a change, write it, then publish events and work."""
        async with self.sessions.begin() as s:
            record = await repo.lock_run(s, run_id=run_id, tenant=tenant)
            if record is None:
                raise NotFound(f"run {run_id} not found")
            graph = await self._graph(s, record.flow_id, record.version)
            ex = RunState(record, graph, await repo.load_steps(s, run_id=run_id), utcnow())
            was_final = record.final
            result = apply(ex)
            if asyncio.iscoroutine(result):
                result = await result
            events = await repo.save(s, ex)
        work = [_attempt_work(ex, step_id) for step_id in ex.dispatch]
        work += _parent_work(ex, was_final)
        self._set_timers(ex.timers.values())
        await self._after_commit(ex.run, events, work)
        for step_id in ex.abandoned:
            await self.cancel_children(run_id, step_id)
        if ex.run.status == "timedOut" and not was_final:
            await self.cancel_children(run_id)
        return result

    async def reopen(self, run_id: str, *, tenant: str) -> None:
        """Retry a failed run in place: failed and downstream steps reset, succeeded outputs kept."""
        now = utcnow()
        async with self.sessions.begin() as s:
            record = await repo.lock_run(s, run_id=run_id, tenant=tenant)
            if record is None:
                raise NotFound(f"run {run_id} not found")
            if record.status != "failed":
                raise Conflict(f"only a failed run can be retried; run {run_id} is {record.status}")
            graph = await self._graph(s, record.flow_id, record.version)
            kept = {k: v for k, v in (await repo.load_steps(s, run_id=run_id)).items() if v.status == "succeeded"}
            record.retry_count = await repo.reset_for_retry(s, run_id=run_id, keep=set(kept), now=now)
            record.status, record.error, record.output, record.completed_at = "queued", None, None, None
            ex = RunState(record, graph, kept, now)
            ex.emit(RunQueuedData(status="queued", trigger_type=record.trigger_type, retry_count=record.retry_count))
            ex.start_clock()
            events = await repo.save(s, ex)
        self._set_timers(ex.timers.values())
        advance = Work(StepWork(run_id=run_id, kind="advance"), f"{run_id}:{record.retry_count}:start")
        await self._after_commit(record, events, [advance])

    async def advance(self, run_id: str) -> None:
        """Advance a run as far as it goes (the work message of a new or reopened run)."""
        with contextlib.suppress(NotFound):
            await self.change(run_id, lambda ex: ex.advance())

    # --- executing a dispatched step ------------------------------------------------------------

    async def _snapshot(self, run_id: str) -> RunState | None:
        """A read-only view of a run (no lock): enough to build a step's expression context."""
        async with self.sessions() as s:
            record = await repo.read_run(s, run_id=run_id)
            if record is None:
                return None
            graph = await self._graph(s, record.flow_id, record.version)
            return RunState(record, graph, await repo.load_steps(s, run_id=run_id), utcnow())

    async def execute(self, run_id: str, step_id: str, heartbeat: Callable[[], Awaitable[None]]) -> float | None:
        """Run one attempt of a dispatched step and record it; returns a delay when it is not due yet.

        Runs after the worker died mid-attempt execute again (at least once); the recording is
        guarded by the attempt number, so a result is recorded exactly once.
        """
        snap = await self._snapshot(run_id)
        state = snap.steps.get(step_id) if snap is not None else None
        if snap is None or state is None or snap.run.final:
            return None
        if state.status == "pending":
            if await self.change(run_id, lambda ex: ex.claim_retry(step_id)) is None:
                due = state.next_attempt_at
                wait = (due - utcnow()).total_seconds() if due is not None else 0
                return wait if wait > 0 else None
            snap = await self._snapshot(run_id)
            if snap is None:
                return None
        current = snap.steps.get(step_id)
        if current is None or current.status != "running" or snap.run.final:
            return None
        attempt = current.attempt
        step = snap.graph.steps[step_id]
        work = self._run_step(snap, step)
        timeout_ms = step.data.timeout_ms
        if timeout_ms is not None and step.kind.timeout == "attempt":
            # the worker bounds its own attempt (steps that bound their own I/O do it themselves);
            # the durable timer fires a little later, for a worker that died or hung
            work = _bounded(work, timeout_ms, f"attempt {attempt} of step {step_id!r}")
        outcome = await _with_heartbeat(work, heartbeat, self.heartbeat_s)
        await self.change(run_id, lambda ex: ex.complete(step_id, attempt, outcome))
        if outcome.wait:
            # children that ended before the step was recorded waiting told nobody: look now
            await self.child_done(run_id, step_id)
        return None

    async def _run_step(self, ex: RunState, step: Step) -> Outcome:
        attempt = runner_for(step.type).attempt
        if attempt is None:
            return Outcome.failure(f"step type {step.type!r} is not available in this runner yet", "unsupported")
        return await attempt(self, ex, step)

    @property
    def children(self) -> Executor:
        """Child runs (this object, until the shell is split)."""
        return self

    # --- child runs (subflow, foreach) -----------------------------------------------------------

    async def start_subflow(self, state: RunState, step: Step) -> Outcome:
        """Start a subflow's child; the step then waits for it."""
        data = step.data
        assert isinstance(data, SubflowData)
        try:
            child_input = render(data.input, state.context()) if data.input is not None else {}
        except ExpressionError as exc:
            return Outcome.failure(f"step {step.id!r}: {exc}", "expression")
        failure = await self._start_child(state.run, step, 0, child_input)
        return failure or Outcome(ok=True, wait=True, input={"flowId": data.flow_id, "input": child_input})

    async def start_foreach(self, state: RunState, step: Step) -> Outcome:
        """Start a foreach's first children (as many as its concurrency); the step then waits for them."""
        data = step.data
        assert isinstance(data, ForeachData)
        try:
            items = evaluate(expression_source(data.items), state.context())
        except ExpressionError as exc:
            return Outcome.failure(f"step {step.id!r}: {exc}", "expression")
        if not isinstance(items, list):
            return Outcome.failure(f"step {step.id!r}: items gave {type(items).__name__}, not a list", "expression")
        if not items:
            return Outcome(ok=True, output=[], input={"items": []})
        for index in range(min(data.concurrency, len(items))):
            failure = await self._start_element(state, step, items, index)
            if failure is not None:
                return failure
        return Outcome(ok=True, wait=True, input={"items": items})

    async def _start_element(self, ex: RunState, step: Step, items: list[Any], index: int) -> Outcome | None:
        data = step.data
        assert isinstance(data, ForeachData)
        try:
            scope = {**ex.context(), "item": items[index], "index": index}
            child_input = render(data.input, scope) if data.input is not None else {"item": items[index]}
        except ExpressionError as exc:
            return Outcome.failure(f"step {step.id!r}, item {index}: {exc}", "expression")
        return await self._start_child(ex.run, step, index, child_input)

    async def _start_child(self, run: RunRecord, step: Step, index: int, child_input: Any) -> Outcome | None:
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
            await self.start_run(run.tenant_id, req)
        except (NotFound, Conflict, InvalidInput) as exc:
            return Outcome.failure(f"step {step.id!r} cannot start flow {data.flow_id}: {exc.detail}", "child-start")
        return None

    async def child_done(self, run_id: str, step_id: str) -> None:
        """One of a step's child runs ended: finish the step, or start the next foreach elements."""
        async with self.sessions() as s:
            kids = await repo.children(s, parent_run_id=run_id, parent_step_id=step_id)
        more = await self.change(run_id, lambda ex: ex.children_done(step_id, kids))
        if not more:
            return
        snap = await self._snapshot(run_id)
        state = snap.steps.get(step_id) if snap is not None else None
        if snap is None or state is None or state.status != "waiting":
            return
        items = (state.input or {}).get("items", [])
        started = {k.index for k in kids}
        for index in [i for i in range(len(items)) if i not in started][:more]:
            failure = await self._start_element(snap, snap.graph.steps[step_id], items, index)
            if failure is not None:
                await self.change(run_id, partial(_complete, step_id=step_id, attempt=state.attempt, outcome=failure))
                return

    async def cancel_children(self, run_id: str, step_id: str | None = None) -> None:
        """Cancel every child run still open (and theirs), of a run or of one of its steps."""
        async with self.sessions() as s:
            open_ids = await repo.open_children(s, parent_run_id=run_id, parent_step_id=step_id)
        for child_id in open_ids:
            with contextlib.suppress(NotFound):
                await self.change(child_id, _cancel_open)
            await self.cancel_children(child_id)

    # --- timers -----------------------------------------------------------------------------------

    async def timer_fired(self, fired: TimerFired) -> float | None:
        """A durable timer of the runner came due: act on it if it is still current.

        Returns seconds to wait when its deadline has not come by our clock yet, else None.
        """
        deadline = Deadline.from_payload(fired.payload) if fired.owner == TIMER_OWNER else None
        if deadline is None or not is_uuid(deadline.run_id):
            log.warning("ignoring a fired timer that is not the runner's: %s", fired.key)
            return None
        due_at, fired_at = _aware(fired.due_at), _aware(fired.fired_at)
        try:
            early: float | None = await self.change(
                deadline.run_id, partial(_expire, deadline=deadline, due_at=due_at, fired_at=fired_at)
            )
        except NotFound:
            return None
        return early

    def _set_timers(self, ops: Iterable[TimerOp]) -> None:
        """Arm and cancel a committed change's timers, in the background.

        Best effort: the deadline is in the row already, so a timer lost here (scheduler down,
        runner killed) is enforced by the sweep instead, a little late.
        """
        wanted = list(ops)
        if wanted:
            self._background(self._send_timers(wanted))

    async def _send_timers(self, ops: list[TimerOp]) -> None:
        async def send(op: TimerOp) -> None:
            ref = {"owner": TIMER_OWNER, "key": op.deadline.key}
            try:
                if op.due_at is None:
                    await self.scheduler.call(
                        SchedulerOp.TIMER_CANCEL, TimerRef(**ref), tenant="", timeout=TIMER_RPC_TIMEOUT_S
                    )
                else:
                    payload = op.deadline.payload().wire(exclude_none=True)
                    body = TimerSet(**ref, due_at=op.due_at, payload=payload)
                    await self.scheduler.call(SchedulerOp.TIMER_SET, body, tenant="", timeout=TIMER_RPC_TIMEOUT_S)
            except Exception as exc:
                if op.due_at is None:
                    log.info("cancelling timer %s failed (if it fires, it is stale): %s", op.deadline.key, exc)
                else:
                    log.warning("arming timer %s failed (the sweep enforces its deadline): %s", op.deadline.key, exc)

        await asyncio.gather(*(send(op) for op in ops))

    # --- publishing -------------------------------------------------------------------------------

    async def _after_commit(self, run: RunRecord, events: list[dict[str, Any]], work: Sequence[Work]) -> None:
        """Publish a committed change's events (in order) and work; the sweep covers a failure here."""
        if self.js is None:
            return
        js = self.js
        base = {h.TENANT: run.tenant_id, h.SCHEMA: h.SCHEMA_VERSION}
        try:
            # sent back to back (the stream keeps their order), acknowledgements awaited together
            acks = [
                await js.publish_async(
                    run_event(run.tenant_id, run.flow_id, run.id, e["type"]),
                    orjson.dumps(e),
                    headers={**base, h.MSG_ID: e["id"]},
                )
                for e in events
            ]
            acks += [
                await js.publish_async(STEP_WORK, _work_body(w.body), headers={**base, h.MSG_ID: w.msg_id})
                for w in work
            ]
            await asyncio.wait_for(asyncio.gather(*acks), PUBLISH_TIMEOUT_S)
            if events:
                span = (events[0]["seq"], events[-1]["seq"], time.monotonic())
                self._published.setdefault(run.id, []).append(span)
        except Exception as exc:
            log.warning("publishing after commit failed (the sweep will retry): %s", exc)

    async def _flush_published(self) -> None:
        while True:
            await asyncio.sleep(0.2)
            try:
                await self._write_published()
            except Exception as exc:
                log.warning("recording published events failed: %s", exc)

    async def _write_published(self) -> None:
        if not self._published:
            return
        pending, self._published = self._published, {}
        if self.pool is None:
            return
        # Why spans and not "the highest seq published": a change whose event publish failed (its
        # stream's leader died) may be followed by one whose publish succeeded, even on another
        # replica; recording only the highest seq hid the failed events from the sweep for ever, and
        # the usage service (and integrators) never saw them. Spans held back by such a hole, or by
        # another replica's span not recorded yet, wait a few flushes; the sweep covers the rest.
        spans = {run_id: _merged(found) for run_id, found in pending.items()}
        try:
            async with self.pool.acquire() as conn:
                now_at = await repo.mark_published(conn, spans={r: s[0][:2] for r, s in spans.items()})
        except BaseException:
            self._keep_pending(spans, {})
            raise
        self._keep_pending(spans, now_at)

    def _keep_pending(self, spans: dict[str, list[tuple[int, int, float]]], now_at: dict[str, int]) -> None:
        """Put back the spans not recorded yet (for a while: after that, the sweep re-publishes them)."""
        oldest = time.monotonic() - PUBLISHED_PENDING_S
        for run_id, found in spans.items():
            left = [s for s in found if s[1] > now_at.get(run_id, 0) and s[2] > oldest]
            if left:
                self._published.setdefault(run_id, []).extend(left)

    # --- recovery ---------------------------------------------------------------------------------

    async def sweep(
        self, *, stalled_run: timedelta, stalled_step: timedelta, overdue: timedelta = timedelta(seconds=10)
    ) -> int:
        """Re-publish what a crash kept from JetStream: events, and work of runs that stopped moving.

        Also enforces deadlines ``overdue`` past due whose timer never came (lost on the way to the
        scheduler, or the scheduler was down): a lost timer delays a timeout, never loses it.
        """
        now = utcnow()
        async with self.sessions() as s:
            late = await repo.overdue(s, before=now - overdue, limit=500)
        for deadline in late:
            with contextlib.suppress(NotFound):
                await self.change(deadline.run_id, partial(_expire, deadline=deadline, due_at=None, fired_at=None))
        async with self.sessions() as s:
            events = await repo.unpublished_events(s, older_than=now - timedelta(seconds=2), limit=1000)
            stalled = await repo.stalled_work(
                s, run_older_than=now - stalled_run, step_older_than=now - stalled_step, limit=500
            )
        by_run: dict[str, list[dict[str, Any]]] = {}
        for e in events:
            by_run.setdefault(e.run_id, []).append(e.wire(exclude_none=True))
        for run_id, evs in by_run.items():
            first = events[[e.run_id for e in events].index(run_id)]
            record = RunRecord(
                id=run_id,
                tenant_id=first.tenant_id,
                flow_id=first.flow_id,
                version=first.version,
                status="",
                trigger_type="",
                input=None,
                created_at=now,
            )
            await self._after_commit(record, evs, [])
        async with self.sessions() as s:
            parents = await repo.stalled_parents(s, older_than=now - stalled_run, limit=500)
        work = [
            Work(StepWork(run_id=run_id, step_id=step_id, kind="child"), f"{run_id}:{step_id}:sweep{CHILD_DONE}")
            for run_id, step_id in parents
        ]
        work += [
            Work(
                StepWork(run_id=run_id, step_id=step_id, kind="advance" if step_id is None else "attempt"),
                f"{run_id}:{rc}:{step_id or 'start'}:sweep",
            )
            for run_id, step_id, rc in stalled
        ]
        if work and self.js is not None:
            for w in work:
                await self.js.publish(STEP_WORK, _work_body(w.body), headers={h.MSG_ID: w.msg_id})
        return len(late) + len(events) + len(work)


def _merged(spans: list[tuple[int, int, float]]) -> list[tuple[int, int, float]]:
    """Event spans of one run, sorted, adjacent and overlapping ones joined (the latest time kept)."""
    out: list[tuple[int, int, float]] = []
    for first, last, at in sorted(spans):
        if out and first <= out[-1][1] + 1:
            prev = out[-1]
            out[-1] = (prev[0], max(prev[1], last), max(prev[2], at))
        else:
            out.append((first, last, at))
    return out


def _aware(value: datetime) -> datetime:
    """A time from the wire, as UTC when it came without an offset."""
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _expire(ex: RunState, *, deadline: Deadline, due_at: datetime | None, fired_at: datetime | None) -> float | None:
    return ex.expire(deadline, due_at, fired_at)


async def _bounded(work: Awaitable[Outcome], timeout_ms: int, what: str) -> Outcome:
    """``work`` within ``timeout_ms``, else a retryable timeout."""
    try:
        async with asyncio.timeout(timeout_ms / 1000):
            return await work
    except TimeoutError:
        return Outcome.failure(f"{what} did not finish within {timeout_ms} ms", "timeout", retryable=True)


def _complete(ex: RunState, *, step_id: str, attempt: int, outcome: Outcome) -> None:
    ex.complete(step_id, attempt, outcome)


def _cancel_open(ex: RunState) -> None:
    if not ex.run.final:
        ex.cancel()


def _work_body(body: StepWork) -> bytes:
    return orjson.dumps(body.wire())


def _attempt_work(ex: RunState, step_id: str) -> Work:
    """Work on a dispatched step's attempt (the next one, when it waits to retry)."""
    state = ex.steps[step_id]
    attempt = state.attempt + (1 if state.status == "pending" else 0)
    body = StepWork(run_id=ex.run.id, step_id=step_id, kind="attempt")
    return Work(body, f"{ex.run.id}:{ex.run.retry_count}:{step_id}:{attempt}")


def _parent_work(ex: RunState, was_final: bool) -> list[Work]:
    """A child run that just ended tells its parent step."""
    run = ex.run
    if was_final or not run.final or not run.parent_run_id or not run.parent_step_id:
        return []
    body = StepWork(run_id=run.parent_run_id, step_id=run.parent_step_id, kind="child")
    return [Work(body, f"{run.id}{CHILD_DONE}")]


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
