"""A cron trigger fires once per due time (guarantee 4 of docs/architecture.md#guarantees) on the cluster shape:
a trigger firing every second, two schedulers, each SIGKILLed in turn.

The replica left takes over the dead one's claims once their lease passes (``lease_s``, 2 s by
default): those due times fire late, never twice and never not at all — with the default misfire
policy (``skip``) a due time is skipped only when found later than the misfire threshold (5 s), which
a failover never reaches. Every assertion is on the runs the runner created (their input carries
``scheduledAt`` and ``firedAt``).
"""

from __future__ import annotations

import itertools
import logging
import signal
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from cluster.harness import FINAL, all_runs, api, patiently, publish, wait_until
from flowmesh.cli.cluster import ClusterShape

log = logging.getLogger(__name__)
SECOND = timedelta(seconds=1)
MISFIRE_THRESHOLD_S = 5.0
"""The scheduler's default ``misfire_threshold_s``: a due time later than this would be skipped."""
ECHO = {
    "nodes": [
        {"id": "start", "type": "trigger", "data": {}},
        {"id": "echo", "type": "transform", "data": {"output": "{{ input }}"}},
    ],
    "edges": [{"id": "e", "source": "start", "target": "echo"}],
}


def _fires(c: httpx.Client, flow_id: str) -> list[dict[str, Any]]:
    return [r for r in all_runs(c, flow_id) if r["triggerType"] == "schedule"]


def _dues(c: httpx.Client, flow_id: str) -> list[datetime]:
    """The due times runs were started for, in order (duplicates kept, to be caught)."""
    return sorted(datetime.fromisoformat(r["input"]["scheduledAt"]) for r in _fires(c, flow_id))


def _fired_through(c: httpx.Client, flow_id: str, at: datetime) -> bool:
    dues = _dues(c, flow_id)
    return bool(dues) and dues[-1] >= at


@pytest.mark.timeout(120)
def test_every_due_time_fires_exactly_once_while_schedulers_are_killed_in_turn(
    shape: ClusterShape, tenant: str
) -> None:
    with httpx.Client(base_url=shape.base_url + "/api/v1", timeout=20) as ops:
        # an every-second cron is the high_frequency plan's (the shape's default plan allows 5 minutes)
        admin = {"Authorization": "Bearer " + shape.token("ops", role="admin")}
        r = patiently(ops, "PUT", f"/admin/tenants/{tenant}/plan", json={"plan": "high_frequency"}, headers=admin)
        assert r.status_code == 200, r.text
    with api(shape, tenant) as c:
        flow_id = publish(c, ECHO)
        r = patiently(
            c,
            "POST",
            f"/flows/{flow_id}/triggers",
            json={"type": "schedule", "name": "tick", "config": {"cron": "* * * * * *"}},
        )
        assert r.status_code == 201, r.text
        trigger_id = r.json()["id"]
        wait_until(lambda: len(_dues(c, flow_id)) >= 3, timeout=20, what="the schedule to fire")
        kills = []
        for victim in ("scheduler-1", "scheduler-2"):
            shape.kill(victim, signal.SIGKILL)
            killed = datetime.now(UTC)
            kills.append(killed)
            wait_until(
                lambda killed=killed: _fired_through(c, flow_id, killed + 4 * SECOND),  # type: ignore[misc]
                timeout=20,
                what=f"fires after {victim} died",
            )
            shape.start(victim)
            shape.wait_ready(names=[victim], timeout=60)
        back = datetime.now(UTC)
        wait_until(lambda: _fired_through(c, flow_id, back + 2 * SECOND), timeout=20, what="fires after restarts")
        r = patiently(c, "PATCH", f"/triggers/{trigger_id}", json={"enabled": False})
        assert r.status_code == 200, r.text
        # a disabled schedule stops within a second; then every run it started is final
        stopped = datetime.now(UTC) + SECOND
        wait_until(
            lambda: all(f["status"] in FINAL for f in _fires(c, flow_id)) and datetime.now(UTC) > stopped,
            timeout=20,
            what="the last fires to finish",
        )
        fires = _fires(c, flow_id)
    dues = sorted(datetime.fromisoformat(f["input"]["scheduledAt"]) for f in fires)
    assert [d for d, n in Counter(dues).items() if n > 1] == [], "a due time started two runs"
    gaps = [(a, b) for a, b in itertools.pairwise(dues) if b - a != SECOND]
    assert gaps == [], f"due times missing between {dues[0]} and {dues[-1]}: {gaps}"
    assert dues[0] < kills[0] - SECOND and dues[-1] > back, (dues[0], dues[-1])
    assert {f["status"] for f in fires} == {"succeeded"}
    late = {
        datetime.fromisoformat(f["input"]["scheduledAt"]): (
            datetime.fromisoformat(f["input"]["firedAt"]) - datetime.fromisoformat(f["input"]["scheduledAt"])
        ).total_seconds()
        for f in fires
    }
    assert max(late.values()) < MISFIRE_THRESHOLD_S, late
    log.info(
        "scheduler failover: %d due times, each once; lateness max %.2f s, p50 %.3f s",
        len(dues),
        max(late.values()),
        sorted(late.values())[len(late) // 2],
    )
