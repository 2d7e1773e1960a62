"""The runner's Prometheus metrics: runs and steps as its committed events tell them, consumer lag,
runs in flight.

Steps and runs are counted from the events a change commits (:func:`committed`), not inside the
step-execution code: every way a step ends is there in one place (an attempt on a worker, a pure
step computed inside the transaction that advanced the run, a wait that timed out, a skip), and a
change that rolled back counts nothing. Label children are cached: the run path calls this for every
change, thousands of times a second.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import TYPE_CHECKING, Final

from prometheus_client import Counter, Gauge, Histogram

from flowmesh.contracts.models.run_events import RunQueuedData, StepFailedData, StepSucceededData

if TYPE_CHECKING:
    from flowmesh.runner.engine import NewEvent

STEPS: Final = Counter(
    "flowmesh_runner_steps_total",
    "Step attempts that ended, by step type and outcome (succeeded, failed, retrying, skipped)",
    ["type", "outcome"],
)
STEP_SECONDS: Final = Histogram(
    "flowmesh_runner_step_duration_seconds",
    "Time from a step's start to its end (succeeded or failed for good), by step type",
    ["type"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600),
)
RUNS_STARTED: Final = Counter(
    "flowmesh_runner_runs_started_total",
    "Runs queued (child runs and runs reopened by a retry included), by trigger type",
    ["trigger"],
)
RUNS_FINISHED: Final = Counter("flowmesh_runner_runs_finished_total", "Runs that ended, by outcome", ["outcome"])
RUNS_IN_FLIGHT: Final = Gauge(
    "flowmesh_runner_runs_in_flight",
    "Top-level runs queued or running, every tenant's (what plans limit), as PostgreSQL last counted",
)

STEP_OUTCOMES: Final = {
    "step.succeeded": "succeeded",
    "step.failed": "failed",
    "step.retrying": "retrying",
    "step.skipped": "skipped",
}
RUN_OUTCOMES: Final = {
    "run.succeeded": "succeeded",
    "run.failed": "failed",
    "run.cancelled": "cancelled",
    "run.timedOut": "timedOut",
}


@functools.cache
def _step_counter(step_type: str, outcome: str) -> Counter:
    return STEPS.labels(step_type, outcome)


@functools.cache
def _step_histogram(step_type: str) -> Histogram:
    return STEP_SECONDS.labels(step_type)


@functools.cache
def _run_started(trigger: str) -> Counter:
    return RUNS_STARTED.labels(trigger)


@functools.cache
def _run_finished(outcome: str) -> Counter:
    return RUNS_FINISHED.labels(outcome)


def committed(events: Iterable[NewEvent]) -> None:
    """Count the steps and runs a committed change's events tell of (step types and triggers are
    closed sets: the label values stay bounded)."""
    for e in events:
        if (outcome := STEP_OUTCOMES.get(e.type)) is not None:
            step_type = getattr(e.data, "step_type", None) or "unknown"
            _step_counter(step_type, outcome).inc()
            if isinstance(e.data, StepSucceededData | StepFailedData) and e.data.duration_ms is not None:
                _step_histogram(step_type).observe(e.data.duration_ms / 1000)
        elif (outcome := RUN_OUTCOMES.get(e.type)) is not None:
            _run_finished(outcome).inc()
        elif isinstance(e.data, RunQueuedData):
            _run_started(e.data.trigger_type or "unknown").inc()
