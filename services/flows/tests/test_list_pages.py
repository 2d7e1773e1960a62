"""List pages read their items and their total from one snapshot, whatever is written meanwhile."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from flowmesh.contracts.subjects import FlowsOp
from flowmesh.runtime.rpc import RpcClient

WRITE_FOR_S = 2.0


def _consistent(page: dict[str, Any], *, offset: int, size: int) -> bool:
    """A page agrees with its total: as many items as the total leaves from its offset."""
    expected = max(0, min(size, page["total"] - offset))
    return len(page["items"]) == expected and page["hasMore"] == (offset + len(page["items"]) < page["total"])


async def _churn(rpc: RpcClient, tenant: str, stop: asyncio.Event) -> int:
    """Create flows and delete every other one until told to stop; how many writes were made."""
    writes = 0
    while not stop.is_set():
        flow = await rpc.call(FlowsOp.CREATE, {"name": f"f{writes}"}, tenant=tenant)
        writes += 1
        if writes % 2 == 0:
            await rpc.call(FlowsOp.DELETE, {"flowId": flow["id"]}, tenant=tenant)
            writes += 1
    return writes


async def test_flow_pages_agree_with_their_total_under_concurrent_creates_and_deletes(rpc: RpcClient) -> None:
    tenant = f"t-{uuid.uuid4().hex[:12]}"
    for i in range(4):
        await rpc.call(FlowsOp.CREATE, {"name": f"seed{i}"}, tenant=tenant)
    stop = asyncio.Event()
    writers = [asyncio.create_task(_churn(rpc, tenant, stop)) for _ in range(4)]
    pages = 0
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WRITE_FOR_S
    try:
        while loop.time() < deadline:
            # the whole list in one page is the sharpest check: any write between reading the
            # items and counting them shows as a total that is not the number of items
            for number, size in ((1, 100), (1, 100), (2, 3), (3, 5), (50, 3)):
                page = await rpc.call(FlowsOp.LIST, {"page": number, "pageSize": size}, tenant=tenant)
                assert _consistent(page, offset=(number - 1) * size, size=size), page
                pages += 1
    finally:
        stop.set()
        writes = sum(await asyncio.gather(*writers))
    assert pages > 10 and writes > 10  # the reads really ran among writes


async def test_a_page_past_the_end_is_empty_and_still_says_the_total(rpc: RpcClient) -> None:
    tenant = f"t-{uuid.uuid4().hex[:12]}"
    flow = await rpc.call(FlowsOp.CREATE, {"name": "only"}, tenant=tenant)
    page = await rpc.call(FlowsOp.LIST, {"page": 9, "pageSize": 10}, tenant=tenant)
    assert page["items"] == [] and page["total"] == 1 and page["hasMore"] is False
    versions = await rpc.call(FlowsOp.VERSIONS, {"flowId": flow["id"], "page": 2}, tenant=tenant)
    assert versions["items"] == [] and versions["total"] == 0
