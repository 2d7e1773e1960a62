"""The scheduler service (DESIGN §1)."""

from __future__ import annotations

from pathlib import Path

from flowmesh.runtime.service import ServiceRuntime
from flowmesh.scheduler.settings import SchedulerSettings

MIGRATIONS = Path(__file__).parent / "migrations"


def create_app(settings: SchedulerSettings) -> ServiceRuntime:
    """The scheduler service, ready to run (``async with service.running(): ...``)."""
    return ServiceRuntime("scheduler", settings, migrations=MIGRATIONS)
