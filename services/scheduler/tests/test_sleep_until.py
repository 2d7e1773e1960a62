"""A fire waits for its due time on the wall clock, whichever event loop the service runs."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import uvloop

from flowmesh.scheduler.dispatcher import sleep_until

LOOPS: dict[str, Callable[[Coroutine[Any, Any, list[float]]], list[float]]] = {
    "uvloop": uvloop.run,
    "asyncio": asyncio.run,
}


async def _lateness_ms(targets_us: list[int]) -> list[float]:
    late = []
    for us in targets_us:
        at = datetime.now(UTC) + timedelta(microseconds=us)
        await sleep_until(at)
        late.append((datetime.now(UTC) - at).total_seconds() * 1000)
    return late


@pytest.mark.parametrize("loop", LOOPS, ids=list(LOOPS))
def test_a_due_time_under_a_millisecond_away_is_never_returned_early(loop: str) -> None:
    # uvloop rounds a timer down to whole milliseconds: sub-millisecond sleeps returned at once, and
    # a bounded loop of them gave up before the due time (a timer fired up to 0.3 ms early)
    late = LOOPS[loop](_lateness_ms([50 + (i * 37) % 2500 for i in range(200)]))
    assert min(late) >= 0
    assert max(late) < 50  # and not much after it (a busy machine may add a little)


def test_a_due_time_past_returns_at_once() -> None:
    assert asyncio.run(_lateness_ms([-5_000]))[0] < 50
