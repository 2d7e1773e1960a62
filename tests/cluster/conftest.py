"""One cluster shape for every fault test here: 3 NATS nodes (R3 streams), 2 replicas of each service,
a front, and a PostgreSQL of its own (the PostgreSQL test restarts it).

Starting a shape costs half a minute on two cores, so the tests share it; each test uses a tenant of
its own (runs, usage counters) and leaves the shape as it found it — and if a failed test did not,
``healthy`` starts again whatever is down before the next one.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from flowmesh.cli.cluster import ClusterShape
from upstream import Upstream

INTEGRATORS = ("acme", "globex")
SETTINGS = {
    # a killed runner's step messages come back after 3 s, stalled work is swept every second
    "FLOWMESH_RUNNER_ACK_WAIT_S": "3",
    "FLOWMESH_RUNNER_SWEEP_INTERVAL_S": "1",
    "FLOWMESH_RUNNER_STALLED_STEP_S": "4",
    "FLOWMESH_RUNNER_STALLED_RUN_S": "2",
    # a killed usage replica's batch is metered by the other after 2 s
    "FLOWMESH_USAGE_ACK_WAIT_S": "2",
    # a gateway told to stop stays 1.5 s out of the front's rotation (health checks every 0.5 s)
    "FLOWMESH_GATEWAY_DRAIN_S": "1.5",
}


@pytest.fixture(scope="package")
def shape(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterShape]:
    workdir: Path = tmp_path_factory.mktemp("cluster")
    with ClusterShape(workdir, replicas=2, integrators=INTEGRATORS, env=SETTINGS, ready_timeout=180) as s:
        yield s


@pytest.fixture(autouse=True)
def healthy(shape: ClusterShape) -> None:
    """Every NATS node, PostgreSQL and replica running and ready before a test starts."""
    _restore(shape)


def _restore(shape: ClusterShape) -> None:
    assert shape.nats is not None
    for index, node in enumerate(shape.nats.nodes):
        if not node.running:
            shape.restart_nats(index)
    assert shape.postgres is not None and shape.postgres.running, "PostgreSQL is down (a failed restart?)"
    for name, pid in shape.pids().items():
        if pid is None:
            shape.start(name)
    shape.wait_ready(timeout=120)


@pytest.fixture(scope="package")
def upstream() -> Iterator[Upstream]:
    u = Upstream()
    yield u
    u.close()


@pytest.fixture
def tenant() -> str:
    return f"t{uuid.uuid4().hex[:10]}"
