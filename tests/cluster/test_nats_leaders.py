"""Guarantees 1 to 3 of docs/architecture.md#guarantees (no accepted run lost, each step recorded once, usage
exact) on the cluster shape: SIGKILL the NATS node leading ``STEP_WORK``, then
the one leading ``RUN_EVENTS``, while runs are in flight and more keep starting.

With R3 streams the two nodes left keep a quorum: a new leader is elected and work goes on while the
node is down. Afterwards every accepted run succeeded with its output, no step's result or event
was recorded twice, and the usage counters equal what the run events say.
"""

from __future__ import annotations

import logging

import pytest

from cluster.harness import (
    Load,
    api,
    check_runs,
    check_usage,
    count_runs,
    publish,
    slow_flow,
    stream_leader,
    wait_until,
)
from flowmesh.cli.cluster import ClusterShape
from flowmesh.contracts.streams import RUN_EVENTS, STEP_WORK
from upstream import Upstream

log = logging.getLogger(__name__)


def _kill_leader_under_load(shape: ClusterShape, load: Load, stream: str, in_flight: int) -> int:
    """Start ``in_flight`` runs, SIGKILL the node leading ``stream`` once they run, see work go on, restart it."""
    c = api(shape, load.tenant)
    try:
        load.start_many(in_flight)
        wait_until(
            lambda: count_runs(c, load.flow_id, "running") >= 5, timeout=30, what="runs in flight", interval=0.02
        )
        leader = stream_leader(shape, stream)
        shape.kill_nats(leader)
        done = count_runs(c, load.flow_id, "succeeded")
        # the two nodes left elect another leader and the runs keep finishing while the node is down
        elected = stream_leader(shape, stream)
        assert elected != leader
        wait_until(
            lambda: count_runs(c, load.flow_id, "succeeded") >= done + 20,
            timeout=60,
            what=f"runs to keep finishing with {stream}'s leader down",
        )
        shape.restart_nats(leader)
        return leader
    finally:
        c.close()


@pytest.mark.timeout(240)
def test_sigkill_of_the_stream_leaders_loses_no_run_and_records_nothing_twice(
    shape: ClusterShape, upstream: Upstream, tenant: str
) -> None:
    with api(shape, tenant) as c:
        flow_id = publish(c, slow_flow(upstream))
        load = Load(shape, tenant, flow_id)
        try:
            with load.steady(workers=2, pause=0.3):
                work_leader = _kill_leader_under_load(shape, load, STEP_WORK.name, 100)
                killed = [f"n{work_leader + 1} (leading {STEP_WORK.name})"]
                events_leader = stream_leader(shape, RUN_EVENTS.name)
                if events_leader != work_leader:
                    _kill_leader_under_load(shape, load, RUN_EVENTS.name, 40)
                    killed.append(f"n{events_leader + 1} (leading {RUN_EVENTS.name})")
            check_runs(c, load)
            check_usage(c, len(load.accepted))
        finally:
            load.close()
        assert len(load.accepted) >= 100, len(load.accepted)
        log.info(
            "NATS leaders: killed %s; %d runs accepted; retryable answers seen: %s",
            killed,
            len(load.accepted),
            load.summary(),
        )
