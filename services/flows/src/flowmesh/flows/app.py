"""The flows service: definitions, versions, triggers."""

from __future__ import annotations

from pathlib import Path

from flowmesh.flows import handlers, repo
from flowmesh.flows.deps import FlowsDeps
from flowmesh.flows.settings import FlowsSettings
from flowmesh.runtime.outbox import OutboxRelay
from flowmesh.runtime.quota import QuotaView
from flowmesh.runtime.rpc import RpcClient
from flowmesh.runtime.service import ServiceRuntime

MIGRATIONS = Path(__file__).parent / "migrations"


def create_app(settings: FlowsSettings) -> ServiceRuntime:
    """The flows service, ready to run (``async with service.running(): ...``)."""
    service = ServiceRuntime("flows", settings, migrations=MIGRATIONS)
    relay = OutboxRelay(service.db, repo.SCHEMA)
    quotas = QuotaView(RpcClient(service.broker, timeout=settings.rpc_timeout_s))
    service.rpc.include(handlers.router, FlowsDeps(service.db, relay, quotas))
    service.resource(lambda: quotas.running(service.js, replicas=settings.stream_replicas))
    service.resource(lambda: relay.running(service.js))
    return service
