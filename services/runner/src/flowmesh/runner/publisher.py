"""Publishing a committed change: its run events (then its step work) on JetStream, and the record of it.

Events are written with the change and published right after the commit, with ``Nats-Msg-Id`` =
event id (JetStream drops a re-send). ``runs.published_seq`` records which events are known to be
in the stream; the sweep re-publishes the rest after a crash. Recording happens in the background
every 0.2 s, for many runs in one statement, off the path of the change.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from typing import Any, Final, NamedTuple

import asyncpg
import orjson
from nats.js import JetStreamContext

from flowmesh.contracts import headers as h
from flowmesh.contracts.models.work import StepWork
from flowmesh.contracts.subjects import STEP_WORK, run_event
from flowmesh.runner import repo
from flowmesh.runner.engine import RunRecord, RunState
from flowmesh.runtime.tracing import for_run

log = logging.getLogger(__name__)

PUBLISH_TIMEOUT_S: Final = 5.0
PUBLISHED_PENDING_S: Final = 5.0
"""How long a published span waits for the events before it to be recorded, before the sweep's turn."""
FLUSH_EVERY_S: Final = 0.2
CHILD_DONE: Final = ":child"
"""Message ids of work telling a parent step that one of its child runs ended end so."""

Span = tuple[int, int, float]
"""Events ``first..last`` of a run reached JetStream at this monotonic time."""


class Work(NamedTuple):
    """A step-work message and its ``Nats-Msg-Id`` (one per run retry and step attempt, per ended child)."""

    body: StepWork
    msg_id: str

    def encode(self) -> bytes:
        """The message body."""
        return orjson.dumps(self.body.wire())


def attempt_work(state: RunState, step_id: str) -> Work:
    """Work on a dispatched step's attempt (the next one, when it waits to retry)."""
    step = state.steps[step_id]
    attempt = step.attempt + (1 if step.status == "pending" else 0)
    body = StepWork(run_id=state.run.id, step_id=step_id, kind="attempt")
    return Work(body, f"{state.run.id}:{state.run.retry_count}:{step_id}:{attempt}")


def parent_work(state: RunState, was_final: bool) -> list[Work]:
    """A child run that just ended tells its parent step."""
    run = state.run
    if was_final or not run.final or not run.parent_run_id or not run.parent_step_id:
        return []
    body = StepWork(run_id=run.parent_run_id, step_id=run.parent_step_id, kind="child")
    return [Work(body, f"{run.id}{CHILD_DONE}")]


def work_of(state: RunState, was_final: bool, local: Sequence[str] = ()) -> list[Work]:
    """Every message a committed change owes: its dispatched steps' work (but the ``local`` ones, which
    this process executes itself), and its parent's if it ended."""
    sent = [step_id for step_id in state.dispatch if step_id not in local]
    return [attempt_work(state, step_id) for step_id in sent] + parent_work(state, was_final)


class Sent(NamedTuple):
    """What :meth:`EventPublisher.send` sent: the run, its events' first and last ``seq``, the acks to await."""

    run_id: str
    seqs: tuple[int, int] | None
    acks: list[asyncio.Future[Any]]


class EventPublisher:
    """Publishes committed changes and records, in the background, which events reached JetStream."""

    def __init__(self) -> None:
        self.js: JetStreamContext | None = None
        self.pool: asyncpg.Pool | None = None
        # per run, the spans of events that reached JetStream and are not yet in published_seq
        self._published: dict[str, list[Span]] = {}
        self._flush_task: asyncio.Task[None] | None = None

    def start(self, js: JetStreamContext, pool: asyncpg.Pool) -> None:
        """Begin publishing (called once connected)."""
        self.js = js
        self.pool = pool
        self._flush_task = asyncio.create_task(self._flush_forever(), name="published-seq")

    async def stop(self) -> None:
        """Stop flushing and record what is pending (anything left is the sweep's)."""
        if self._flush_task is not None:
            self._flush_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flush_task
        await self.flush()

    async def publish(self, run: RunRecord, events: list[dict[str, Any]], work: Sequence[Work]) -> None:
        """Publish a committed change's events (in order) and work; the sweep covers a failure here."""
        await self.confirm(await self.send(run, events, work))

    async def send(self, run: RunRecord, events: list[dict[str, Any]], work: Sequence[Work]) -> Sent | None:
        """Send a committed change's events (in order) and work on the connection, not waiting for
        JetStream's acknowledgements (:meth:`confirm`): what is published after this, on the same
        connection, reaches the stream after these. None if sending failed (logged; the sweep's)."""
        if self.js is None:
            return None
        js = self.js
        base = {h.TENANT: run.tenant_id, h.SCHEMA: h.SCHEMA_VERSION}
        tp = for_run(run.traceparent)  # the run's trace, whoever caused this change (a timer, the sweep)
        if tp is not None:
            base[h.TRACEPARENT] = tp
        try:
            acks = [
                await js.publish_async(
                    run_event(run.tenant_id, run.flow_id, run.id, e["type"]),
                    orjson.dumps(e),
                    headers={**base, h.MSG_ID: e["id"]},
                )
                for e in events
            ]
            acks += [await js.publish_async(STEP_WORK, w.encode(), headers={**base, h.MSG_ID: w.msg_id}) for w in work]
        except Exception as exc:
            log.warning("publishing after commit failed (the sweep will retry): %s", exc)
            return None
        return Sent(run.id, (events[0]["seq"], events[-1]["seq"]) if events else None, acks)

    async def confirm(self, sent: Sent | None) -> None:
        """Wait for the acknowledgements of what :meth:`send` sent, and note its events as published."""
        if sent is None:
            return
        try:
            await asyncio.wait_for(asyncio.gather(*sent.acks), PUBLISH_TIMEOUT_S)
        except Exception as exc:
            log.warning("publishing after commit failed (the sweep will retry): %s", exc)
            return
        if sent.seqs is not None:
            self._published.setdefault(sent.run_id, []).append((*sent.seqs, time.monotonic()))

    async def resend_work(self, work: Sequence[Work]) -> None:
        """Publish work again (the sweep's): de-duplicated by its message id within the window."""
        if self.js is None:
            return
        for w in work:
            await self.js.publish(STEP_WORK, w.encode(), headers={h.MSG_ID: w.msg_id})

    async def _flush_forever(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_EVERY_S)
            try:
                await self.flush()
            except Exception as exc:
                log.warning("recording published events failed: %s", exc)

    async def flush(self) -> None:
        """Record the spans published since the last flush in ``published_seq``."""
        if not self._published:
            return
        pending, self._published = self._published, {}
        if self.pool is None:
            return
        # Why spans and not "the highest seq published": a change whose event publish failed (its
        # stream's leader died) may be followed by one whose publish succeeded, even on another
        # replica; recording only the highest seq hid the failed events from the sweep for ever, and
        # the usage service (and integrators) never saw them. Spans held back by such a hole, or by
        # another replica's span not recorded yet, wait a few flushes; the sweep covers the rest.
        spans = {run_id: merged(found) for run_id, found in pending.items()}
        try:
            async with self.pool.acquire() as conn:
                now_at = await repo.mark_published(conn, spans={r: s[0][:2] for r, s in spans.items()})
        except BaseException:
            self._keep_pending(spans, {})
            raise
        self._keep_pending(spans, now_at)

    def _keep_pending(self, spans: dict[str, list[Span]], now_at: dict[str, int]) -> None:
        """Put back the spans not recorded yet (for a while: after that, the sweep re-publishes them)."""
        oldest = time.monotonic() - PUBLISHED_PENDING_S
        for run_id, found in spans.items():
            left = [s for s in found if s[1] > now_at.get(run_id, 0) and s[2] > oldest]
            if left:
                self._published.setdefault(run_id, []).extend(left)


def merged(spans: list[Span]) -> list[Span]:
    """Event spans of one run, sorted, adjacent and overlapping ones joined (the latest time kept)."""
    out: list[Span] = []
    for first, last, at in sorted(spans):
        if out and first <= out[-1][1] + 1:
            prev = out[-1]
            out[-1] = (prev[0], max(prev[1], last), max(prev[2], at))
        else:
            out.append((first, last, at))
    return out
