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

For tests that play another service (a service's tests must not import another service),
:func:`responder` serves RPC subjects with the runtime's own :class:`RpcServer`, so replies and
errors are the real wire format; :class:`FlowsStandIn` is the flows service as the runner asks it
(``fm.rpc.flows.runnable``). :class:`RunsClient` calls ``fm.rpc.runs.*`` as the gateway does and
reads the replies as contract models. A stand-in shares the real service's queue group: it expects
that service not to run on the same NATS (each service's tests start only their own service).
Definitions to publish come from :mod:`flowmesh.contracts.testing`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import pytest
from nats.js import JetStreamContext

from flowmesh.contracts.errors import NotFound
from flowmesh.contracts.ids import new_id, utcnow
from flowmesh.contracts.models import Page, Run, StepRun
from flowmesh.contracts.models.rpc import RunnableFlow, StartRunResult, VersionRef
from flowmesh.contracts.models.usage import PlanCaps, TenantQuota, quota_key
from flowmesh.contracts.streams import QUOTA_BUCKET
from flowmesh.contracts.subjects import RunsOp
from flowmesh.contracts.testing import Definition, runnable
from flowmesh.runtime.nats import create_broker, ensure_bucket, stop_broker
from flowmesh.runtime.rpc import Handler, RpcClient, RpcContext, RpcServer
from flowmesh.runtime.service import ServiceRuntime
from flowmesh.runtime.settings import BaseServiceSettings

SettingsT = TypeVar("SettingsT", bound=BaseServiceSettings)

FINAL_RUN_STATUSES = ("succeeded", "failed", "cancelled", "timedOut")


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


class FlowsStandIn:
    """The flows service as the runner sees it: published flows by tenant, answered on ``runnable``.

    Serve it with ``responder(nats_url, "flows", {FlowsOp.RUNNABLE: stand_in.runnable})``.
    """

    def __init__(self) -> None:
        self.flows: dict[tuple[str, str], RunnableFlow] = {}
        self.asked: list[tuple[str, str]] = []

    def publish(self, tenant: str, definition: Definition, **kw: Any) -> str:
        """A new published flow of ``tenant`` (version 1); its id."""
        flow_id = new_id()
        self.flows[tenant, flow_id] = runnable(tenant, flow_id, definition, **kw)
        return flow_id

    async def runnable(self, ctx: RpcContext, body: Any) -> RunnableFlow:
        """``fm.rpc.flows.runnable``: the flow of the caller's tenant, else not found (as the flows service)."""
        ref = VersionRef.model_validate(body)
        self.asked.append((ctx.tenant, ref.flow_id))
        found = self.flows.get((ctx.tenant, ref.flow_id))
        if found is None or ref.version not in (None, found.version.version):
            raise NotFound(f"flow {ref.flow_id} not found")
        return found


class RunsClient:
    """``fm.rpc.runs.*`` for one tenant, as the gateway calls it, replies read as contract models."""

    def __init__(self, rpc: RpcClient, tenant: str) -> None:
        self.rpc = rpc
        self.tenant = tenant

    async def start(self, flow_id: str, input_: Any = None, **body: Any) -> StartRunResult:
        reply = await self.rpc.call(
            RunsOp.START, {"flowId": flow_id, "input": {} if input_ is None else input_, **body}, tenant=self.tenant
        )
        return StartRunResult.model_validate(reply)

    async def get(self, run_id: str) -> Run:
        return Run.model_validate(await self.rpc.call(RunsOp.GET, {"runId": run_id}, tenant=self.tenant))

    async def wait(self, run_id: str, *, until: tuple[str, ...] = FINAL_RUN_STATUSES, timeout: float = 15.0) -> Run:
        """The run once its status is one of ``until`` (polled, as a client without a WebSocket)."""
        deadline = time.monotonic() + timeout
        while (run := await self.get(run_id)).status not in until:
            assert time.monotonic() < deadline, f"run {run_id} is still {run.status} after {timeout} s"
            await asyncio.sleep(0.05)
        return run

    async def run(self, flow_id: str, input_: Any = None, **body: Any) -> Run:
        """Start a run and wait for its end."""
        started = await self.start(flow_id, input_, **body)
        return await self.wait(started.run.id)

    async def steps(self, run_id: str) -> dict[str, StepRun]:
        reply = await self.rpc.call(RunsOp.STEPS, {"runId": run_id, "pageSize": 100}, tenant=self.tenant)
        return {s.step_id: s for s in Page[StepRun].model_validate(reply).items}

    async def of_flow(self, flow_id: str) -> list[Run]:
        reply = await self.rpc.call(RunsOp.LIST, {"flowId": flow_id, "pageSize": 100}, tenant=self.tenant)
        return Page[Run].model_validate(reply).items

    async def events(self, run_id: str) -> list[dict[str, Any]]:
        reply = await self.rpc.call(RunsOp.EVENTS, {"runId": run_id, "pageSize": 500}, tenant=self.tenant)
        return list(reply["items"])


async def put_caps(js: JetStreamContext, tenant: str, caps: PlanCaps, *, plan: str = "tiny") -> None:
    """Write ``tenant``'s ``fm_quota`` snapshot as the usage service would: a plan with ``caps``, no other limit.

    Services follow the bucket with a watch: a test waits on an effect of the caps, not on this write.
    """
    now = utcnow()
    quota = TenantQuota(
        tenant_id=tenant,
        plan=plan,
        plan_revision=1,
        period=now.strftime("%Y-%m"),
        period_start=now,
        period_end=now,
        runs_used=0,
        runs_limit=None,
        runs_in_flight_limit=None,
        flows_limit=None,
        overage_allowed=False,
        runs_exhausted=False,
        updated_at=now,
        caps=caps,
    )
    kv = await ensure_bucket(js, QUOTA_BUCKET, ttl_s=0)
    await kv.put(quota_key(tenant), quota.model_dump_json(by_alias=True).encode())


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
