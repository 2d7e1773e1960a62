"""The runner: creates runs and executes their steps durably (DESIGN §1, §5, §9)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import timedelta
from pathlib import Path

import asyncpg

from flowmesh.runner import handlers
from flowmesh.runner.io_steps import HttpStep, LlmStep, usage_key_reveal
from flowmesh.runner.settings import RunnerSettings
from flowmesh.runner.shell import Runner
from flowmesh.runtime.db import create_driver_pool
from flowmesh.runtime.quota import QuotaView
from flowmesh.runtime.rpc import RpcClient
from flowmesh.runtime.service import ServiceRuntime

MIGRATIONS = Path(__file__).parent / "migrations"
log = logging.getLogger(__name__)


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
        service.sessions,
        rpc,
        http,
        heartbeat_s=settings.ack_wait_s / 3,
        default_run_timeout_ms=settings.default_run_timeout_ms or None,
        llm=llm,
        quotas=quotas,
    )
    handlers.register(service.rpc, service.sessions, runner, workers=settings.workers, ack_wait_s=settings.ack_wait_s)
    sweeper: list[asyncio.Task[None]] = []

    async def sweep_forever() -> None:
        while True:
            await asyncio.sleep(settings.sweep_interval_s)
            try:
                await runner.sweep(
                    stalled_run=timedelta(seconds=settings.stalled_run_s),
                    stalled_step=timedelta(seconds=settings.stalled_step_s),
                    overdue=timedelta(seconds=settings.timer_fallback_s),
                )
            except Exception as exc:
                log.warning("sweep failed: %s", exc)

    pools: list[asyncpg.Pool] = []

    @service.on_start
    async def start() -> None:
        await http.start()
        pools.append(await create_driver_pool(settings.db_url, size=settings.db_pool_size, application_name="runner"))
        js = service.broker.connection.jetstream()
        await quotas.start(js, replicas=settings.stream_replicas)
        runner.start(js, pools[0])
        sweeper.append(asyncio.create_task(sweep_forever(), name="sweep"))

    @service.on_stop
    async def stop() -> None:
        for task in sweeper:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await runner.stop()
        await quotas.stop()
        await http.close()
        for pool in pools:
            await pool.close()

    return service
