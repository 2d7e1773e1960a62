"""The runner's statements that join a batch of run ids to ``runs`` are index lookups, whatever the statistics.

Their generic plans (what a prepared statement settles on) are examined on a connection of the
runner's own pool (:func:`repo.open_pool`): neither may scan ``runs`` or ``step_runs`` whole, as a
hash join over a sequential scan did on a young table, for every batch.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from flowmesh.runner import repo
from flowmesh.runtime.service import ServiceRuntime
from flowmesh.runtime.testing import Infra


def nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    """Every node of a JSON plan, depth first."""
    return [plan, *(n for child in plan.get("Plans", []) for n in nodes(child))]


async def generic_plan(conn: Any, sql: str) -> list[dict[str, Any]]:
    """The nodes of the plan a prepared ``sql`` runs with once PostgreSQL settles on a generic one."""
    arity = len((await conn.prepare(sql)).get_parameters())
    await conn.execute(f"PREPARE examined AS {sql}")
    await conn.execute("SET plan_cache_mode = force_generic_plan")
    try:
        found = await conn.fetchval(f"EXPLAIN (FORMAT JSON) EXECUTE examined({', '.join(['NULL'] * arity)})")
    finally:
        await conn.execute("RESET plan_cache_mode")
        await conn.execute("DEALLOCATE examined")
    return nodes(json.loads(found)[0]["Plan"])


@pytest.mark.parametrize("sql", [repo._SAVE_SQL, repo._MARK_PUBLISHED_SQL], ids=["held changes", "published"])
async def test_a_batch_of_runs_is_written_through_index_lookups(
    infra: Infra, service: ServiceRuntime, sql: str
) -> None:
    # ``service``: the runner, started, has migrated its schema
    pool = await repo.open_pool(infra.database_url, size=1)
    try:
        async with pool.acquire() as conn:
            plan = await generic_plan(conn, sql)
    finally:
        await pool.close()
    scanned = {n.get("Relation Name") for n in plan if n["Node Type"] == "Seq Scan"}
    assert not scanned & {"runs", "step_runs"}, plan
    assert any(n["Node Type"] == "Index Scan" and n.get("Relation Name") == "runs" for n in plan), plan
