"""The flows service: definitions, versions, triggers."""

from __future__ import annotations

from pathlib import Path

from flowmesh.flows import handlers
from flowmesh.flows.deps import FlowsDeps
from flowmesh.flows.settings import FlowsSettings
from flowmesh.flows.tables import outbox
from flowmesh.runtime.db import DriverPool
from flowmesh.runtime.outbox import OutboxRelay
from flowmesh.runtime.quota import QuotaView
from flowmesh.runtime.rpc import RpcClient
from flowmesh.runtime.service import ServiceRuntime

MIGRATIONS = Path(__file__).parent / "migrations"


def create_app(settings: FlowsSettings) -> ServiceRuntime:
    """The flows service, ready to run (``async with service.running(): ...``)."""
    service = ServiceRuntime("flows", settings, migrations=MIGRATIONS)
    relay = OutboxRelay(service.sessions, outbox)
    quotas = QuotaView(RpcClient(service.broker, timeout=settings.rpc_timeout_s))
    driver = DriverPool(settings.db_url, size=settings.db_pool_size, application_name="flows")
    service.rpc.include(handlers.router, FlowsDeps(service.sessions, relay, driver, quotas))
    service.resource(driver.opened)
    service.resource(lambda: quotas.running(service.js, replicas=settings.stream_replicas))
    service.resource(lambda: relay.running(service.js))
    return service
