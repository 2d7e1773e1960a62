"""Live run events for WebSocket watchers.

One JetStream ordered consumer per watched subject per gateway process (``RUN_EVENTS``, new
messages only), shared by every local watcher of that run or flow: 1,000 watchers of one run
cost one consumer and one decode per event. Each watcher keeps, per run, the last ``seq`` it sent
and emits strictly in ``seq`` order: a duplicate (a re-published event) is dropped, and a gap (an
event published late or out of order, or lost on the way) is filled from the run's history in
PostgreSQL through the runner. So "no gap and no duplicate" holds whatever NATS delivers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import struct
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any, Final

from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy

from flowmesh.contracts.streams import RUN_EVENTS

log = logging.getLogger(__name__)

MAX_BEHIND: Final = 1000
"""A watcher this many messages behind is closed with 1013 (try again later):
each watcher's queue is bounded, so one slow client never holds the gateway's memory."""
FLUSH_DELAY_S: Final = 0.003
"""How long frames collect before they are written (one change's events usually arrive within it)."""
GAP_WAIT_S: Final = 0.2
"""How long a gap may stay open before it is filled from history (late publishes usually arrive)."""
FILL_PAGE: Final = 1000

Fill = Callable[[str, int], Awaitable[list[dict[str, Any]]]]
"""``fill(run_id, after)``: up to ``FILL_PAGE`` events of the run with ``seq > after``, in order."""


Out = tuple[str, bytes]
"""One message for watchers: its text, and the same as a ready WebSocket frame."""


def event_message(event: dict[str, Any]) -> Out:
    """One run event as watchers get it: encoded and framed once, written to every watcher."""
    text = json.dumps({"type": "event", "seq": event["seq"], "event": event}, separators=(",", ":"))
    return text, text_frame(text)


def text_frame(text: str) -> bytes:
    """A final, unmasked, uncompressed text frame (RFC 6455 §5.2), as a server sends it."""
    payload = text.encode()
    n = len(payload)
    if n < 126:
        header = struct.pack("!BB", 0x81, n)
    elif n < 65536:
        header = struct.pack("!BBH", 0x81, 126, n)
    else:
        header = struct.pack("!BBQ", 0x81, 127, n)
    return header + payload


class Watcher:
    """One WebSocket's view: per-run cursors, ordered emission, gap filling and the slow-client rule."""

    def __init__(
        self,
        send: Callable[[str], Awaitable[None]],
        write: Callable[[bytes], bool],
        fill: Fill,
        *,
        flusher: Flusher | None = None,
        max_behind: int = MAX_BEHIND,
    ) -> None:
        """``send`` writes a message with flow control; ``write`` writes ready frames now if the
        socket has room (False if not); ``fill`` reads a run's history; ``flusher`` batches writes."""
        self._flusher = flusher or Flusher()
        self._send = send
        self._write_now = write
        self._sending = False
        self._outbox: list[Out] = []
        self._fill = fill
        self.max_behind = max_behind
        self.cursors: dict[str, int] = {}
        self._pending: dict[str, dict[int, Out]] = {}
        self._filling: set[str] = set()
        self._started = False
        self._early: list[tuple[str, int, Out]] = []
        self._queue: asyncio.Queue[Out] = asyncio.Queue()
        self._room = asyncio.Event()
        self._room.set()
        self.too_slow = asyncio.Event()
        self.failed: BaseException | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writer = asyncio.create_task(self._write())

    # --- input ---------------------------------------------------------------------------------

    def start(self, cursors: dict[str, int], *, first: str | None = None) -> None:
        """Begin emitting: ``first`` (a snapshot) goes out before any event; then what arrived early."""
        if first is not None:
            self._queue.put_nowait((first, text_frame(first)))
        self.cursors.update(cursors)
        self._started = True
        for run_id, seq, text in self._early:
            self.offer(run_id, seq, text)
        self._early.clear()

    def offer(self, run_id: str, seq: int, out: Out) -> None:
        """A live event: sent now if it is next, held if it is early, dropped if already sent."""
        if not self._started:
            self._early.append((run_id, seq, out))
            return
        cursor = self.cursors.get(run_id)
        if cursor is None:  # a run first seen live (flow watchers): its story starts here
            cursor = self.cursors[run_id] = seq - 1
        if seq <= cursor:
            return
        if seq == cursor + 1 and run_id not in self._filling:
            self._emit(run_id, seq, out)
            self._drain(run_id)
        else:
            self._pending.setdefault(run_id, {})[seq] = out
            self._schedule_fill(run_id, GAP_WAIT_S)

    def catch_up(self, run_id: str) -> None:
        """Send the run's history after its cursor now (``?after=``), then continue live."""
        self._schedule_fill(run_id, 0.0)

    # --- output --------------------------------------------------------------------------------

    def _emit(self, run_id: str, seq: int, out: Out) -> None:
        self.cursors[run_id] = seq
        if not self._queue.empty() or self._sending:
            self._queue.put_nowait(out)  # behind: wait its turn, with flow control
        else:
            # the common case: frames collect for a few milliseconds (the events of one change arrive
            # as separate messages), then go out in one write: one syscall per watcher per change
            if not self._outbox:
                self._flusher.mark(self)
            self._outbox.append(out)
        if self.behind >= self.max_behind:
            self.too_slow.set()

    def flush(self) -> None:
        """Write what collected since the last flush."""
        outbox, self._outbox = self._outbox, []
        if not outbox:
            return
        if self._queue.empty() and not self._sending:
            frames = outbox[0][1] if len(outbox) == 1 else b"".join(frame for _, frame in outbox)
            if self._write_now(frames):
                return
        for out in outbox:  # no room in the socket: send them one by one, with flow control
            self._queue.put_nowait(out)

    def _drain(self, run_id: str) -> None:
        pending = self._pending.get(run_id)
        while pending:
            nxt = self.cursors[run_id] + 1
            out = pending.pop(nxt, None)
            if out is None:
                for seq in [s for s in pending if s <= self.cursors[run_id]]:
                    del pending[seq]
                break
            self._emit(run_id, nxt, out)
        if pending:
            self._schedule_fill(run_id, GAP_WAIT_S)
        else:
            self._pending.pop(run_id, None)

    def _schedule_fill(self, run_id: str, delay: float) -> None:
        if run_id in self._filling:
            return
        self._filling.add(run_id)
        task = asyncio.create_task(self._fill_gap(run_id, delay))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _fill_gap(self, run_id: str, delay: float) -> None:
        try:
            if delay:
                await asyncio.sleep(delay)  # a late publish usually closes the gap by itself
                self._filling.discard(run_id)
                self._drain(run_id)
                if run_id not in self._pending:
                    return
                self._filling.add(run_id)
            while True:
                events = await self._fill(run_id, self.cursors[run_id])
                for event in events:
                    if event["seq"] == self.cursors[run_id] + 1:
                        self._emit(run_id, event["seq"], event_message(event))
                self._filling.discard(run_id)
                self._drain(run_id)
                if len(events) < FILL_PAGE:
                    return
                self._filling.add(run_id)
                await self._wait_for_room()  # history is sent as fast as the client reads it
        except Exception as exc:  # a fill that cannot be done ends the stream
            log.warning("could not fill the history of run %s: %s", run_id, exc)
            self.failed = exc
            self.too_slow.set()
        finally:
            self._filling.discard(run_id)

    async def _wait_for_room(self) -> None:
        while self._queue.qsize() >= self.max_behind // 2:
            self._room.clear()
            await self._room.wait()

    async def _write(self) -> None:
        try:
            while True:
                text, _ = await self._queue.get()
                self._sending = True
                await self._send(text)
                self._sending = False
                if self._queue.qsize() < self.max_behind // 2:
                    self._room.set()
        except (ConnectionError, RuntimeError) as exc:  # the socket is closing: the handler ends the stream
            log.debug("live stream writer stopped: %s", exc)

    @property
    def behind(self) -> int:
        """Messages queued and not yet written to the socket."""
        return self._queue.qsize() + len(self._outbox)

    async def close(self) -> None:
        """Stop writing and filling."""
        for task in (self._writer, *self._tasks):
            task.cancel()
        for task in (self._writer, *self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


class Flusher:
    """Batches watchers' writes: the first frame of a batch starts a short timer, the timer writes all."""

    def __init__(self, delay_s: float = FLUSH_DELAY_S) -> None:
        self.delay_s = delay_s
        self._dirty: list[Watcher] = []

    def mark(self, watcher: Watcher) -> None:
        """``watcher`` has frames to write."""
        if not self._dirty:
            asyncio.get_running_loop().call_later(self.delay_s, self._flush)
        self._dirty.append(watcher)

    def _flush(self) -> None:
        dirty, self._dirty = self._dirty, []
        for watcher in dirty:
            watcher.flush()


class _Channel:
    def __init__(self) -> None:
        self.watchers: set[Watcher] = set()
        self.sub: Any = None
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()


class Hub:
    """Shared JetStream subscriptions of one gateway process, fanned out to its watchers."""

    def __init__(self, js: JetStreamContext) -> None:
        self._js = js
        self._channels: dict[str, _Channel] = {}

    async def watch(self, subject: str, watcher: Watcher) -> None:
        """Deliver every event published on ``subject`` from now on to ``watcher``."""
        channel = self._channels.get(subject)
        if channel is None:
            channel = self._channels[subject] = _Channel()
            channel.watchers.add(watcher)

            async def deliver(msg: Msg) -> None:
                self._deliver(channel, msg.data)

            try:
                channel.sub = await self._js.subscribe(
                    subject, stream=RUN_EVENTS.name, ordered_consumer=True, deliver_policy=DeliverPolicy.NEW, cb=deliver
                )
            except BaseException as exc:
                self._channels.pop(subject, None)
                channel.ready.set_exception(exc)
                channel.ready.exception()  # retrieved: waiters get it from their own await
                raise
            channel.ready.set_result(None)
            return
        channel.watchers.add(watcher)
        await asyncio.shield(channel.ready)

    async def replay(self, subject: str, since: datetime, watcher: Watcher) -> Any:
        """A watcher's own consumer from ``since`` (history, then live); unsubscribe what it returns."""
        config = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_TIME, opt_start_time=since)

        async def offer(msg: Msg) -> None:
            event = _decode(msg.data)
            if event is not None:
                watcher.offer(event["runId"], event["seq"], event_message(event))

        return await self._js.subscribe(subject, stream=RUN_EVENTS.name, ordered_consumer=True, config=config, cb=offer)

    async def unwatch(self, subject: str, watcher: Watcher) -> None:
        """Stop delivering to ``watcher``; the last watcher of a subject ends its subscription."""
        channel = self._channels.get(subject)
        if channel is None:
            return
        channel.watchers.discard(watcher)
        if not channel.watchers and self._channels.get(subject) is channel:
            del self._channels[subject]
            if channel.sub is not None:
                with contextlib.suppress(Exception):
                    await channel.sub.unsubscribe()

    @property
    def subjects(self) -> int:
        """Subjects with a live subscription."""
        return len(self._channels)

    def _deliver(self, channel: _Channel, data: bytes) -> None:
        event = _decode(data)
        if event is None:
            return
        out = event_message(event)
        for watcher in tuple(channel.watchers):
            watcher.offer(event["runId"], event["seq"], out)


def _decode(data: bytes) -> dict[str, Any] | None:
    try:
        event = json.loads(data)
    except ValueError:
        log.warning("a run event that is not JSON was ignored")
        return None
    if not isinstance(event, dict) or not isinstance(event.get("seq"), int) or not isinstance(event.get("runId"), str):
        log.warning("a run event without runId or seq was ignored")
        return None
    return event
