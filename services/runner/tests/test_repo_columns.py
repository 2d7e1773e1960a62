"""The runner's hand-written SQL writes exactly the columns its migrations make, with their types."""

from __future__ import annotations

from datetime import UTC, datetime

import asyncpg
import pytest

from flowmesh.contracts.testing import chain
from flowmesh.runner import repo
from flowmesh.runner.engine import RunRecord, RunState
from flowmesh.runner.graph import Graph, StepState
from flowmesh.runtime.db import dsn
from flowmesh.runtime.service import ServiceRuntime
from flowmesh.runtime.testing import Infra


async def migrated(infra: Infra, table: str) -> dict[str, str]:
    """The columns of a table of the migrated ``runner`` schema, with their PostgreSQL types."""
    conn = await asyncpg.connect(dsn(infra.database_url))
    try:
        rows = await conn.fetch(
            "SELECT column_name, data_type FROM information_schema.columns "
            "WHERE table_schema = 'runner' AND table_name = $1 ORDER BY ordinal_position",
            table,
        )
    finally:
        await conn.close()
    return {r["column_name"]: r["data_type"] for r in rows}


@pytest.mark.parametrize(
    ("table", "declared"),
    [("runs", repo._RUNS), ("step_runs", repo._STEP_RUNS), ("run_events", repo._RUN_EVENTS)],
    ids=["runs", "step_runs", "run_events"],
)
async def test_the_declared_columns_are_the_migrated_ones(
    infra: Infra, service: ServiceRuntime, table: str, declared: dict[str, str]
) -> None:
    # ``service``: the runner, started, has migrated its schema
    assert declared == await migrated(infra, table)


def record() -> RunRecord:
    return RunRecord(
        id="r",
        tenant_id="t",
        flow_id="f",
        version=1,
        status="queued",
        trigger_type="manual",
        input={},
        created_at=datetime.now(UTC),
    )


def test_a_new_run_row_has_a_value_for_every_column_of_runs_in_order() -> None:
    assert tuple(repo._RUNS) == repo._RUN_COLUMNS
    assert len(repo._run_row(record(), {})) == len(repo._RUNS)


def test_step_statements_write_every_column_of_step_runs() -> None:
    assert {"run_id", *(c for c, _ in repo._STEP_RECORD), "updated_at"} == set(repo._STEP_RUNS)
    assert {*(c for c, _ in repo._BATCH_STEP_RECORD), "updated_at"} == set(repo._STEP_RUNS)
    # a step's row carries every column of its record: a key missing would be written NULL
    state = RunState(record(), Graph(chain(1)), {"s0": StepState(status="running")}, datetime.now(UTC))
    assert set(repo._step_record(state, "s0", {}, run_id="r")) == {c for c, _ in repo._BATCH_STEP_RECORD}
    assert set(repo._step_record(state, "s0", {})) == {c for c, _ in repo._STEP_RECORD}


def test_event_statements_write_every_column_of_run_events() -> None:
    assert {"run_id", *(c for c, _ in repo._EVENT_RECORD)} == set(repo._RUN_EVENTS)
    assert {c for c, _ in repo._BATCH_EVENT_RECORD} == set(repo._RUN_EVENTS)
    state = RunState(record(), Graph(chain(1)), {}, datetime.now(UTC))
    state.queue()
    assert [set(row) for row in repo._event_rows(state.run, state)] == [set(repo._RUN_EVENTS)]
