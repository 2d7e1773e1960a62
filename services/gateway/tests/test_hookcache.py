"""The webhook lookup cache: kept a while, one question per token, dropped when its flow changes."""

from __future__ import annotations

import asyncio

import pytest

from flowmesh.contracts.errors import NotFound
from flowmesh.gateway.hookcache import HookCache
from flowmesh.gateway.webhooks import Hook


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def hook(flow_id: str = "f1", trigger_id: str = "t1") -> Hook:
    return Hook(
        trigger_id=trigger_id,
        flow_id=flow_id,
        tenant_id="acme",
        enabled=True,
        flow_active=True,
        published=True,
        signed=False,
        keys=(),
    )


class FlowsService:
    """Answers lookups and counts them; ``gate`` holds answers until it is set."""

    def __init__(self) -> None:
        self.asked = 0
        self.gate = asyncio.Event()
        self.gate.set()
        self.answer = hook()

    async def ask(self) -> Hook:
        self.asked += 1
        await self.gate.wait()
        return self.answer


async def test_a_lookup_is_kept_for_its_time_to_live() -> None:
    clock, flows = Clock(), FlowsService()
    cache = HookCache(ttl_s=2.0, clock=clock)
    assert await cache.get("tok", flows.ask) == flows.answer
    clock.now += 1.9
    await cache.get("tok", flows.ask)
    assert flows.asked == 1
    clock.now += 0.1
    await cache.get("tok", flows.ask)
    assert flows.asked == 2


async def test_concurrent_deliveries_ask_once() -> None:
    flows = FlowsService()
    flows.gate.clear()
    cache = HookCache(ttl_s=2.0)
    waiting = [asyncio.create_task(cache.get("tok", flows.ask)) for _ in range(5)]
    await asyncio.sleep(0)
    flows.gate.set()
    assert {id(h) for h in await asyncio.gather(*waiting)} == {id(flows.answer)}
    assert flows.asked == 1


async def test_a_changed_flow_is_looked_up_again_and_others_are_kept() -> None:
    flows = FlowsService()
    cache = HookCache(ttl_s=60.0)
    await cache.get("tok", flows.ask)
    cache.forget_flow("another flow")
    await cache.get("tok", flows.ask)
    assert flows.asked == 1
    cache.forget_flow("f1")
    await cache.get("tok", flows.ask)
    assert flows.asked == 2


async def test_a_lookup_that_raced_a_change_is_answered_but_not_kept() -> None:
    flows = FlowsService()
    flows.gate.clear()
    cache = HookCache(ttl_s=60.0)
    pending = asyncio.create_task(cache.get("tok", flows.ask))
    await asyncio.sleep(0)
    cache.forget_flow("f9")  # announced while the lookup was in flight: its answer may be stale
    flows.gate.set()
    assert await pending == flows.answer
    assert len(cache) == 0
    await cache.get("tok", flows.ask)
    assert flows.asked == 2 and len(cache) == 1


async def test_a_failed_lookup_is_not_kept() -> None:
    cache = HookCache(ttl_s=60.0)

    async def unknown() -> Hook:
        raise NotFound("no webhook has this URL")

    with pytest.raises(NotFound):
        await cache.get("tok", unknown)
    assert len(cache) == 0


async def test_the_cache_is_bounded() -> None:
    cache = HookCache(ttl_s=60.0, max_entries=3)
    for i in range(10):

        async def ask(i: int = i) -> Hook:
            return hook(flow_id=f"f{i}", trigger_id=f"t{i}")

        await cache.get(f"tok{i}", ask)
        assert len(cache) <= 3 and len(cache._flow_of) <= 4
    cache.forget_flow("f9")
    assert len(cache) == 2
