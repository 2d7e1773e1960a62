"""The flows service is what these tests start (the test kit's ``service``, ``rpc`` and ``tenant``)."""

from __future__ import annotations

import pytest

from flowmesh.flows.app import create_app
from flowmesh.flows.settings import FlowsSettings
from flowmesh.runtime.service import ServiceRuntime
from flowmesh.runtime.testing import ServiceUnderTest


@pytest.fixture(scope="module")
def service_under_test() -> ServiceUnderTest[FlowsSettings]:
    return ServiceUnderTest(create_app, FlowsSettings)


@pytest.fixture(scope="module")
def flows_service(service: ServiceRuntime) -> ServiceRuntime:
    return service
