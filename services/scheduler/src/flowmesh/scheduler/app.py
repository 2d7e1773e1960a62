"""The scheduler service: all of time (DESIGN §1) — cron triggers and durable timers."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from flowmesh.runtime.rpc import RpcClient
from flowmesh.runtime.service import ServiceRuntime
from flowmesh.scheduler import handlers
from flowmesh.scheduler.dispatcher import Dispatcher
from flowmesh.scheduler.settings import SchedulerSettings
from flowmesh.scheduler.sync import Sync

MIGRATIONS = Path(__file__).parent / "migrations"
REBUILD_RETRY_S = 2.0
log = logging.getLogger(__name__)


def create_app(settings: SchedulerSettings) -> ServiceRuntime:
    """The scheduler service, ready to run (``async with service.running(): ...``)."""
    service = ServiceRuntime("scheduler", settings, migrations=MIGRATIONS)
    sync = Sync(service.sessions, RpcClient(service.broker, timeout=settings.rpc_timeout_s))
    dispatcher = Dispatcher(service.sessions, settings)
    handlers.register(service.rpc, service.sessions, sync, dispatcher, event_workers=settings.event_workers)

    async def catch_up() -> None:
        # the flows service may not be up yet: keep trying; schedules already known fire meanwhile
        while True:
            try:
                await sync.rebuild_if_behind(service.js)
                return
            except Exception as exc:
                log.warning("checking for missed flow announcements failed, retrying: %s", exc)
                await asyncio.sleep(REBUILD_RETRY_S)

    service.resource(lambda: dispatcher.running(service.js))
    service.background(catch_up, name="scheduler-catch-up")
    return service
