"""The runner in-process, the flows service played by the tests, and a client of ``fm.rpc.runs.*``.

The runner asks ``fm.rpc.flows.runnable`` which frozen version of a flow to run. A service's tests
must not import another service, so the test kit's ``FlowsStandIn`` answers that question on NATS
with the contract models, for flows the tests "publish" into it. Everything else goes through the runner's
public interfaces: its RPC subjects and the JetStream streams, as the gateway or the scheduler would.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from flowmesh.contracts.subjects import FlowsOp
from flowmesh.runner.app import create_app
from flowmesh.runner.settings import RunnerSettings
from flowmesh.runtime.rpc import RpcClient
from flowmesh.runtime.service import ServiceRuntime
from flowmesh.runtime.testing import FlowsStandIn, Infra, RunsClient, ServiceUnderTest, responder
from upstream import Upstream

# a queued run not started within a second is sent again, and a dispatched step within two: the
# sweep's recovery shows in a test's time (its production defaults are 10 s and 120 s)
RUNNER_OVERRIDES: dict[str, Any] = {
    "sweep_interval_s": 0.25,
    "stalled_run_s": 1.0,
    "stalled_step_s": 2.0,
    "default_run_timeout_ms": 0,  # no run time limit: no timer per run, no scheduler needed
    "http_step_allow_private": True,  # http steps call the tests' local upstream
}


@pytest.fixture(scope="module")
def service_under_test() -> ServiceUnderTest[RunnerSettings]:
    return ServiceUnderTest(create_app, RunnerSettings, RUNNER_OVERRIDES)


@pytest.fixture(scope="module")
async def flows(infra: Infra) -> AsyncIterator[FlowsStandIn]:
    """The flows service's ``runnable`` answered by the test, for the module's runner."""
    stand_in = FlowsStandIn()
    async with responder(infra.nats_url, "flows", {FlowsOp.RUNNABLE: stand_in.runnable}):
        yield stand_in


@pytest.fixture
def runs(rpc: RpcClient, tenant: str, service: ServiceRuntime, flows: FlowsStandIn) -> RunsClient:
    """The runner's API for the test's tenant (the runner and the flows stand-in running)."""
    return RunsClient(rpc, tenant)


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    """An HTTP server of the tests' own for ``http`` steps (``tests/upstream.py``), per module."""
    server = Upstream()
    yield server
    server.close()
