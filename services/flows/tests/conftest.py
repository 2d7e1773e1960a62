"""The flows service in-process against the session's real NATS and PostgreSQL, and a client."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest

from flowmesh.flows.app import create_app
from flowmesh.flows.settings import FlowsSettings
from flowmesh.runtime.nats import create_broker
from flowmesh.runtime.rpc import RpcClient
from flowmesh.runtime.service import ServiceRuntime


@pytest.fixture(scope="module")
async def flows_service(infra) -> AsyncIterator[ServiceRuntime]:  # type: ignore[no-untyped-def]
    settings = FlowsSettings(
        env="test",
        nats_url=infra.nats_url,
        shared_database_url=infra.database_url,
        health_port=0,
        health_host="127.0.0.1",
    )
    service = create_app(settings)
    async with service.running():
        yield service


@pytest.fixture(scope="module")
async def rpc(infra, flows_service) -> AsyncIterator[RpcClient]:  # type: ignore[no-untyped-def]
    broker = create_broker(infra.nats_url, name="test-client")
    await broker.start()
    yield RpcClient(broker, timeout=5)
    await broker.stop()


@pytest.fixture
def tenant() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"
