"""The TTL cache: values expire, misses are loaded once for every concurrent caller, failures are not kept."""

from __future__ import annotations

import asyncio

import pytest

from flowmesh.runtime.cache import TtlCache


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_a_value_is_kept_for_its_time_to_live_then_loaded_again() -> None:
    clock = Clock()
    cache: TtlCache[str, int] = TtlCache(10, clock=clock)
    loads = 0

    async def load() -> int:
        nonlocal loads
        loads += 1
        return loads

    assert await cache.get("a", load) == 1
    clock.now += 9.9
    assert await cache.get("a", load) == 1
    clock.now += 0.1
    assert await cache.get("a", load) == 2
    cache.discard("a")
    assert cache.lookup("a") == (False, None)
    assert await cache.get("a", load) == 3


async def test_concurrent_misses_of_one_key_are_loaded_once() -> None:
    cache: TtlCache[str, str] = TtlCache(10)
    gate = asyncio.Event()
    calls = 0

    async def load() -> str:
        nonlocal calls
        calls += 1
        await gate.wait()
        return "v"

    waiting = [asyncio.create_task(cache.get("k", load)) for _ in range(20)]
    await asyncio.sleep(0)
    gate.set()
    assert await asyncio.gather(*waiting) == ["v"] * 20
    assert calls == 1


async def test_a_failed_load_is_raised_to_every_waiter_and_not_kept() -> None:
    cache: TtlCache[str, str] = TtlCache(10)

    async def fail() -> str:
        await asyncio.sleep(0)
        raise RuntimeError("down")

    results = await asyncio.gather(cache.get("k", fail), cache.get("k", fail), return_exceptions=True)
    assert all(isinstance(r, RuntimeError) for r in results)

    async def ok() -> str:
        return "up"

    assert await cache.get("k", ok) == "up"


async def test_a_cancelled_caller_does_not_cancel_the_load_others_wait_for() -> None:
    cache: TtlCache[str, str] = TtlCache(10)
    gate = asyncio.Event()

    async def load() -> str:
        await gate.wait()
        return "v"

    first = asyncio.create_task(cache.get("k", load))
    second = asyncio.create_task(cache.get("k", load))
    await asyncio.sleep(0)
    first.cancel()
    gate.set()
    assert await second == "v"
    with pytest.raises(asyncio.CancelledError):
        await first


def test_ttl_of_sets_each_values_life_and_maxsize_forgets_the_oldest() -> None:
    clock = Clock()
    cache: TtlCache[str, int | None] = TtlCache(30, ttl_of=lambda v: 30 if v is not None else 5, maxsize=2, clock=clock)
    cache.put("known", 1)
    cache.put("unknown", None)
    clock.now += 6
    assert cache.lookup("known") == (True, 1)
    assert cache.lookup("unknown") == (False, None)
    cache.put("b", 2)
    cache.put("c", 3)
    assert cache.lookup("known") == (False, None) and len(cache) == 2
    zero: TtlCache[str, int] = TtlCache(0)
    zero.put("x", 1)
    assert zero.lookup("x") == (False, None)
