"""A change made from a run held in memory (the next step of a chain, or a step's snapshot) is written
only if no other change of the run came between: the run's revision decides, on PostgreSQL."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any, cast

import asyncpg
import pytest

from flowmesh.contracts.subjects import RunsOp
from flowmesh.contracts.testing import START, definition, edge, http_step, linear, node
from flowmesh.runner import repo
from flowmesh.runner.engine import RunState
from flowmesh.runner.writes import HeldWrites
from flowmesh.runtime.db import create_driver_pool
from flowmesh.runtime.testing import FlowsStandIn, Infra
from flowmesh.runtime.testing import RunsClient as Runs
from upstream import Upstream


@pytest.fixture
async def pool(infra: Infra) -> AsyncIterator[asyncpg.Pool]:
    p = await create_driver_pool(infra.database_url, size=2)
    yield p
    await p.close()


async def held_run(runs: Runs, flows: FlowsStandIn, upstream: Upstream, hold: str) -> str:
    """A run whose second step waits on the upstream until released (its first made it ready here)."""
    flow_id = flows.publish(
        runs.tenant,
        linear(
            http_step("first", upstream.base + "/ok"),
            http_step("call", upstream.base + f"/hold/{hold}"),
            node("after", output="{{ steps.call.output.status }}"),
        ),
    )
    started = await runs.start(flow_id)
    await steps_become(runs, started.run.id, call="running")
    return started.run.id


async def steps_become(runs: Runs, run_id: str, **statuses: str) -> None:
    """Wait (bounded) until the run's steps have these statuses: ``call="running"``."""
    deadline = time.monotonic() + 10
    while True:
        steps = await runs.steps(run_id)
        if all(step in steps and steps[step].status == status for step, status in statuses.items()):
            return
        assert time.monotonic() < deadline, f"steps of run {run_id}: {steps}"
        await asyncio.sleep(0.02)


async def test_a_change_from_a_stale_revision_writes_nothing(
    runs: Runs, flows: FlowsStandIn, upstream: Upstream, pool: asyncpg.Pool
) -> None:
    run_id = await held_run(runs, flows, upstream, hold := f"stale-{runs.tenant}")
    try:
        async with pool.acquire() as conn:
            found = await repo.read_for_change(conn, run_id=run_id)
            assert found is not None
            stale_record, stale_steps = found
            again = await repo.read_for_change(conn, run_id=run_id)
            assert again is not None
            fresh = RunState(again[0], cast(Any, None), again[1], datetime.now(UTC))
            assert await repo.save_change(conn, fresh, {}) == []  # written: one revision more
            assert fresh.run.revision == stale_record.revision + 1

            stale = RunState(stale_record, cast(Any, None), stale_steps, datetime.now(UTC))
            stale.run.status = "succeeded"
            assert await repo.save_change(conn, stale, {}) is None  # another change came first
            now = await repo.read_for_change(conn, run_id=run_id)
            assert now is not None and now[0].status == "running" and now[0].revision == fresh.run.revision
    finally:
        upstream.release(hold)
    assert (await runs.wait(run_id)).status == "succeeded"


async def test_a_result_held_across_another_change_is_applied_to_the_run_as_it_is(
    runs: Runs, flows: FlowsStandIn, upstream: Upstream, caplog: pytest.LogCaptureFixture
) -> None:
    # ``first`` makes two steps ready: ``call`` (executed here, holding the run) and ``ok`` (an approval)
    hold = f"branch-{runs.tenant}"
    flow_id = flows.publish(
        runs.tenant,
        definition(
            http_step("first", upstream.base + "/ok"),
            http_step("call", upstream.base + f"/hold/{hold}"),
            node("ok", "approval"),
            node("after", output="{{ steps.call.output.status }}"),
            edges=[
                edge(START, "first"),
                edge("first", "call"),
                edge("first", "ok"),
                edge("call", "after"),
                edge("ok", "after"),
            ],
        ),
    )
    started = await runs.start(flow_id)
    await steps_become(runs, started.run.id, call="running", ok="waiting")
    with caplog.at_level(logging.WARNING, logger="flowmesh.runner"):
        # a change while ``call`` runs: the run's revision moves on from the one ``call`` holds
        resume = {"runId": started.run.id, "stepId": "ok", "decision": "approved"}
        await runs.rpc.call(RunsOp.RESUME, resume, tenant=runs.tenant)
        upstream.release(hold)
        run = await runs.wait(started.run.id)
    assert run.status == "succeeded" and run.output == 200
    steps = await runs.steps(run.id)
    assert steps["call"].status == "succeeded" and steps["call"].attempt == 1
    events = await runs.events(run.id)
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert sum(e["type"] == "step.succeeded" and e.get("stepId") == "call" for e in events) == 1
    assert not [r for r in caplog.records if "will be re-sent" in r.getMessage()], caplog.text


async def _held_states(conn: asyncpg.Connection, run_id: str, copies: int) -> list[RunState]:
    """``copies`` states of the run as read now (each from its own read, all of one revision)."""
    states = []
    for _ in range(copies):
        found = await repo.read_for_change(conn, run_id=run_id)
        assert found is not None
        states.append(RunState(found[0], cast(Any, None), found[1], datetime.now(UTC)))
    return states


async def test_held_changes_of_many_runs_are_one_statement_each_run_on_its_own_revision(
    runs: Runs, flows: FlowsStandIn, upstream: Upstream, pool: asyncpg.Pool
) -> None:
    holds = [f"batch-{i}-{runs.tenant}" for i in range(3)]
    run_ids = [await held_run(runs, flows, upstream, hold) for hold in holds]
    try:
        async with pool.acquire() as conn:
            first, second, third = [(await _held_states(conn, run_id, 1))[0] for run_id in run_ids]
            [moved_on] = await _held_states(conn, run_ids[2], 1)
            assert await repo.save_change(conn, moved_on, {}) == []  # ``third`` is stale now
        writes = HeldWrites(lambda: pool)
        saved = await asyncio.gather(*(writes.save(state, {}) for state in (first, second, third)))
        assert saved == [[], [], None]
        assert writes.statements == 1
        assert (first.run.revision, second.run.revision) == (moved_on.run.revision, moved_on.run.revision)
        assert third.run.revision == moved_on.run.revision - 1  # not written, not counted
        async with pool.acquire() as conn:
            for state in (first, second):
                now = await repo.read_for_change(conn, run_id=state.run.id)
                assert now is not None and now[0].revision == state.run.revision

            # two changes of one run never share a statement: the second waits, then finds its
            # revision gone (the first counted it up) and writes nothing
            one, two = await _held_states(conn, run_ids[0], 2)
        statements = writes.statements
        assert await asyncio.gather(writes.save(one, {}), writes.save(two, {})) == [[], None]
        assert writes.statements == statements + 2
    finally:
        for hold in holds:
            upstream.release(hold)
    for run_id in run_ids:
        assert (await runs.wait(run_id)).status == "succeeded"


async def test_recording_published_events_skips_a_run_being_written_and_never_waits_for_it(
    runs: Runs, flows: FlowsStandIn, upstream: Upstream, pool: asyncpg.Pool
) -> None:
    """``mark_published`` and a batch of held changes both write many runs' rows: when the first waited
    for the second's locks they deadlocked, stalling both for PostgreSQL's ``deadlock_timeout``."""
    holds = [f"published-{i}-{runs.tenant}" for i in range(2)]
    busy, free = [await held_run(runs, flows, upstream, hold) for hold in holds]
    try:
        async with pool.acquire() as writer, pool.acquire() as flusher:
            at = {r: await all_published(flusher, r) for r in (busy, free)}
            # as if each run's last event were not recorded as published yet
            await flusher.execute(
                "UPDATE runner.runs SET published_seq = published_seq - 1 WHERE id = ANY($1::uuid[])", [busy, free]
            )
            spans = {r: (at[r], at[r]) for r in (busy, free)}
            async with writer.transaction():
                await writer.execute("SELECT 1 FROM runner.runs WHERE id = $1 FOR UPDATE", busy)  # a change writing
                now_at = await asyncio.wait_for(repo.mark_published(flusher, spans=spans), 5)
            assert now_at == {busy: at[busy] - 1, free: at[free]}  # skipped, not waited for
            assert await repo.mark_published(flusher, spans=spans) == at  # the next flush records it
    finally:
        for hold in holds:
            upstream.release(hold)
    for run_id in (busy, free):
        assert (await runs.wait(run_id)).status == "succeeded"


async def all_published(conn: asyncpg.Connection, run_id: str) -> int:
    """The run's last event seq, once the runner has recorded every event as published (bounded wait)."""
    deadline = time.monotonic() + 10
    while True:
        row = await conn.fetchrow("SELECT published_seq, last_seq FROM runner.runs WHERE id = $1", run_id)
        if row["published_seq"] == row["last_seq"]:
            return int(row["last_seq"])
        assert time.monotonic() < deadline, f"run {run_id}: {dict(row)}"
        await asyncio.sleep(0.02)
