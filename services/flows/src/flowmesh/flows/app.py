"""The flows service: definitions, versions, triggers (DESIGN §1)."""

from __future__ import annotations

from pathlib import Path

from flowmesh.flows import handlers
from flowmesh.flows.settings import FlowsSettings
from flowmesh.runtime.service import ServiceRuntime

MIGRATIONS = Path(__file__).parent / "migrations"


def create_app(settings: FlowsSettings) -> ServiceRuntime:
    """The flows service, ready to run (``async with service.running(): ...``)."""
    service = ServiceRuntime("flows", settings, migrations=MIGRATIONS)
    handlers.register(service.rpc, service.sessions)
    return service
