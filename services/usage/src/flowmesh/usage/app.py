"""The usage service (DESIGN §1)."""

from __future__ import annotations

from pathlib import Path

from flowmesh.runtime.service import ServiceRuntime
from flowmesh.usage.settings import UsageSettings

MIGRATIONS = Path(__file__).parent / "migrations"


def create_app(settings: UsageSettings) -> ServiceRuntime:
    """The usage service, ready to run (``async with service.running(): ...``)."""
    return ServiceRuntime("usage", settings, migrations=MIGRATIONS)
