"""Durable JetStream consumers: one idiom, one acknowledgement policy, for every service.

A service declares its consumers on :attr:`ServiceRuntime.consumers
<flowmesh.runtime.service.ServiceRuntime.consumers>`, from the consumer specs of
``flowmesh.contracts.streams``, with a handler typed by the message it takes::

    async def flow_announced(event: FlowEvent, msg: Delivery, deps: SchedulerDeps) -> None: ...

    service.consumers.each(SCHEDULER_FLOWS, flow_announced, deps, workers=4)

The policy, the same everywhere (at least once: a message is settled only once handled):

- the handler returns: the message is acknowledged;
- the handler raises :class:`Redeliver`: it comes back after the delay it asked for (not an error:
  a rate limit, a timer that fired early, a step that asked to be retried later);
- the body cannot be read (not JSON, not the handler's model): logged and terminated, never
  redelivered (the server's ``MSG_TERMINATED`` advisory is its dead-letter record); a handler
  raises :class:`Unprocessable` for a message it can read but never handle;
- anything else (the database away, a bug): logged and redelivered after :data:`NAK_DELAY_S`.

Consumers pull on a NATS connection of their own. Draining a connection waits until every
message a subscription has queued was processed, and a pull subscription may hold a late status
message that nobody will read: on the service's shared connection that held up every stop by the
full drain timeout. The consumers stop first (in-flight handlers finish, bounded), then their
connection is closed; anything left unacknowledged comes back after ``ack_wait``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final, Generic, TypeVar

import nats
import orjson
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import BadRequestError
from pydantic import ValidationError

from flowmesh.contracts import headers
from flowmesh.contracts.errors import FlowmeshError
from flowmesh.contracts.streams import ALL_STREAMS, ConsumerSpec
from flowmesh.runtime.db_errors import database_unavailable
from flowmesh.runtime.logs import log_context
from flowmesh.runtime.metrics import CONSUMER_ACK_PENDING, CONSUMER_PENDING
from flowmesh.runtime.nats import JS_SETUP_TIMEOUT_S
from flowmesh.runtime.rpc import request_parser
from flowmesh.runtime.settings import NatsLogin
from flowmesh.runtime.tracing import enabled as tracing_enabled
from flowmesh.runtime.tracing import span

log = logging.getLogger(__name__)

DepsT = TypeVar("DepsT")

NAK_DELAY_S: Final = 1.0
"""How soon a message whose handling failed comes back."""
FETCH_WAIT_S: Final = 1.0
"""How long one pull of a per-message consumer waits for messages (then it pulls again)."""
IDLE_WAIT_S: Final = 5.0
"""How long one pull of a batch consumer waits for a first message (then it pulls again)."""
MIN_FETCH_S: Final = 0.01
RETRY_S: Final = 1.0
"""Pause before binding a consumer again after a failed pull (NATS restarting, the consumer gone)."""
STOP_GRACE_S: Final = 10.0
"""How long stopping waits for the handlers in flight."""
LAG_TIMEOUT_S: Final = 2.0
"""How long one read of a consumer's counts may take (a slow NATS skips a refresh, nothing more)."""


class Redeliver(Exception):
    """Raised by a handler: settle the message as not done, to come back after ``delay_s``."""

    def __init__(self, delay_s: float, reason: str = "") -> None:
        super().__init__(reason or f"redeliver in {delay_s}s")
        self.delay_s = delay_s


class Unprocessable(Exception):
    """Raised by a handler: the message can never be handled; logged and terminated."""


class Delivery:
    """One message of a durable consumer, as its handler sees it."""

    __slots__ = ("_settled", "msg")

    def __init__(self, msg: Msg) -> None:
        self.msg = msg
        self._settled = False

    @property
    def subject(self) -> str:
        """The subject the message was published on."""
        return self.msg.subject

    @property
    def data(self) -> bytes:
        """The raw body."""
        return self.msg.data

    @property
    def headers(self) -> dict[str, str]:
        """The message headers (empty when none)."""
        return self.msg.headers or {}

    @property
    def seq(self) -> int:
        """The message's sequence number in its stream."""
        return self.msg.metadata.sequence.stream

    @property
    def delivered(self) -> int:
        """How many times it was delivered (1 the first time)."""
        return self.msg.metadata.num_delivered

    @property
    def settled(self) -> bool:
        """Whether it was acknowledged, handed back or terminated already."""
        return self._settled

    async def in_progress(self) -> None:
        """Tell the server the handler is still at it (restarts its ``ack_wait``)."""
        await self.msg.in_progress()

    async def ack(self) -> None:
        """Done: never delivered again."""
        await self._settle(self.msg.ack())

    async def nak(self, delay: float | None = None) -> None:
        """Not done: delivered again (after ``delay`` seconds)."""
        await self._settle(self.msg.nak(delay=delay))

    async def term(self) -> None:
        """Never to be done: not delivered again, and reported by the server as terminated."""
        await self._settle(self.msg.term())

    async def _settle(self, call: Awaitable[None]) -> None:
        self._settled = True
        try:
            await call
        except nats.errors.Error as exc:  # the connection is gone: it comes back after ack_wait
            log.debug("settling message %s failed: %s", self.msg.subject, exc)


def _stream_subjects(stream: str) -> tuple[str, ...]:
    for spec in ALL_STREAMS:
        if spec.name == stream:
            return spec.subjects
    raise ValueError(f"no stream {stream!r} in flowmesh.contracts.streams")


@dataclass(frozen=True, slots=True)
class PullOptions:
    """How a consumer is created and pulled, beyond its contract spec."""

    filters: tuple[str, ...] = ()
    """Subjects taken (default: the spec's filter, else every subject of its stream)."""
    ack_wait_s: float | None = None
    max_ack_pending: int | None = None
    deliver_new: bool = False
    """Start with messages published after the consumer was created (the default is all)."""
    batch: int = 16


def consumer_config(spec: ConsumerSpec, options: PullOptions) -> ConsumerConfig:
    """The server-side config of a durable pull consumer."""
    subjects = options.filters or spec.filter_subjects or _stream_subjects(spec.stream)
    config = ConsumerConfig(
        durable_name=spec.durable,
        name=spec.durable,
        deliver_policy=DeliverPolicy.NEW if options.deliver_new else DeliverPolicy.ALL,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=options.ack_wait_s if options.ack_wait_s is not None else spec.ack_wait_s,
        max_deliver=spec.max_deliver,
        max_ack_pending=options.max_ack_pending or spec.max_ack_pending,
    )
    if len(subjects) == 1:
        config.filter_subject = subjects[0]
    else:  # NATS server 2.10+ filters a consumer by several subjects
        config.filter_subjects = list(subjects)
    return config


async def fetch(sub: JetStreamContext.PullSubscription, batch: int, timeout: float) -> list[Msg]:
    """Up to ``batch`` messages within ``timeout``; none is not an error.

    nats-py raises either its own ``TimeoutError`` or asyncio's when a pull gets nothing,
    depending on where the deadline passes: both mean "nothing yet", here and only here.
    """
    try:
        return await sub.fetch(batch, timeout=timeout)
    except TimeoutError:  # nats.errors.TimeoutError is a subclass
        return []


class _PullLoop:
    """Binds a durable consumer (created or brought to its config) and pulls until stopped."""

    def __init__(self, spec: ConsumerSpec, options: PullOptions) -> None:
        self.spec = spec
        self.options = options
        self.config = consumer_config(spec, options)
        self.stopping = False
        self._task: asyncio.Task[None] | None = None

    async def create(self, js: JetStreamContext) -> None:
        """Create the consumer, or bring an existing one to its config (any replica may race)."""
        try:
            await js.add_consumer(self.spec.stream, config=self.config)
        except BadRequestError as exc:
            # an older consumer with a setting that cannot be edited: used as it stands
            log.warning("consumer %s keeps its existing configuration: %s", self.spec.durable, exc)

    async def _bind(self, js: JetStreamContext) -> JetStreamContext.PullSubscription:
        await self.create(js)
        return await js.pull_subscribe_bind(durable=self.spec.durable, stream=self.spec.stream)

    def start(self, js: JetStreamContext) -> None:
        """Pull in the background until :meth:`stop`."""
        self._task = asyncio.create_task(self._run(js), name=f"consume-{self.spec.durable}")

    async def _run(self, js: JetStreamContext) -> None:
        sub: JetStreamContext.PullSubscription | None = None
        while not self.stopping:
            try:
                if sub is None:
                    sub = await self._bind(js)
                await self.pull(sub)
            except Exception as exc:
                if self.stopping:
                    break
                log.warning("pulling from %s failed (retrying): %s", self.spec.durable, exc)
                if sub is not None:
                    with contextlib.suppress(Exception):
                        await sub.unsubscribe()
                sub = None
                await asyncio.sleep(RETRY_S)

    async def pull(self, sub: JetStreamContext.PullSubscription) -> None:
        """Take one pull's messages and hand them to the handler."""
        raise NotImplementedError

    async def stop(self) -> None:
        """Stop pulling (a pull in progress is abandoned)."""
        self.stopping = True
        if self._task is not None:
            # nats-py may turn a cancelled fetch into another error: the flag ends the loop all the same
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


def _log_failure(what: str, exc: BaseException) -> None:
    if database_unavailable(exc) or isinstance(exc, FlowmeshError):
        log.warning("%s failed, it will be redelivered: %s", what, exc)
    else:
        log.error("%s failed, it will be redelivered", what, exc_info=exc)


def _consumer_attributes(spec: ConsumerSpec, delivery: Delivery) -> dict[str, str | int] | None:
    """A consumer span's attributes (none built with tracing off)."""
    if not tracing_enabled():
        return None
    return {
        "messaging.system": "nats",
        "messaging.operation.type": "process",
        "messaging.destination.name": delivery.subject,
        "messaging.consumer.group.name": spec.durable,
        "messaging.nats.delivered": delivery.delivered,
    }


class EachConsumer(_PullLoop, Generic[DepsT]):
    """Hands each message, parsed into the handler's model, to ``handler(body, delivery, deps)``."""

    def __init__(
        self,
        spec: ConsumerSpec,
        handler: Callable[[Any, Delivery, DepsT], Awaitable[None]],
        deps: DepsT,
        *,
        workers: int,
        options: PullOptions,
        malformed: Callable[[Delivery, DepsT], Awaitable[None]] | None,
    ) -> None:
        super().__init__(spec, options)
        self._handler = handler
        self._parse = request_parser(handler)
        self._deps = deps
        self._malformed = malformed
        self._slots = asyncio.Semaphore(workers)
        self._tasks: set[asyncio.Task[None]] = set()

    async def pull(self, sub: JetStreamContext.PullSubscription) -> None:
        for msg in await fetch(sub, self.options.batch, FETCH_WAIT_S):
            await self._slots.acquire()  # at most `workers` at once: the others wait their turn
            task = asyncio.create_task(self.handle(Delivery(msg)))
            self._tasks.add(task)
            task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._slots.release()

    async def handle(self, delivery: Delivery) -> None:
        """Handle one message in the trace its ``traceparent`` header continues (a consumer span)."""
        h = delivery.headers
        with (
            span(
                f"{self.spec.durable} process",
                kind="consumer",
                parent=h.get(headers.TRACEPARENT),
                attributes=_consumer_attributes(self.spec, delivery),
            ),
            log_context(tenant=h.get(headers.TENANT)),
        ):
            await self._handle(delivery)

    async def _handle(self, delivery: Delivery) -> None:
        """Parse, handle and settle one message by the policy of this module."""
        what = f"{self.spec.durable} message {delivery.subject} (stream seq {delivery.seq})"
        try:
            try:
                body = self._parse(orjson.loads(delivery.data))
            except (orjson.JSONDecodeError, ValidationError) as exc:
                await self._drop(delivery, f"{what}: dropped, it cannot be read: {exc}")
                return
            await self._handler(body, delivery, self._deps)
        except Redeliver as exc:
            if not delivery.settled:
                await delivery.nak(delay=exc.delay_s)
            return
        except Unprocessable as exc:
            log.warning("%s: dropped, it cannot be handled: %s", what, exc)
            if not delivery.settled:
                await delivery.term()
            return
        except Exception as exc:
            _log_failure(what, exc)
            if not delivery.settled:
                await delivery.nak(delay=NAK_DELAY_S)
            return
        if not delivery.settled:
            await delivery.ack()

    async def _drop(self, delivery: Delivery, reason: str) -> None:
        log.warning("%s", reason)
        if self._malformed is not None:
            await self._malformed(delivery, self._deps)  # may raise: then it is redelivered
        await delivery.term()

    async def stop(self) -> None:
        """Stop pulling, let the handlers in flight finish (bounded), abandon the rest."""
        await super().stop()
        if self._tasks:
            _, late = await asyncio.wait(set(self._tasks), timeout=STOP_GRACE_S)
            for task in late:
                task.cancel()


class BatchConsumer(_PullLoop, Generic[DepsT]):
    """Hands batches of messages to ``handler(deliveries, deps)``, one batch at a time.

    A batch is collected as it comes: wait for a first message, then take more for ``window_s``
    or until ``options.batch`` are there. The handler returning acknowledges every message it did
    not settle itself; its raising hands them all back (after :data:`NAK_DELAY_S`).
    """

    def __init__(
        self,
        spec: ConsumerSpec,
        handler: Callable[[list[Delivery], DepsT], Awaitable[None]],
        deps: DepsT,
        *,
        window_s: float,
        options: PullOptions,
    ) -> None:
        super().__init__(spec, options)
        self._handler = handler
        self._deps = deps
        self.window_s = window_s

    async def pull(self, sub: JetStreamContext.PullSubscription) -> None:
        batch = [Delivery(m) for m in await self._collect(sub)]
        if batch:
            await self.handle(batch)

    async def handle(self, batch: list[Delivery]) -> None:
        """Handle and settle one batch by the policy of this module."""
        try:
            await self._handler(batch, self._deps)
        except Exception as exc:
            _log_failure(f"{self.spec.durable}: a batch of {len(batch)}", exc)
            await asyncio.gather(*(d.nak(delay=NAK_DELAY_S) for d in batch if not d.settled))
            return
        await asyncio.gather(*(d.ack() for d in batch if not d.settled))

    async def _collect(self, sub: JetStreamContext.PullSubscription) -> list[Msg]:
        size = self.options.batch
        msgs = await fetch(sub, size, IDLE_WAIT_S)
        if not msgs:
            return []
        deadline = time.monotonic() + self.window_s
        while len(msgs) < size:
            left = deadline - time.monotonic()
            if left < MIN_FETCH_S:
                break
            more = await fetch(sub, size - len(msgs), left)
            if not more:
                break
            msgs += more
        return msgs


class Consumers:
    """The durable consumers of one service, on a connection of their own.

    Declared before the service starts; created (or brought to their config) at start, so a
    consumer the NATS user may not create fails the start with the subject at fault.
    """

    def __init__(self, name: str, *, lag_interval_s: float = 15.0) -> None:
        self.name = name
        self.lag_interval_s = lag_interval_s
        self._loops: list[_PullLoop] = []
        self._nc: Client | None = None
        self._lag_task: asyncio.Task[None] | None = None

    def each(
        self,
        spec: ConsumerSpec,
        handler: Callable[[Any, Delivery, DepsT], Awaitable[None]],
        deps: DepsT,
        *,
        workers: int = 1,
        options: PullOptions | None = None,
        malformed: Callable[[Delivery, DepsT], Awaitable[None]] | None = None,
    ) -> EachConsumer[DepsT]:
        """Consume ``spec`` message by message, ``workers`` at a time.

        Args:
            spec: The consumer (durable name, stream, filters) from ``flowmesh.contracts.streams``.
            handler: ``async def h(body: Model, msg: Delivery, deps: Deps)``; the body is parsed
                from the annotation of its first parameter (``Any``: the decoded JSON as it is).
            deps: What the handler needs, passed as its third argument.
            workers: Messages handled at once (1: one after the other, in stream order).
            options: Filters, ack wait, start position and pull size beyond the spec.
            malformed: Called with a message that cannot be read, before it is terminated.
        """
        loop = EachConsumer(spec, handler, deps, workers=workers, options=options or PullOptions(), malformed=malformed)
        self._loops.append(loop)
        return loop

    def batches(
        self,
        spec: ConsumerSpec,
        handler: Callable[[list[Delivery], DepsT], Awaitable[None]],
        deps: DepsT,
        *,
        window_s: float,
        options: PullOptions | None = None,
    ) -> BatchConsumer[DepsT]:
        """Consume ``spec`` in batches of at most ``options.batch``, collected for ``window_s``."""
        loop = BatchConsumer(spec, handler, deps, window_s=window_s, options=options or PullOptions())
        self._loops.append(loop)
        return loop

    async def start(
        self, nats_url: str, *, login: NatsLogin | None = None, error_cb: Callable[[Exception], Awaitable[None]] | None
    ) -> None:
        """Connect (reconnecting for ever, like the service's broker), create the consumers, pull."""
        if not self._loops:
            return
        login = login or NatsLogin(inbox_user=self.name)
        self._nc = await nats.connect(
            **login.connect_options(),
            servers=_servers(nats_url),
            name=f"flowmesh-{self.name}-consumers",
            max_reconnect_attempts=-1,
            reconnect_time_wait=1,
            connect_timeout=2,
            error_cb=error_cb,
        )
        setup = self._nc.jetstream(timeout=JS_SETUP_TIMEOUT_S)
        for loop in self._loops:
            await loop.create(setup)
        js = self._nc.jetstream()
        for loop in self._loops:
            loop.start(js)
        self._lag_task = asyncio.create_task(self._refresh_lag_forever(), name=f"{self.name}-consumer-lag")

    async def refresh_lag(self) -> None:
        """Read each consumer's pending and unacknowledged counts from NATS into the lag gauges.

        One ``CONSUMER.INFO`` request per consumer, every ``lag_interval_s``: the counts cost the
        message path nothing. A consumer whose read fails keeps its last value until the next one.
        """
        if self._nc is None:
            return
        js = self._nc.jetstream(timeout=LAG_TIMEOUT_S)
        for loop in self._loops:
            durable = loop.spec.durable
            try:
                info = await js.consumer_info(loop.spec.stream, durable)
            except Exception as exc:
                log.debug("reading the counts of consumer %s failed: %s", durable, exc)
                continue
            CONSUMER_PENDING.labels(durable).set(info.num_pending or 0)
            CONSUMER_ACK_PENDING.labels(durable).set(info.num_ack_pending or 0)

    async def _refresh_lag_forever(self) -> None:
        while True:
            await self.refresh_lag()
            await asyncio.sleep(self.lag_interval_s)

    async def stop(self) -> None:
        """Stop every consumer (handlers in flight finish, bounded), then close the connection."""
        if self._lag_task is not None:
            self._lag_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._lag_task
            self._lag_task = None
        await asyncio.gather(*(loop.stop() for loop in self._loops))
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._nc.close(), 2.0)
            self._nc = None


def _servers(nats_url: str) -> list[str]:
    return [u.strip() for u in nats_url.split(",") if u.strip()]
