"""The scheduler's durable timers over ``fm.rpc.scheduler.timers.*``, in-process: each fires once on
``fm.timers.fired.<owner>``, at or after its due time, unless moved or cancelled."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from flowmesh.contracts.errors import InvalidInput
from flowmesh.contracts.ids import format_time, utcnow
from flowmesh.contracts.models.timers import timer_msg_id
from flowmesh.contracts.subjects import SchedulerOp, timer_fired
from flowmesh.runtime.rpc import RpcClient

TimerRecorder = Any  # the fixture of conftest.py


async def set_timer(rpc: RpcClient, key: str, due: datetime, **payload: object) -> None:
    body = {"owner": "tests", "key": key, "dueAt": format_time(due), "payload": payload}
    await rpc.call(SchedulerOp.TIMER_SET, body, tenant="")


async def test_a_timer_fires_once_at_or_after_its_due_time(rpc: RpcClient, recorder: TimerRecorder) -> None:
    key = uuid.uuid4().hex
    due = utcnow() + timedelta(milliseconds=800)
    await set_timer(rpc, key, due, runId="r1", step="wait")
    await recorder.wait(lambda: len(recorder.timers(key)) >= 1)
    await asyncio.sleep(0.5)
    [fired] = recorder.timers(key)
    due = datetime.fromisoformat(format_time(due))
    assert fired.subject == timer_fired("tests")
    assert fired.msg_id == timer_msg_id("tests", key, format_time(due))
    assert fired.body["payload"] == {"runId": "r1", "step": "wait"}
    assert datetime.fromisoformat(fired.body["firedAt"]) >= due
    assert due.timestamp() <= fired.at < due.timestamp() + 0.3
    # a fired timer is forgotten: cancelling it now cancels nothing
    reply = await rpc.call(SchedulerOp.TIMER_CANCEL, {"owner": "tests", "key": key}, tenant="")
    assert reply == {"cancelled": False}


async def test_setting_a_timer_again_moves_it(rpc: RpcClient, recorder: TimerRecorder) -> None:
    key = uuid.uuid4().hex
    first = utcnow() + timedelta(milliseconds=300)
    await set_timer(rpc, key, first, n=1)
    moved = utcnow() + timedelta(milliseconds=1500)
    await set_timer(rpc, key, moved, n=2)
    await recorder.wait(lambda: len(recorder.timers(key)) >= 1)
    await asyncio.sleep(0.4)
    [fired] = recorder.timers(key)
    assert fired.body["payload"] == {"n": 2}
    assert fired.at >= moved.timestamp() - 0.001


async def test_a_cancelled_timer_never_fires(rpc: RpcClient, recorder: TimerRecorder) -> None:
    key = uuid.uuid4().hex
    await set_timer(rpc, key, utcnow() + timedelta(milliseconds=400))
    reply = await rpc.call(SchedulerOp.TIMER_CANCEL, {"owner": "tests", "key": key}, tenant="")
    assert reply == {"cancelled": True}
    await asyncio.sleep(1.2)
    assert recorder.timers(key) == []


async def test_a_timer_already_due_fires_at_once(rpc: RpcClient, recorder: TimerRecorder) -> None:
    key = uuid.uuid4().hex
    started = time.time()
    await set_timer(rpc, key, datetime.now(UTC) - timedelta(seconds=30))
    await recorder.wait(lambda: len(recorder.timers(key)) >= 1, timeout=2)
    assert recorder.timers(key)[0].at - started < 0.3


async def test_many_timers_due_together_each_fire_once(rpc: RpcClient, recorder: TimerRecorder) -> None:
    prefix = uuid.uuid4().hex[:8]
    due = utcnow() + timedelta(seconds=1)
    await asyncio.gather(*(set_timer(rpc, f"{prefix}-{i}", due, i=i) for i in range(300)))
    await recorder.wait(lambda: sum(s.body.get("key", "").startswith(prefix) for s in recorder.seen) >= 300)
    await asyncio.sleep(0.3)
    keys = Counter(s.body["key"] for s in recorder.seen if s.body.get("key", "").startswith(prefix))
    assert len(keys) == 300 and set(keys.values()) == {1}


async def test_a_malformed_timer_is_refused(rpc: RpcClient) -> None:
    with pytest.raises(InvalidInput):
        await rpc.call(SchedulerOp.TIMER_SET, {"owner": "no.dots", "key": "k", "dueAt": "soon"}, tenant="")
