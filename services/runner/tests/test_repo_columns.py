"""The runner's hand-written fast-path SQL writes exactly the columns tables.py declares."""

from __future__ import annotations

from datetime import UTC, datetime

from flowmesh.runner import repo
from flowmesh.runner.engine import RunRecord
from flowmesh.runner.graph import StepState
from flowmesh.runner.tables import run_events, runs, step_runs


def test_a_new_run_row_has_a_value_for_every_column_of_runs_in_order() -> None:
    record = RunRecord(
        id="r",
        tenant_id="t",
        flow_id="f",
        version=1,
        status="queued",
        trigger_type="manual",
        input={},
        created_at=datetime.now(UTC),
    )
    assert tuple(runs.c.keys()) == repo._RUN_COLUMNS
    assert len(repo._run_row(record, {})) == len(runs.c)


def test_step_statements_write_every_column_of_step_runs() -> None:
    assert set(repo._STEP_COLUMNS) == set(step_runs.c.keys())
    # a new run's steps have no lease: nothing executes them before the run is committed
    assert {"run_id", *(c for c, _ in repo._STEP_ARRAYS), "updated_at", "lease_until"} == set(step_runs.c.keys())
    assert len(repo._step_values(StepState(status="running"))) == len(repo._STEP_FIELDS) + 1  # + duration_ms


def test_event_statements_write_every_column_of_run_events() -> None:
    assert set(repo._EVENT_COLUMNS) == set(run_events.c.keys())
    assert {"run_id", *(c for c, _ in repo._EVENT_ARRAYS)} == set(run_events.c.keys())
