"""The durable-consumer idiom against a real JetStream: ack on success, redelivery, termination, batches."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import nats
import pytest
from nats.js.api import ConsumerInfo

from flowmesh.contracts.models.base import WireModel
from flowmesh.contracts.streams import EVENTS, ConsumerSpec
from flowmesh.runtime.consumers import Delivery, PullOptions, Redeliver, consumer_config
from flowmesh.runtime.service import ServiceRuntime
from flowmesh.runtime.settings import BaseServiceSettings


class Ping(WireModel):
    """A test message."""

    n: int


@dataclass
class Seen:
    """What the handlers saw."""

    bodies: list[int] = field(default_factory=list)
    attempts: dict[int, int] = field(default_factory=dict)
    malformed: list[int] = field(default_factory=list)
    batches: list[list[str]] = field(default_factory=list)


async def each_handler(ping: Ping, msg: Delivery, seen: Seen) -> None:
    seen.attempts[ping.n] = msg.delivered
    if ping.n == 2 and msg.delivered == 1:
        raise RuntimeError("a transient failure")
    if ping.n == 3 and msg.delivered == 1:
        raise Redeliver(0.05)
    seen.bodies.append(ping.n)


async def on_malformed(msg: Delivery, seen: Seen) -> None:
    seen.malformed.append(msg.seq)


async def batch_handler(batch: list[Delivery], seen: Seen) -> None:
    seen.batches.append([m.data.decode() for m in batch])
    if len(seen.batches) == 1:
        raise RuntimeError("the database is away")


@pytest.fixture
async def setup(infra: Any) -> AsyncIterator[tuple[ServiceRuntime, str, nats.NATS]]:
    settings = BaseServiceSettings(
        env="test", nats_url=infra.nats_url, shared_database_url=infra.database_url, health_port=0
    )
    service = ServiceRuntime(f"svc{uuid.uuid4().hex[:8]}", settings, migrations=None)
    nc = await nats.connect(infra.nats_url)
    yield service, f"fm.events.t{uuid.uuid4().hex[:8]}", nc
    await nc.close()


async def _until(done: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not done():
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(0.02)


async def _info(nc: nats.NATS, spec: ConsumerSpec) -> ConsumerInfo:
    return await nc.jetstream().consumer_info(spec.stream, spec.durable)


async def test_each_acks_handled_messages_redelivers_failures_and_terminates_unreadable_ones(
    setup: tuple[ServiceRuntime, str, nats.NATS],
) -> None:
    service, prefix, nc = setup
    spec = ConsumerSpec(EVENTS.name, f"test-{uuid.uuid4().hex[:8]}")
    seen = Seen()
    service.consumers.each(
        spec, each_handler, seen, workers=2, options=PullOptions(filters=(f"{prefix}.>",)), malformed=on_malformed
    )
    async with service.running(health=False):
        js = nc.jetstream()
        for n in (1, 2, 3):
            await js.publish(f"{prefix}.ping", Ping(n=n).model_dump_json().encode())
        bad = await js.publish(f"{prefix}.ping", b"not json")
        await js.publish(f"{prefix}.ping", b'{"n": "not a number"}')
        await _until(lambda: sorted(seen.bodies) == [1, 2, 3] and len(seen.malformed) == 2)
        await asyncio.sleep(0.3)
        info = await _info(nc, spec)
        assert info.num_ack_pending == 0 and info.num_pending == 0
        assert seen.attempts == {1: 1, 2: 2, 3: 2}
        assert seen.malformed[0] == bad.seq  # unreadable: terminated once, never redelivered
        assert info.num_redelivered == 0


async def test_a_failed_batch_comes_back_whole_and_is_acked_once_handled(
    setup: tuple[ServiceRuntime, str, nats.NATS],
) -> None:
    service, prefix, nc = setup
    spec = ConsumerSpec(EVENTS.name, f"test-{uuid.uuid4().hex[:8]}")
    seen = Seen()
    service.consumers.batches(
        spec, batch_handler, seen, window_s=0.2, options=PullOptions(filters=(f"{prefix}.>",), batch=10)
    )
    async with service.running(health=False):
        js = nc.jetstream()
        await asyncio.gather(*(js.publish(f"{prefix}.e", str(i).encode()) for i in range(3)))
        await _until(lambda: sum(len(b) for b in seen.batches[1:]) >= 3)
        await _until(lambda: len(seen.batches) >= 2)
        info = await _info(nc, spec)
        assert info.num_ack_pending == 0
    assert sorted(seen.batches[0]) == ["0", "1", "2"]
    assert sorted(x for b in seen.batches[1:] for x in b) == ["0", "1", "2"]


def test_a_consumer_takes_its_streams_subjects_unless_filtered() -> None:
    spec = ConsumerSpec(EVENTS.name, "d")
    assert consumer_config(spec, PullOptions()).filter_subject == EVENTS.subjects[0]
    several = consumer_config(spec, PullOptions(filters=("a", "b"), ack_wait_s=5, deliver_new=True))
    assert several.filter_subjects == ["a", "b"] and several.ack_wait == 5
    assert several.deliver_policy is not None and several.deliver_policy.value == "new"
