"""Firing due times: claim a little ahead from PostgreSQL, fire on time from memory, confirm, record.

Every replica runs the same loop, with no leader: every ``poll_interval`` it claims the schedules
and timers due within ``lookahead`` (``FOR UPDATE SKIP LOCKED``: a row goes to one replica), sleeps
until each due time, checks its claims still stand (a change since clears them), publishes, and
records the outcome where its claim still stands.

*Confirmed* means JetStream acknowledged the message: the run start is then stored durably in
``RUN_CMDS`` (a JetStream ack is an accepted run, which is never lost) and the runner turns it
into exactly one run, keyed by ``sched:{triggerId}:{dueTime}``. Only then does a due time count as
fired. A fire that was not acknowledged keeps its claim until the lease lapses, and then any
replica fires it again with the same key: JetStream drops the copy within its duplicate window,
and the runner's unique idempotency key beyond it. A replica killed with claims in hand delays
them by at most ``lease`` (they stay well inside the misfire threshold).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Final

from nats.js import JetStreamContext
from prometheus_client import Counter, Histogram

from flowmesh.contracts import headers as h
from flowmesh.contracts.ids import new_id, utcnow
from flowmesh.contracts.subjects import RUN_START_CMD, timer_fired
from flowmesh.runtime.db import Database
from flowmesh.scheduler import domain, repo
from flowmesh.scheduler.settings import SchedulerSettings

log = logging.getLogger(__name__)

MAX_BACKOFF_S: Final = 5.0
VERIFY_LEAD: Final = timedelta(milliseconds=50)
"""Claims are checked this long before their due time (a change in those last 50 ms may still fire)."""

FIRES: Final = Counter("flowmesh_scheduler_fires_total", "Due times published", ["kind", "outcome"])
LATENESS: Final = Histogram(
    "flowmesh_scheduler_lateness_seconds",
    "Publish time minus due time of every confirmed fire (misfire catch-ups included)",
    ["kind"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
MISFIRES: Final = Counter("flowmesh_scheduler_misfires_total", "Claims that found missed due times", ["policy"])


def instance_name() -> str:
    """This replica's name in claims: host, process and a random part (a restarted process is another)."""
    return f"{socket.gethostname()}-{os.getpid()}-{new_id()[-6:]}"


async def sleep_until(at: datetime) -> None:
    """Return at the wall-clock time ``at`` or just after it, never before.

    The event loop's clock is monotonic, due times are wall-clock: check again after each sleep.
    uvloop's timers count whole milliseconds (a shorter sleep returns at once, and a loop of them
    could give up before ``at``): each sleep is a millisecond at least.
    """
    for _ in range(100):
        delay = (at - utcnow()).total_seconds()
        if delay <= 0:
            return
        await asyncio.sleep(max(delay, _MIN_SLEEP_S))


_MIN_SLEEP_S: Final = 0.001


@dataclass(slots=True)
class _ScheduleJob:
    row: domain.Schedule
    token: str
    fires: tuple[datetime, ...]
    next_due: datetime | None
    confirmed: list[datetime] = field(default_factory=list)

    def outcome(self) -> tuple[str, str, datetime | None, datetime | None] | None:
        """``(trigger_id, token, last_fired, next_due)`` to record, or None when nothing moved."""
        if not self.fires:
            return self.row.trigger_id, self.token, None, self.next_due
        if not self.confirmed:
            return None
        if len(self.confirmed) == len(self.fires):
            return self.row.trigger_id, self.token, self.confirmed[-1], self.next_due
        # the first unconfirmed due time is fired again by the next claim, with the same key
        return self.row.trigger_id, self.token, self.confirmed[-1], self.fires[len(self.confirmed)]


@dataclass(slots=True)
class _Group:
    schedules: list[_ScheduleJob] = field(default_factory=list)
    timers: list[repo.ClaimedTimer] = field(default_factory=list)


class Dispatcher:
    """One replica's claim-and-fire loop for schedules and timers."""

    def __init__(self, db: Database, settings: SchedulerSettings) -> None:
        self._db = db
        self._settings = settings
        self.me = instance_name()
        self._lookahead = timedelta(seconds=settings.lookahead_s)
        self._lease = timedelta(seconds=settings.lease_s)
        self._threshold = timedelta(seconds=settings.misfire_threshold_s)
        self._wake = asyncio.Event()
        self._js: JetStreamContext | None = None
        self._loop: asyncio.Task[None] | None = None
        self._groups: dict[asyncio.Task[None], datetime] = {}

    @property
    def lookahead(self) -> timedelta:
        """How far ahead this replica claims."""
        return self._lookahead

    def start(self, js: JetStreamContext) -> None:
        """Claim and fire in the background until :meth:`stop`."""
        self._js = js
        self._loop = asyncio.create_task(self._run(), name="scheduler-dispatch")

    @contextlib.asynccontextmanager
    async def running(self, js: JetStreamContext) -> AsyncIterator[Dispatcher]:
        """Claim and fire for the duration of the block (a service resource)."""
        self.start(js)
        try:
            yield self
        finally:
            await self.stop()

    def wake(self) -> None:
        """Something comes due sooner than the next poll (a timer set for now): claim at once."""
        self._wake.set()

    async def stop(self) -> None:
        """Stop claiming; finish what is being fired, drop what is still waiting, and hand the rest back
        so another replica fires it at once."""
        if self._loop is not None:
            self._loop.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._loop
        soon = utcnow() + VERIFY_LEAD
        firing = [t for t, at in self._groups.items() if at <= soon]
        waiting = [t for t in self._groups if t not in firing]
        for task in waiting:
            task.cancel()
        if firing:
            # sent or about to be: recording them spares the next replica a duplicate publish
            await asyncio.wait(firing, timeout=self._settings.publish_timeout_s)
        for task in [*firing, *waiting]:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        try:
            async with asyncio.timeout(5), self._db.transaction() as conn:
                await repo.release_claims(conn, me=self.me)
        except Exception as exc:
            log.warning("could not hand back claims (they lapse after %ss): %s", self._settings.lease_s, exc)

    async def _run(self) -> None:
        wait = self._settings.poll_interval_s
        while True:
            claimed = 0
            try:
                claimed = await self.claim_once()
                wait = self._settings.poll_interval_s
            except Exception as exc:
                # the database or NATS is away: back off (claims already made still fire)
                wait = min(wait * 2, MAX_BACKOFF_S)
                log.warning("claiming due schedules and timers failed, retrying in %.1fs: %s", wait, exc)
            if claimed >= self._settings.claim_batch:
                continue  # more is due: claim again without waiting
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait)
            self._wake.clear()

    async def claim_once(self) -> int:
        """Claim what comes due within the lookahead and schedule its fires; how many rows were claimed."""
        now = utcnow()
        horizon = now + self._lookahead
        token = new_id()
        limit = self._settings.claim_batch
        async with self._db.transaction() as conn:
            rows = await repo.claim_schedules(
                conn, me=self.me, token=token, now=now, horizon=horizon, lease=self._lease, limit=limit
            )
            timers = await repo.claim_timers(
                conn, me=self.me, token=token, now=now, horizon=horizon, lease=self._lease, limit=limit
            )
        groups: dict[datetime, _Group] = {}
        idle: list[_ScheduleJob] = []
        for row in rows:
            job = self._plan(row, token, now=now, horizon=horizon)
            if job.fires:
                groups.setdefault(max(job.fires[0], now), _Group()).schedules.append(job)
            else:
                idle.append(job)
        for timer in timers:
            groups.setdefault(max(timer.due_at, now), _Group()).timers.append(timer)
        if idle:
            await self._record(idle, [])
        for at, group in groups.items():
            task = asyncio.create_task(self._fire_group(at, group), name="scheduler-fire")
            self._groups[task] = at
            task.add_done_callback(self._forget_group)
        return max(len(rows), len(timers))

    def _forget_group(self, task: asyncio.Task[None]) -> None:
        self._groups.pop(task, None)

    def _plan(self, row: domain.Schedule, token: str, *, now: datetime, horizon: datetime) -> _ScheduleJob:
        assert row.next_due_at is not None
        policy = domain.policy_of(row)
        try:
            return self._plan_policy(row, token, policy, now=now, horizon=horizon)
        except Exception:
            # one schedule that cannot be computed must not hold up the others: park it
            log.exception("schedule %s: no next due time could be computed; it will not fire", row.trigger_id)
            return _ScheduleJob(row=row, token=token, fires=(), next_due=None)

    def _plan_policy(
        self, row: domain.Schedule, token: str, policy: domain.MisfirePolicy, *, now: datetime, horizon: datetime
    ) -> _ScheduleJob:
        assert row.next_due_at is not None
        plan = domain.plan_fires(
            domain.spec_of(row),
            policy,
            row.next_due_at,
            now=now,
            horizon=horizon,
            threshold=self._threshold,
            limit=self._settings.fire_all_limit,
        )
        if row.next_due_at <= now - self._threshold:
            MISFIRES.labels(policy).inc()
            log.info(
                "schedule %s missed due times since %s: %s fires %s of them%s",
                row.trigger_id,
                row.next_due_at.isoformat(),
                policy,
                len([f for f in plan.fires if f <= now - self._threshold]),
                " (more were left out)" if plan.missed else "",
            )
        return _ScheduleJob(row=row, token=token, fires=plan.fires, next_due=plan.next_due)

    async def _fire_group(self, at: datetime, group: _Group) -> None:
        try:
            # claims are checked just before the due time, off the critical instant
            await sleep_until(at - VERIFY_LEAD)
            async with self._db.reading() as conn:
                held = await repo.held_schedules(conn, claims=[(j.row.trigger_id, j.token) for j in group.schedules])
                held_timers = await repo.held_timers(
                    conn, claims=[(t.owner, t.key, t.claim_token) for t in group.timers]
                )
            jobs = [j for j in group.schedules if j.row.trigger_id in held]
            timers = [t for t in group.timers if (t.owner, t.key) in held_timers]
            await sleep_until(at)
            # everything due now goes out back to back; the acknowledgements are awaited together
            fired_at = utcnow()
            timer_acks = [
                await self._send(
                    domain.fired_timer(
                        t.owner, t.key, t.due_at, t.payload, fired_at=fired_at, subject=timer_fired(t.owner)
                    )
                )
                for t in timers
            ]
            sent: list[tuple[_ScheduleJob, datetime]] = []
            acks: list[asyncio.Future[Any]] = []
            for job in jobs:
                for due in job.fires:
                    if due > at:
                        break  # the next regular due time after a catch-up: sent at its own time below
                    acks.append(
                        await self._send(domain.start_command(job.row, due, fired_at=fired_at, subject=RUN_START_CMD))
                    )
                    sent.append((job, due))
            timers_ok = await self._confirmed(timer_acks, [t.due_at for t in timers], fired_at, kind="timer")
            fires_ok = await self._confirmed(acks, [due for _, due in sent], fired_at, kind="schedule")
            for (job, due), ok in zip(sent, fires_ok, strict=True):
                # confirmed in order: after a failed fire, the next claim fires again from there
                if ok and job.fires[len(job.confirmed)] == due:
                    job.confirmed.append(due)
            later = [j for j in jobs if 0 < len(j.confirmed) < len(j.fires) and j.fires[len(j.confirmed)] > at]
            await asyncio.gather(*(self._fire_later(j) for j in later))
            await self._record(jobs, [t for t, ok in zip(timers, timers_ok, strict=True) if ok])
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # claims stay until their lease lapses, then any replica fires them with the same keys
            n = len(group.schedules) + len(group.timers)
            log.warning("firing %s due items failed, they will be retried: %s", n, exc)

    async def _send(self, out: domain.Outgoing) -> asyncio.Future[Any]:
        """Publish without waiting: the future is JetStream's acknowledgement (or the failure to send)."""
        assert self._js is not None
        hdrs = {h.SCHEMA: h.SCHEMA_VERSION, h.MSG_ID: out.msg_id}
        if out.tenant is not None:
            hdrs[h.TENANT] = out.tenant
        try:
            # no wait_stall: with it every call yields to the loop and each message is its own
            # socket write; unacknowledged sends are cancelled after the timeout, freeing their slot
            return await self._js.publish_async(out.subject, out.body, headers=hdrs)
        except Exception as exc:
            failed: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            failed.set_exception(exc)
            return failed

    async def _confirmed(
        self, acks: Sequence[asyncio.Future[Any]], dues: Sequence[datetime], fired_at: datetime, *, kind: str
    ) -> list[bool]:
        """Which sends JetStream acknowledged within the publish timeout."""
        if not acks:
            return []
        _, pending = await asyncio.wait(acks, timeout=self._settings.publish_timeout_s)
        for fut in pending:
            fut.cancel()
        ok = [f.done() and not f.cancelled() and f.exception() is None for f in acks]
        for good, due in zip(ok, dues, strict=True):
            FIRES.labels(kind, "ok" if good else "failed").inc()
            if good:
                LATENESS.labels(kind).observe((fired_at - due).total_seconds())
        if not all(ok):
            errors = {repr(f.exception()) for f in acks if f.done() and not f.cancelled() and f.exception()}
            failed = ok.count(False)
            log.warning("%s of %s %s fires unconfirmed, they will be retried: %s", failed, len(ok), kind, errors)
        return ok

    async def _fire_later(self, job: _ScheduleJob) -> None:
        for due in job.fires[len(job.confirmed) :]:
            await sleep_until(due)
            fired_at = utcnow()
            ack = await self._send(domain.start_command(job.row, due, fired_at=fired_at, subject=RUN_START_CMD))
            if not (await self._confirmed([ack], [due], fired_at, kind="schedule"))[0]:
                return
            job.confirmed.append(due)

    async def _record(self, jobs: Sequence[_ScheduleJob], timers: Sequence[repo.ClaimedTimer]) -> None:
        outcomes = [o for o in (j.outcome() for j in jobs) if o is not None]
        if not outcomes and not timers:
            return
        async with self._db.transaction() as conn:
            await repo.mark_fired(conn, fired=outcomes)
            await repo.forget_fired_timers(conn, fired=[(t.owner, t.key, t.claim_token) for t in timers])
