"""Replies of ``fm.rpc.runs.*`` stay within one NATS message whatever a run holds (P9 finding 3).

A run copying a 600 KB input holds over 1 MB between its input, its output and its steps: every
read of it used to be a reply over ``max_payload``, dropped. Now its largest values are left out
(an ``$omitted`` marker) and a marker's ``fetch`` names a read that returns the value whole.
"""

from __future__ import annotations

from typing import Any

import orjson

from flowmesh.contracts.subjects import RunsOp
from flowmesh.contracts.testing import echo
from flowmesh.runtime.sizes import OMITTED, is_omitted
from flowmesh.runtime.testing import FlowsStandIn
from flowmesh.runtime.testing import RunsClient as Runs

KB = 1024


async def _call(runs: Runs, op: str, body: dict[str, Any]) -> Any:
    return await runs.rpc.call(op, body, tenant=runs.tenant)


async def test_every_read_of_a_huge_run_answers_within_the_reply_budget(runs: Runs, flows: FlowsStandIn) -> None:
    flow_id = flows.publish(runs.tenant, echo())
    big = {"blob": "w" * (600 * KB)}
    run = await runs.wait((await runs.start(flow_id, big)).run.id)
    assert run.status == "succeeded"
    limit = runs.rpc.broker.connection.max_payload
    one = await _call(runs, RunsOp.LIST, {"pageSize": 1})
    got = await _call(runs, RunsOp.GET, {"runId": run.id})
    assert got["status"] == "succeeded" and [is_omitted(got[k]) for k in ("input", "output")] == [True, False]
    assert one["items"] == [got] and len(orjson.dumps(one)) < limit
    page = await _call(runs, RunsOp.STEPS, {"runId": run.id})
    assert len(page["items"]) == 2 and len(orjson.dumps(page)) < limit
    for i, step in enumerate(page["items"], start=1):
        for key in ("input", "output"):
            if is_omitted(step[key]):
                fetch = step[key][OMITTED]["fetch"]
                assert fetch == f"/api/v1/runs/{run.id}/steps?page={i}&pageSize=1"
                alone = await _call(runs, RunsOp.STEPS, {"runId": run.id, "page": i, "pageSize": 1})
                assert alone["items"][0][key] == big, (key, str(alone["items"][0])[:300])
    snap = await _call(runs, RunsOp.SNAPSHOT, {"runId": run.id})
    assert snap["run"]["id"] == run.id and set(snap["steps"]) == {"start", "echo"}
