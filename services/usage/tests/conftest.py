"""The usage service in-process against the session's real NATS and PostgreSQL, and a client."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
from nats.js import JetStreamContext

from flowmesh.runtime.nats import create_broker
from flowmesh.runtime.rpc import RpcClient
from flowmesh.runtime.service import ServiceRuntime
from flowmesh.usage.app import create_app
from flowmesh.usage.settings import UsageSettings

SECRET = "usage-tests-" + "k" * 40


@pytest.fixture(scope="module")
async def usage_service(infra, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[ServiceRuntime]:  # type: ignore[no-untyped-def]
    settings = UsageSettings(
        env="test",
        nats_url=infra.nats_url,
        shared_database_url=infra.database_url,
        health_port=0,
        health_host="127.0.0.1",
        data_dir=tmp_path_factory.mktemp("usage"),
        keys_secret=SECRET,
        default_plan="free",
        meter_wait_s=0.05,
    )
    service = create_app(settings)
    async with service.running():
        yield service


@pytest.fixture(scope="module")
async def client(infra, usage_service) -> AsyncIterator[RpcClient]:  # type: ignore[no-untyped-def]
    broker = create_broker(infra.nats_url, name="usage-test-client")
    await broker.start()
    yield RpcClient(broker, timeout=5)
    await broker.stop()


@pytest.fixture
def js(client: RpcClient) -> JetStreamContext:
    return client.broker.connection.jetstream()


@pytest.fixture
def tenant() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"
