"""The runner service (DESIGN §1)."""

from __future__ import annotations

from pathlib import Path

from flowmesh.runner.settings import RunnerSettings
from flowmesh.runtime.service import ServiceRuntime

MIGRATIONS = Path(__file__).parent / "migrations"


def create_app(settings: RunnerSettings) -> ServiceRuntime:
    """The runner service, ready to run (``async with service.running(): ...``)."""
    return ServiceRuntime("runner", settings, migrations=MIGRATIONS)
