"""A reply that cannot be sent becomes an error answer to the caller, promptly, never a timeout."""

from __future__ import annotations

import time
from typing import Any

import pytest

from flowmesh.contracts.errors import ReplyTooLarge
from flowmesh.runtime.rpc import RpcContext
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
