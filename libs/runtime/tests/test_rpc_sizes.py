"""A reply that cannot be sent becomes an error answer to the caller, promptly, never a timeout; and
``sizes.fit`` keeps a reply within a budget by leaving its largest values out."""

from __future__ import annotations

import time
from typing import Any

import pytest

from flowmesh.contracts.errors import ReplyTooLarge
from flowmesh.runtime.rpc import RpcContext
from flowmesh.runtime.sizes import OMITTED, Slot, encoded_size, fit, is_omitted
from flowmesh.runtime.testing import Infra, responder, rpc_client


async def _huge(ctx: RpcContext, body: Any) -> dict[str, Any]:
    return {"blob": "x" * (int(body["bytes"]))}


async def test_a_reply_over_max_payload_is_answered_as_reply_too_large(infra: Infra) -> None:
    handlers = {"fm.rpc.sizes.huge": _huge}
    async with responder(infra.nats_url, "sizes", handlers), rpc_client(infra.nats_url, timeout=5.0) as client:
        limit = client.broker.connection.max_payload
        started = time.monotonic()
        with pytest.raises(ReplyTooLarge, match="over the messaging limit"):
            await client.call("fm.rpc.sizes.huge", {"bytes": limit + 10}, tenant="t1")
        assert time.monotonic() - started < 2.0, "an error answer, not the caller's timeout"


async def test_a_reply_just_under_max_payload_is_sent_and_the_server_keeps_serving(infra: Infra) -> None:
    handlers = {"fm.rpc.sizes.huge": _huge}
    async with responder(infra.nats_url, "sizes", handlers), rpc_client(infra.nats_url, timeout=5.0) as client:
        limit = client.broker.connection.max_payload
        data = await client.call("fm.rpc.sizes.huge", {"bytes": limit - 100}, tenant="t1")
        assert len(data["blob"]) == limit - 100
        with pytest.raises(ReplyTooLarge):
            await client.call("fm.rpc.sizes.huge", {"bytes": limit - 10}, tenant="t1")  # over once enveloped
        data = await client.call("fm.rpc.sizes.huge", {"bytes": 3}, tenant="t1")
        assert data == {"blob": "xxx"}


def test_fit_leaves_out_the_largest_values_first_until_the_reply_fits() -> None:
    items = [{"id": i, "input": "i" * size, "output": "o" * 10} for i, size in enumerate((100, 5000, 3000))]
    reply = {"items": items}
    slots = [Slot(item, key, f"/x/{item['id']}") for item in items for key in ("input", "output")]
    total = fit(reply, slots, 4000)
    assert total == encoded_size(reply) <= 4000
    assert is_omitted(items[1]["input"]) and items[1]["input"][OMITTED] == {
        "reason": "too-large",
        "bytes": 5002,
        "fetch": "/x/1",
    }
    assert items[2]["input"] == "i" * 3000 and items[0]["input"] == "i" * 100, "only as much as needed is left out"


def test_fit_leaves_a_reply_within_budget_untouched_and_says_when_it_cannot_help() -> None:
    reply = {"input": "x" * 10, "output": None, "meta": "m" * 100}
    assert fit(reply, [Slot(reply, "input"), Slot(reply, "output")], 1000) == encoded_size(reply)
    assert reply["input"] == "x" * 10
    assert fit(reply, [Slot(reply, "input"), Slot(reply, "output")], 50) > 50  # meta is not ours to drop
    assert is_omitted(reply["input"]) and reply["output"] is None and "fetch" not in reply["input"][OMITTED]
