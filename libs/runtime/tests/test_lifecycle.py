"""Resources, periodic and background work of a service: started in order, stopped in reverse."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from flowmesh.runtime.lifecycle import periodic
from flowmesh.runtime.service import ServiceRuntime
from flowmesh.runtime.settings import BaseServiceSettings


def _service(infra: Any) -> ServiceRuntime:
    settings = BaseServiceSettings(
        env="test", nats_url=infra.nats_url, shared_database_url=infra.database_url, health_port=0
    )
    return ServiceRuntime(f"svc{uuid.uuid4().hex[:8]}", settings, migrations=None)


async def test_resources_are_entered_in_order_and_left_in_reverse_with_the_hooks(infra: Any) -> None:
    service = _service(infra)
    seen: list[str] = []

    def named(name: str) -> Any:
        @contextlib.asynccontextmanager
        async def resource() -> AsyncIterator[None]:
            seen.append(f"enter {name}")
            yield
            seen.append(f"exit {name}")

        return resource

    async def hook() -> None:
        seen.append("start hook")

    service.resource(named("a"))
    service.on_start(hook)
    service.resource(named("b"))
    ticks = asyncio.Event()
    service.every(0.01, lambda: asyncio.sleep(0, ticks.set()), name="tick")
    ran = asyncio.Event()
    service.background(lambda: asyncio.sleep(0, ran.set()), name="once")
    async with service.running(health=False):
        assert seen == ["enter a", "start hook", "enter b"]
        await asyncio.wait_for(ticks.wait(), 2)
        await asyncio.wait_for(ran.wait(), 2)
    assert seen[3:] == ["exit b", "exit a"]


async def test_a_resource_that_fails_to_start_leaves_the_ones_before_it_stopped(infra: Any) -> None:
    service = _service(infra)
    left: list[str] = []

    @service.resource
    @contextlib.asynccontextmanager
    async def first() -> AsyncIterator[None]:
        yield
        left.append("first")

    @service.resource
    @contextlib.asynccontextmanager
    async def broken() -> AsyncIterator[None]:
        raise RuntimeError("cannot start")
        yield

    with pytest.raises(Exception, match="cannot start"):
        async with service.running(health=False):
            pass
    assert left == ["first"]


async def test_a_periodic_job_keeps_going_after_a_failure() -> None:
    calls = 0

    async def flaky() -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("database away")

    async with periodic(0.01, flaky, name="flaky"):
        for _ in range(200):
            if calls >= 3:
                break
            await asyncio.sleep(0.01)
    assert calls >= 3
