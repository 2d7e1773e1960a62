"""The runner: creates runs and executes their steps durably.

What it serves: ``fm.rpc.runs.*`` (:data:`handlers.router`); what it consumes: step work, durable
starts, external events, flow announcements and its fired timers (:mod:`handlers`); what it runs
in the background: the publisher's flush and the sweep (:mod:`recovery`).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from datetime import timedelta
from functools import partial
from pathlib import Path

from flowmesh.contracts.streams import RUNNER_EVENTS, RUNNER_FLOWS, RUNNER_STARTS, RUNNER_STEPS, RUNNER_TIMERS
from flowmesh.contracts.subjects import FLOWS_EVENTS_ALL
from flowmesh.runner import handlers, metrics, repo
from flowmesh.runner.deps import RunnerDeps
from flowmesh.runner.engine import OutputLimits
from flowmesh.runner.io_steps import HttpStep, LlmStep, usage_key_reveal
from flowmesh.runner.secrets import usage_secret_reveal
from flowmesh.runner.settings import RunnerSettings
from flowmesh.runner.shell import Runner
from flowmesh.runtime.consumers import PullOptions
from flowmesh.runtime.quota import QuotaView
from flowmesh.runtime.rpc import RpcClient
from flowmesh.runtime.service import ServiceRuntime

MIGRATIONS = Path(__file__).parent / "migrations"


def create_app(settings: RunnerSettings) -> ServiceRuntime:
    """The runner, ready to run (``async with service.running(): ...``)."""
    service = ServiceRuntime("runner", settings, migrations=MIGRATIONS)
    http = HttpStep(
        allow_private=settings.allow_private,
        max_bytes=settings.http_step_max_bytes,
        default_timeout_ms=settings.http_step_timeout_ms,
    )
    rpc = RpcClient(service.broker, timeout=settings.rpc_timeout_s)
    llm = LlmStep(
        http,
        usage_key_reveal(rpc),
        providers=settings.llm_base_urls,
        default_timeout_ms=settings.llm_step_timeout_ms,
    )
    quotas = QuotaView(rpc)
    runner = Runner(
        service.db,
        rpc,
        http,
        heartbeat_s=settings.ack_wait_s / 3,
        default_run_timeout_ms=settings.default_run_timeout_ms or None,
        llm=llm,
        secrets=usage_secret_reveal(rpc),
        quotas=quotas,
        limits=OutputLimits(settings.step_output_max_bytes, settings.run_output_max_bytes),
        local_workers=settings.local_steps,
        lease_s=settings.ack_wait_s,
    )
    deps = RunnerDeps(service.db, runner)
    service.rpc.include(handlers.router, deps)
    _consume(service, deps, settings)
    service.resource(lambda: _http_client(http))
    service.resource(lambda: quotas.running(service.js, replicas=settings.stream_replicas))
    service.resource(lambda: _runner_running(service, runner, settings))
    service.resource(lambda: _forgetting_changed_flows(service, deps))
    # the first sweep one interval after start, not at start
    service.every(settings.sweep_interval_s, partial(_sweep, runner, settings), name="sweep", wait_first=True)
    service.every(settings.metrics_interval_s, partial(_count_in_flight, service), name="counting runs in flight")
    return service


def _consume(service: ServiceRuntime, deps: RunnerDeps, settings: RunnerSettings) -> None:
    """The runner's durable consumers, shared by its replicas."""
    ack_wait = PullOptions(ack_wait_s=settings.ack_wait_s)
    consumers = service.consumers
    consumers.each(RUNNER_STARTS, handlers.start_command, deps, workers=16)
    consumers.each(
        RUNNER_EVENTS,
        handlers.external_event,
        deps,
        workers=16,
        options=PullOptions(ack_wait_s=settings.ack_wait_s, deliver_new=True),
    )
    consumers.each(RUNNER_FLOWS, handlers.flow_announced, deps)
    consumers.each(RUNNER_TIMERS, handlers.timer_fired, deps, workers=16, options=ack_wait)
    consumers.each(RUNNER_STEPS, handlers.step_work, deps, workers=settings.workers, options=ack_wait)


@contextlib.asynccontextmanager
async def _http_client(http: HttpStep) -> AsyncIterator[HttpStep]:
    await http.start()
    try:
        yield http
    finally:
        await http.close()


@contextlib.asynccontextmanager
async def _runner_running(service: ServiceRuntime, runner: Runner, settings: RunnerSettings) -> AsyncIterator[Runner]:
    """The runner's driver pool (the hot path's statements) and its publisher, for the service's life."""
    pool = await repo.open_pool(settings.db_url, size=settings.db_pool_size)
    try:
        runner.start(service.js, pool)
        try:
            yield runner
        finally:
            # anything left unpublished or unrecorded is recovered by the sweep
            await runner.stop()
    finally:
        await pool.close()


@contextlib.asynccontextmanager
async def _forgetting_changed_flows(service: ServiceRuntime, deps: RunnerDeps) -> AsyncIterator[None]:
    """Every replica hears ``fm.flows.{t}.*`` (no queue group: each keeps its own runnable-flow cache).

    A plain subscription, not a reply: the message is a JetStream publish whose reply subject
    awaits the stream's acknowledgement, not ours.
    """
    sub = await service.broker.connection.subscribe(FLOWS_EVENTS_ALL, cb=partial(handlers.flow_changed, deps=deps))
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()


async def _count_in_flight(service: ServiceRuntime) -> None:
    """The runs-in-flight gauge, refreshed on the metrics interval (one count, off the run path)."""
    async with service.db.reading() as conn:
        metrics.RUNS_IN_FLIGHT.set(await repo.count_in_flight(conn))


async def _sweep(runner: Runner, settings: RunnerSettings) -> None:
    """Send again what stalled, fire overdue deadlines whose timers were lost (see :mod:`recovery`)."""
    await runner.sweep(
        stalled_run=timedelta(seconds=settings.stalled_run_s),
        stalled_step=timedelta(seconds=settings.stalled_step_s),
        overdue=timedelta(seconds=settings.timer_fallback_s),
    )
