"""A shared durable pull consumer read in batches, on nats-py directly.

FastStream's batch pull loop (0.7) catches ``nats.errors.TimeoutError`` only, while nats-py's
``fetch`` also raises a plain ``asyncio.TimeoutError`` when a partial batch runs out of time: the
loop's task then dies with the messages it had fetched, and the supervisor restarts it, so they
come back only after ``ack_wait``. Metering wants exactly the partial batches that path drops, so
it reads the stream itself: wait for a first message, then collect more for a short window.

The consumer has a NATS connection of its own. Draining a connection waits until every message a
subscription has queued was processed, and a pull subscription may hold a late status message
that nobody will read: on the service's shared connection that held up every stop by the full
drain timeout. Its own connection is closed (not drained) once the loop has stopped; anything it
had not acknowledged comes back after ``ack_wait``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Final

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from flowmesh.runtime.settings import NatsLogin

log = logging.getLogger(__name__)

IDLE_WAIT_S: Final = 5.0
"""How long one pull request waits for a first message (then another is sent)."""
MIN_FETCH_S: Final = 0.01
RETRY_S: Final = 1.0

Handler = Callable[[list[Msg]], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class BatchSpec:
    """Where a batch consumer reads and how much it takes at once."""

    stream: str
    filters: tuple[str, ...]
    """The subjects it takes (NATS server 2.10+ filters a consumer by several)."""
    durable: str
    batch: int
    window_s: float
    """After the first message of a batch, how long more are collected."""
    ack_wait_s: float
    max_ack_pending: int


class BatchConsumer:
    """Hands batches of messages of a shared durable consumer to ``handle``, one batch at a time.

    ``handle`` acknowledges (or not) what it was given; whatever it leaves unacknowledged comes back
    after ``ack_wait``. A failing pull (NATS restarting, the consumer gone) is retried, binding the
    consumer again.
    """

    def __init__(self, spec: BatchSpec, handle: Handler) -> None:
        self.spec = spec
        self.handle = handle
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._nc: Client | None = None

    async def start(self, nats_url: str, *, name: str, login: NatsLogin | None = None) -> None:
        """Connect (reconnecting for ever, like the service's broker) and start consuming."""
        self._nc = await nats.connect(
            **(login or NatsLogin(inbox_user=name)).connect_options(),
            servers=[u.strip() for u in nats_url.split(",") if u.strip()],
            name=name,
            max_reconnect_attempts=-1,
            reconnect_time_wait=1,
            connect_timeout=2,
        )
        self._task = asyncio.create_task(self._run(self._nc.jetstream()), name=f"consume-{self.spec.durable}")

    @contextlib.asynccontextmanager
    async def running(self, nats_url: str, *, name: str, login: NatsLogin | None = None) -> AsyncIterator[None]:
        """Consume for the duration of the block (a service resource)."""
        await self.start(nats_url, name=name, login=login)
        try:
            yield
        finally:
            await self.stop()

    async def stop(self) -> None:
        """Stop consuming; a batch being handled is abandoned (it comes back after ``ack_wait``)."""
        self._stopping = True
        if self._task is not None:
            # nats-py may turn a cancelled fetch into another error: the flag ends the loop all the same
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._nc.close(), 2.0)
            self._nc = None

    async def _subscribe(self, js: JetStreamContext) -> JetStreamContext.PullSubscription:
        s = self.spec
        # created, or an existing consumer brought up to this config (its filters may have changed)
        await js.add_consumer(
            s.stream,
            config=ConsumerConfig(
                durable_name=s.durable,
                name=s.durable,
                deliver_policy=DeliverPolicy.ALL,
                ack_policy=AckPolicy.EXPLICIT,
                ack_wait=s.ack_wait_s,
                max_ack_pending=s.max_ack_pending,
                filter_subjects=list(s.filters),
            ),
        )
        return await js.pull_subscribe_bind(durable=s.durable, stream=s.stream)

    async def _run(self, js: JetStreamContext) -> None:
        sub: JetStreamContext.PullSubscription | None = None
        while not self._stopping:
            try:
                if sub is None:
                    sub = await self._subscribe(js)
                batch = await self._collect(sub)
            except Exception as exc:
                if self._stopping:
                    break
                log.warning("pulling from %s failed (retrying): %s", self.spec.durable, exc)
                if sub is not None:
                    with contextlib.suppress(Exception):
                        await sub.unsubscribe()
                sub = None
                await asyncio.sleep(RETRY_S)
                continue
            if batch:
                try:
                    await self.handle(batch)
                except Exception:
                    log.exception("handling a batch of %s failed; it comes back after ack_wait", self.spec.durable)

    async def _collect(self, sub: JetStreamContext.PullSubscription) -> list[Msg]:
        """Wait for a first message, then take more until the batch is full or the window is over."""
        try:
            msgs = await sub.fetch(self.spec.batch, timeout=IDLE_WAIT_S)
        except TimeoutError:  # nats-py raises both asyncio's and its own subclass
            return []
        deadline = time.monotonic() + self.spec.window_s
        while len(msgs) < self.spec.batch:
            left = deadline - time.monotonic()
            if left < MIN_FETCH_S:
                break
            try:
                msgs += await sub.fetch(self.spec.batch - len(msgs), timeout=left)
            except TimeoutError:
                break
        return msgs
