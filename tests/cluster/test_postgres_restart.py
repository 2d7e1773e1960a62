"""PostgreSQL is the source of truth (docs/architecture.md#guarantees): SIGKILL it under load and start
it again on the same port and data directory.

Every run accepted with 201, before or after the outage, succeeds; the services heal by themselves
(every replica ready again, none restarted); a request during the outage may fail, but only with a
retryable answer (502/503/504 with a problem body) — never a 500.
"""

from __future__ import annotations

import logging
import os
import signal
import time

import httpx
import pytest

from cluster.harness import Load, api, check_runs, check_usage, count_runs, publish, slow_flow, wait_until
from flowmesh.cli.cluster import ClusterShape
from flowmesh.cli.embedded import start_postgres
from upstream import Upstream

log = logging.getLogger(__name__)
OUTAGE_S = 3.0


def _ready(shape: ClusterShape, name: str) -> int:
    return httpx.get(shape.replicas[name].url + "/readyz", timeout=5).status_code


@pytest.mark.timeout(240)
def test_a_postgres_crash_loses_no_accepted_run_and_the_services_heal_by_themselves(
    shape: ClusterShape, upstream: Upstream, tenant: str
) -> None:
    postgres = shape.postgres
    assert postgres is not None
    pids = shape.pids()
    with api(shape, tenant) as c:
        flow_id = publish(c, slow_flow(upstream))
        load = Load(shape, tenant, flow_id)
        try:
            with load.steady(workers=4, pause=0.2):
                load.start_many(60)
                wait_until(lambda: count_runs(c, flow_id, "running") >= 5, timeout=30, what="runs in flight")
                before = len(load.accepted)
                os.kill(postgres.process.pid, signal.SIGKILL)
                postgres.process.wait(10)
                down = time.monotonic()
                # the load goes on against a database that is not there, and the services say so
                for name in ("runner-1", "flows-2", "usage-1", "scheduler-2"):
                    wait_until(lambda name=name: _ready(shape, name) == 503, timeout=10, what=f"{name} not ready")
                wait_until(lambda: time.monotonic() - down > OUTAGE_S, timeout=OUTAGE_S + 5, what="the outage")
                failed_during = [a for a in load.answers if a.at >= down]
                shape.postgres = start_postgres(postgres.data_dir, port=postgres.port, log_path=postgres.log_path)
                up = time.monotonic()
                shape.wait_ready(timeout=90)
                healed = time.monotonic() - up
                # and new runs are accepted and finish again
                wait_until(lambda: len(load.accepted) >= before + 40, timeout=60, what="starts after the restart")
            check_runs(c, load, timeout=180)
            check_usage(c, len(load.accepted), timeout=90)
        finally:
            load.close()
    assert shape.pids() == pids, "a service process was restarted (or died)"
    assert failed_during, "no request failed while PostgreSQL was down: did the outage happen?"
    log.info(
        "postgres restart: %d runs accepted; every replica ready %.1f s after the restart; answers seen: %s",
        len(load.accepted),
        healed,
        load.summary(),
    )
