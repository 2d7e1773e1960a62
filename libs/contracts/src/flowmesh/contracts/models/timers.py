"""Durable timers (the scheduler owns all of time: no other service sleeps on a deadline).

A service arms a timer with ``fm.rpc.scheduler.timers.set``; when it comes due the scheduler
publishes :class:`TimerFired` on ``fm.timers.fired.<owner>`` (stream ``TIMERS``) with
``Nats-Msg-Id`` :func:`timer_msg_id`, at least once and de-duplicated, and forgets it. Setting
``(owner, key)`` again replaces its due time and payload; a timer is never fired before its due
time. The owner must treat a fired timer as a hint and check its own state: a timer can fire for
a wait that has ended since (cancel is best effort).
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, StrictInt, StrictStr

from flowmesh.contracts.models.base import Timestamp, WireModel

_TOKEN = r"^[A-Za-z0-9_-]{1,64}$"


class TimerRef(WireModel):
    """Names one timer: ``owner`` is a subject token (a service name), ``key`` is the owner's id for it."""

    owner: str = Field(pattern=_TOKEN)
    key: str = Field(min_length=1, max_length=200)


class TimerSet(TimerRef):
    """``timers.set``: arm ``(owner, key)`` to fire at ``due_at`` with ``payload``."""

    due_at: Timestamp
    payload: dict[str, Any] = Field(default_factory=dict)


class TimerCancelled(WireModel):
    """``timers.cancel`` reply."""

    cancelled: bool


class TimerFired(TimerSet):
    """Published on ``fm.timers.fired.<owner>`` when the timer came due."""

    fired_at: Timestamp


def timer_msg_id(owner: str, key: str, due_at: str) -> str:
    """``Nats-Msg-Id`` of a fired timer: one message per (timer, due time), whichever replica fires it."""
    return f"timer:{owner}:{key}:{due_at}"


class DeadlinePayload(WireModel):
    """The payload of the runner's timers: a run's time limit, or one step attempt's deadline.

    Whoever fires it only gives a hint: the runner checks it against the run's state under its lock.
    Read strictly (a number in a string is not a retry count): a payload that is not one of these is
    not the runner's and is ignored.
    """

    run_id: StrictStr
    retry_count: StrictInt
    step_id: StrictStr | None = None
    attempt: StrictInt | None = None
    """The attempt, with ``stepId``; absent for the run's own deadline."""
