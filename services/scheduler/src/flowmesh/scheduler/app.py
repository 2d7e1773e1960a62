"""The scheduler service: all of time — cron triggers and durable timers."""

from __future__ import annotations

import asyncio
import logging
from functools import partial
from pathlib import Path

from flowmesh.contracts.streams import SCHEDULER_FLOWS
from flowmesh.runtime.rpc import RpcClient
from flowmesh.runtime.service import ServiceRuntime
from flowmesh.scheduler import handlers
from flowmesh.scheduler.deps import SchedulerDeps
from flowmesh.scheduler.dispatcher import Dispatcher
from flowmesh.scheduler.settings import SchedulerSettings
from flowmesh.scheduler.sync import Sync

MIGRATIONS = Path(__file__).parent / "migrations"
REBUILD_RETRY_S = 2.0
log = logging.getLogger(__name__)


def create_app(settings: SchedulerSettings) -> ServiceRuntime:
    """The scheduler service, ready to run (``async with service.running(): ...``)."""
    service = ServiceRuntime("scheduler", settings, migrations=MIGRATIONS)
    sync = Sync(service.db, RpcClient(service.broker, timeout=settings.rpc_timeout_s))
    deps = SchedulerDeps(service.db, sync, Dispatcher(service.db, settings))
    service.rpc.include(handlers.router, deps)
    service.consumers.each(
        SCHEDULER_FLOWS,
        handlers.flow_announced,
        deps,
        workers=settings.event_workers,
        malformed=handlers.unreadable_announcement,
    )

    service.resource(lambda: deps.dispatcher.running(service.js))
    service.background(partial(_catch_up, service, sync), name="scheduler-catch-up")
    return service


async def _catch_up(service: ServiceRuntime, sync: Sync) -> None:
    """Rebuild the schedules if flow announcements were missed while down.

    The flows service may not be up yet: keep trying; the schedules already known fire meanwhile.
    """
    while True:
        try:
            await sync.rebuild_if_behind(service.js)
            return
        except Exception as exc:
            log.warning("checking for missed flow announcements failed, retrying: %s", exc)
            await asyncio.sleep(REBUILD_RETRY_S)
