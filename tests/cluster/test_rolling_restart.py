"""A rolling restart of every replica (SIGTERM, wait for the exit, start, wait until ready, next) under
load through the front loses no run and fails no request beyond the documented retryable answers.

The load client is a well-behaved one: HTTP keep-alive, an ``Idempotency-Key`` on every start, and a
retry with the same key after 502/503/504 with a problem body, 429 with ``Retry-After``, or a dropped
connection (``Load`` records anything else, and the test fails on it). A gateway told to stop drains
first (``FLOWMESH_GATEWAY_DRAIN_S``): ``/readyz`` answers 503, so the front stops sending it new
connections, and each answer closes its connection, so keep-alive clients move to the other gateway.
"""

from __future__ import annotations

import logging
import signal
import time

import pytest

from cluster.harness import Load, api, check_runs, check_usage, publish, slow_flow
from flowmesh.cli.cluster import ClusterShape
from upstream import Upstream

log = logging.getLogger(__name__)


@pytest.mark.timeout(240)
def test_a_rolling_restart_of_every_replica_loses_no_run_and_fails_no_request(
    shape: ClusterShape, upstream: Upstream, tenant: str
) -> None:
    took: dict[str, float] = {}
    with api(shape, tenant) as c:
        flow_id = publish(c, slow_flow(upstream))
        load = Load(shape, tenant, flow_id)
        try:
            with load.steady(workers=3, pause=0.4):
                load.start_many(20)
                for name in shape.names:
                    began = time.monotonic()
                    started = shape.starts[name]
                    shape.kill(name, signal.SIGTERM)  # returns once the process has exited
                    assert shape.pids()[name] is None
                    shape.start(name)
                    shape.wait_ready(names=[name], timeout=60)
                    assert shape.starts[name] == started + 1
                    took[name] = round(time.monotonic() - began, 1)
            check_runs(c, load)
            check_usage(c, len(load.accepted))
        finally:
            load.close()
    log.info(
        "rolling restart: %d runs accepted; per replica (s): %s; retryable answers seen: %s",
        len(load.accepted),
        took,
        load.summary(),
    )
