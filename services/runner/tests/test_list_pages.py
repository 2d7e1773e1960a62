"""Run, step and event pages read their items and their total from one snapshot, while runs advance.

Before, ``GET /runs/{id}/steps`` and ``GET /runs/{id}/events`` read the page and counted in two
statements under READ COMMITTED: a step recorded or an event written between them gave a page
that disagreed with its total (the same flake ``GET /runs`` once had in ``test_quotas``).
"""

from __future__ import annotations

import asyncio
from typing import Any

from flowmesh.contracts.subjects import RunsOp
from flowmesh.contracts.testing import echo, http_step, linear
from flowmesh.runtime.testing import FlowsStandIn
from flowmesh.runtime.testing import RunsClient as Runs
from upstream import Upstream

WRITE_FOR_S = 2.0
HOPS = 6
"""Steps per run, each an HTTP call: a step at a time is recorded, each in its own transaction."""


def _consistent(page: dict[str, Any], *, offset: int, size: int) -> bool:
    """A page agrees with its total: as many items as the total leaves from its offset."""
    expected = max(0, min(size, page["total"] - offset))
    return len(page["items"]) == expected and page["hasMore"] == (offset + len(page["items"]) < page["total"])


async def _start_runs(runs: Runs, flow_id: str, started: list[str], stop: asyncio.Event) -> None:
    """Start runs until told to stop (each advances a step at a time, changing status as it goes)."""
    while not stop.is_set():
        started.append((await runs.start(flow_id)).run.id)
        await asyncio.sleep(0.02)


async def _check_pages(runs: Runs, flow_id: str, run_id: str) -> int:
    """Read every kind of list page once; how many pages were read."""
    call = runs.rpc.call
    pages = 0
    for status in (None, "running", "succeeded"):
        for number, size in ((1, 100), (2, 3)):
            query = {"flowId": flow_id, "status": status, "page": number, "pageSize": size}
            page = await call(RunsOp.LIST, {k: v for k, v in query.items() if v}, tenant=runs.tenant)
            assert _consistent(page, offset=(number - 1) * size, size=size), (status, page)
            pages += 1
    for number, size in ((1, 100), (2, 2)):
        page = await call(RunsOp.STEPS, {"runId": run_id, "page": number, "pageSize": size}, tenant=runs.tenant)
        assert _consistent(page, offset=(number - 1) * size, size=size), page
        pages += 1
    for size in (500, 3):
        page = await call(RunsOp.EVENTS, {"runId": run_id, "pageSize": size}, tenant=runs.tenant)
        assert _consistent(page, offset=0, size=size), page
        pages += 1
    return pages


async def test_run_step_and_event_pages_agree_with_their_total_while_runs_advance(
    runs: Runs, flows: FlowsStandIn, upstream: Upstream
) -> None:
    hops = [http_step(f"h{i}", f"{upstream.base}/sleep/5") for i in range(HOPS)]
    flow_id = flows.publish(runs.tenant, linear(*hops))
    started: list[str] = []
    stop = asyncio.Event()
    writers = [asyncio.create_task(_start_runs(runs, flow_id, started, stop)) for _ in range(2)]
    pages = 0
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WRITE_FOR_S
    try:
        while loop.time() < deadline:
            if started:
                # the newest run is the one whose steps and events are being written now
                pages += await _check_pages(runs, flow_id, started[-1])
            else:
                await asyncio.sleep(0.01)
    finally:
        stop.set()
        await asyncio.gather(*writers)
    assert pages > 10 and len(started) > 5  # the reads really ran among writes
    for run_id in started:
        assert (await runs.wait(run_id)).status == "succeeded"


async def test_a_page_past_the_end_is_empty_and_still_says_the_total(runs: Runs, flows: FlowsStandIn) -> None:
    flow_id = flows.publish(runs.tenant, echo())
    run = await runs.start(flow_id)
    page = await runs.rpc.call(RunsOp.LIST, {"flowId": flow_id, "page": 9, "pageSize": 10}, tenant=runs.tenant)
    assert page["items"] == [] and page["total"] == 1 and page["hasMore"] is False
    await runs.wait(run.run.id)
    steps = await runs.rpc.call(RunsOp.STEPS, {"runId": run.run.id, "page": 9}, tenant=runs.tenant)
    assert steps["items"] == [] and steps["total"] == 2 and steps["hasMore"] is False
