"""The usage service is what these tests start (the test kit's ``service``, ``rpc``, ``js`` and ``tenant``)."""

from __future__ import annotations

import pytest

from flowmesh.runtime.rpc import RpcClient
from flowmesh.runtime.service import ServiceRuntime
from flowmesh.runtime.testing import ServiceUnderTest
from flowmesh.usage.app import create_app
from flowmesh.usage.settings import UsageSettings

SECRET = "usage-tests-" + "k" * 40


@pytest.fixture(scope="module")
def service_under_test(tmp_path_factory: pytest.TempPathFactory) -> ServiceUnderTest[UsageSettings]:
    overrides = {
        "data_dir": tmp_path_factory.mktemp("usage"),
        "keys_secret": SECRET,
        "default_plan": "free",
        "meter_wait_s": 0.05,
    }
    return ServiceUnderTest(create_app, UsageSettings, overrides)


@pytest.fixture(scope="module")
def usage_service(service: ServiceRuntime) -> ServiceRuntime:
    return service


@pytest.fixture(scope="module")
def client(rpc: RpcClient) -> RpcClient:
    return rpc
