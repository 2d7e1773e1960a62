"""The pytest plugin every service's tests share: a service in-process, an RPC client, a tenant.

Registered once, in the repository's root ``conftest.py`` (``pytest_plugins``). A service's
``tests/conftest.py`` only says which service it tests, by overriding ``service_under_test``::

    @pytest.fixture(scope="module")
    def service_under_test() -> ServiceUnderTest:
        return ServiceUnderTest(create_app, FlowsSettings)

and its tests ask for ``service`` (the :class:`ServiceRuntime`, running), ``rpc`` (a client on the
same NATS), ``js`` (JetStream on the client's connection) and ``tenant`` (a tenant no other test
uses). The service is built the way production builds it, ``create_app(settings)``, and runs
against the session's real NATS and PostgreSQL: the ``infra`` fixture of the root ``conftest.py``,
which starts (or finds) them, and is expected to yield an :class:`Infra`.

For tests that play another service (the runner's tests answer ``fm.rpc.flows.*`` themselves, as
a service's tests must not import another service), :func:`responder` serves RPC subjects with the
runtime's own :class:`RpcServer`, so replies and errors are the real wire format.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import pytest
from nats.js import JetStreamContext

from flowmesh.runtime.nats import create_broker, stop_broker
from flowmesh.runtime.rpc import Handler, RpcClient, RpcServer
from flowmesh.runtime.service import ServiceRuntime
from flowmesh.runtime.settings import BaseServiceSettings

SettingsT = TypeVar("SettingsT", bound=BaseServiceSettings)


@dataclass(frozen=True)
class Infra:
    """Where the test servers listen: a NATS with JetStream and a PostgreSQL."""

    nats_url: str
    database_url: str


@dataclass(frozen=True)
class ServiceUnderTest(Generic[SettingsT]):
    """A service as its tests start it: its ``create_app``, its settings class and test overrides."""

    create_app: Callable[[SettingsT], ServiceRuntime]
    settings: type[SettingsT]
    overrides: Mapping[str, Any] = field(default_factory=dict)

    def settings_for(self, infra: Infra, **more: Any) -> SettingsT:
        """The service's settings on ``infra``, with this service's overrides and ``more``."""
        return service_settings(self.settings, infra.nats_url, infra.database_url, **{**self.overrides, **more})


def service_settings(cls: type[SettingsT], nats_url: str, database_url: str, **overrides: Any) -> SettingsT:
    """Settings of a test service: env ``test``, its health server on a free loopback port."""
    values: dict[str, Any] = {
        "env": "test",
        "nats_url": nats_url,
        "shared_database_url": database_url,
        "health_port": 0,
        "health_host": "127.0.0.1",
        **overrides,
    }
    return cls(**values)


@contextlib.asynccontextmanager
async def running_service(
    create_app: Callable[[SettingsT], ServiceRuntime], settings: SettingsT
) -> AsyncIterator[ServiceRuntime]:
    """``create_app(settings)`` running (migrated, subscribed, serving) until the block ends."""
    async with create_app(settings).running() as service:
        yield service


@contextlib.asynccontextmanager
async def rpc_client(nats_url: str, *, name: str = "test-client", timeout: float = 5.0) -> AsyncIterator[RpcClient]:
    """An RPC client on its own connection, as another service or the gateway would call."""
    broker = create_broker(nats_url, name=name)
    await broker.start()
    try:
        yield RpcClient(broker, timeout=timeout)
    finally:
        await stop_broker(broker)


@contextlib.asynccontextmanager
async def responder(
    nats_url: str, service: str, handlers: Mapping[str, Handler], *, tenant_required: bool = True
) -> AsyncIterator[RpcServer]:
    """Serve ``handlers`` (subject -> handler) in ``service``'s queue group, standing in for it.

    A handler gets the caller's :class:`RpcContext` and the decoded body, and returns a contract
    model (or raises a ``FlowmeshError``), exactly as a real handler of that service.
    """
    broker = create_broker(nats_url, name=f"test-{service}")
    await broker.start()
    server = RpcServer(broker, service)
    for subject, handler in handlers.items():
        server.handler(subject, tenant_required=tenant_required)(handler)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()
        await stop_broker(broker)


def new_tenant(prefix: str = "t") -> str:
    """A tenant id no other test uses: tests share one database, tenants keep them apart."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


# --- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def service_under_test() -> ServiceUnderTest[Any]:
    """Which service the tests of this directory start; a service's ``tests/conftest.py`` overrides it."""
    raise pytest.UsageError("override the service_under_test fixture in the service's tests/conftest.py")


@pytest.fixture(scope="module")
async def service(infra: Infra, service_under_test: ServiceUnderTest[Any]) -> AsyncIterator[ServiceRuntime]:
    """The service under test, running in-process on the session's NATS and PostgreSQL."""
    async with running_service(service_under_test.create_app, service_under_test.settings_for(infra)) as running:
        yield running


@pytest.fixture(scope="module")
async def rpc(infra: Infra, service: ServiceRuntime) -> AsyncIterator[RpcClient]:
    """A client of the running service (and of anything else on the session's NATS)."""
    async with rpc_client(infra.nats_url, name=f"{service.name}-test-client") as client:
        yield client


@pytest.fixture
def js(rpc: RpcClient) -> JetStreamContext:
    """JetStream on the client's connection: publish as another service would, read the streams."""
    return rpc.broker.connection.jetstream()


@pytest.fixture
def tenant() -> str:
    """A fresh tenant for one test."""
    return new_tenant()
