"""Due times of cron expressions in an IANA time zone, across daylight-saving changes. Pure.

A cron expression (5 fields, or 6 with seconds first) matches wall-clock times in its zone; the
due times are the instants (UTC) of those wall-clock times, under three rules:

1. An ordinary wall-clock time is due at its one instant.
2. **Spring forward** (a gap: the wall-clock times of the skipped hour do not exist): a matching
   time inside the gap is due once, moved forward by the length of the gap (``02:30`` on the day
   Paris goes from 02:00 CET to 03:00 CEST is due at 03:30 CEST) — as Java's ``ZonedDateTime``
   and Python's ``zoneinfo`` (``fold=0``) resolve a missing time. If that instant is also a
   regular due time, it is still one due time (the list of due times is a set).
3. **Fall back** (an overlap: the wall-clock times of the repeated hour occur twice): a matching
   time is due at its first occurrence only, unless the cron's *hour field* starts with ``*``
   (``*``, ``*/2``): such a cron recurs within every hour, so it is due at both occurrences and
   keeps its cadence in real time (an hourly cron fires every 60 minutes through the change).
   This is Vixie cron's rule for "wildcard" jobs, applied to the hour field.

Every function takes and returns timezone-aware datetimes; due times are whole seconds, in UTC.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Final
from zoneinfo import ZoneInfo

from croniter import croniter
from croniter.croniter import CroniterBadDateError

from flowmesh.contracts.timezones import open_zone

SECOND: Final = timedelta(seconds=1)
MAX_SHIFT: Final = timedelta(hours=3)
"""Longer than any daylight-saving shift there is (Antarctica/Troll's two hours)."""
_SEGMENTS: Final = 64
"""Offset changes crossed in one search before giving up (a year of a zone changing weekly)."""
_SCAN_STEP: Final = timedelta(days=7)
"""Offsets are compared at least this often: no zone changes offset and back within a week."""


class InvalidCron(ValueError):
    """A cron expression or time zone the scheduler cannot use."""


@dataclass(frozen=True, slots=True)
class CronSpec:
    """A parsed schedule: the expression, its zone, and how its fields are laid out."""

    expression: str
    timezone: str
    seconds_first: bool
    hour_wildcard: bool
    zone: ZoneInfo = field(compare=False, repr=False)


@lru_cache(maxsize=4096)
def parse(expression: str, timezone: str = "UTC") -> CronSpec:
    """Check and parse a schedule (the same rules as the flows service's trigger validation); cached.

    Raises:
        InvalidCron: not 5 or 6 fields, not a valid expression, or not an IANA zone name.
    """
    fields = expression.split()
    if len(fields) not in (5, 6):
        raise InvalidCron(f"cron {expression!r} has {len(fields)} fields; write 5, or 6 with seconds first")
    seconds_first = len(fields) == 6
    if not croniter.is_valid(expression, second_at_beginning=seconds_first):
        raise InvalidCron(f"cron {expression!r} is not a valid expression")
    try:
        zone = open_zone(timezone)
    except ValueError as exc:
        raise InvalidCron(str(exc)) from exc
    hour = fields[2 if seconds_first else 1]
    return CronSpec(expression, timezone, seconds_first, hour.startswith("*"), zone)


@lru_cache(maxsize=4096)
def _iterator(expression: str, seconds_first: bool) -> croniter:
    # parsing costs ~5x a step: one iterator per expression, repositioned for each question
    return croniter(expression, datetime(2000, 1, 1), second_at_beginning=seconds_first)


def _wall_after(spec: CronSpec, wall: datetime) -> datetime | None:
    """The first matching naive wall-clock time strictly after ``wall`` (None: never again)."""
    it = _iterator(spec.expression, spec.seconds_first)
    it.set_current(wall, force=True)
    try:
        found: datetime = it.get_next(datetime)
    except CroniterBadDateError:
        return None
    return found


def _offset(spec: CronSpec, instant: datetime) -> timedelta:
    off = instant.astimezone(spec.zone).utcoffset()
    assert off is not None
    return off


def _wall(instant: datetime, offset: timedelta) -> datetime:
    return (instant + offset).replace(tzinfo=None)


def _instant(wall: datetime, offset: timedelta) -> datetime:
    return (wall - offset).replace(tzinfo=UTC)


def _floor(instant: datetime) -> datetime:
    return instant.astimezone(UTC).replace(microsecond=0)


def _change_between(spec: CronSpec, start: datetime, end: datetime) -> datetime | None:
    """The first instant in ``(start, end]`` whose UTC offset differs from ``start``'s, to the second."""
    base = _offset(spec, start)
    lo = start
    while lo < end:
        hi = min(lo + _SCAN_STEP, end)
        if _offset(spec, hi) != base:
            # zones change offset on whole seconds: bisect over whole seconds to the first one
            low, high = int(_floor(lo).timestamp()), math.ceil(hi.timestamp())
            while high - low > 1:
                mid = (low + high) // 2
                if _offset(spec, datetime.fromtimestamp(mid, UTC)) != base:
                    high = mid
                else:
                    low = mid
            return datetime.fromtimestamp(high, UTC)
        lo = hi
    return None


def _repeat_end(spec: CronSpec, instant: datetime, wall: datetime) -> datetime | None:
    """When ``instant`` is the second occurrence of ``wall`` (fall back), the instant the repeat ends."""
    first = wall.replace(tzinfo=spec.zone, fold=0).astimezone(UTC)
    if first >= instant:
        return None
    change = _change_between(spec, first, instant)
    assert change is not None
    # the repeated wall times end where the old offset's clock had reached at the change
    return change + (_offset(spec, first) - _offset(spec, instant))


def _gap_due(spec: CronSpec, after: datetime) -> datetime | None:
    """A due time from a spring-forward gap that ended shortly before ``after`` and is still ahead.

    A search that starts inside the moved-forward stretch would otherwise step over it.
    """
    before = after - MAX_SHIFT
    change = _change_between(spec, before, after)
    if change is None:
        return None
    old, new = _offset(spec, before), _offset(spec, change)
    if new <= old:
        return None
    wall = _wall_after(spec, _wall(after, old))
    if wall is not None and wall < _wall(change, new):
        return _instant(wall, old)
    return None


def next_due(spec: CronSpec, after: datetime) -> datetime | None:
    """The first due time strictly after ``after``, or None if the expression never matches again."""
    start = _floor(after) + SECOND  # inclusive: due times are whole seconds
    gap = _gap_due(spec, after)
    for _ in range(_SEGMENTS):
        off = _offset(spec, start)
        wall = _wall_after(spec, _wall(start, off) - SECOND)
        if wall is None:
            return gap
        cand = _instant(wall, off)
        if gap is not None and cand > gap:
            return gap
        change = _change_between(spec, start, cand)
        if change is None:
            end = _repeat_end(spec, cand, wall) if not spec.hour_wildcard else None
            if end is None:
                return cand if gap is None else min(gap, cand)
            start = max(end, cand + SECOND)  # a second occurrence of a fixed-hour time: not due
            continue
        new = _offset(spec, change)
        if new > off and wall < _wall(change, new):
            # the match lies in the gap the change opens: due once, moved forward (rule 2)
            gap = cand if gap is None else min(gap, cand)
        start = change
    raise InvalidCron(f"cron {spec.expression!r} in {spec.timezone}: no due time found after {after.isoformat()}")


def first_due(spec: CronSpec, changed_at: datetime) -> datetime | None:
    """The first due time at least one second after a change (a new, re-enabled or edited schedule)."""
    return next_due(spec, changed_at + SECOND - timedelta(microseconds=1))


def due_between(spec: CronSpec, after: datetime, until: datetime, *, limit: int) -> list[datetime]:
    """The due times in ``(after, until]``, oldest first, at most ``limit`` of them."""
    found: list[datetime] = []
    current = after
    while len(found) < limit:
        due = next_due(spec, current)
        if due is None or due > until:
            break
        found.append(due)
        current = due
    return found


def last_due(spec: CronSpec, until: datetime, *, not_before: datetime) -> datetime | None:
    """The latest due time in ``[not_before, until]``, without walking every due time in between.

    Looks back over windows that double (1 s, 2 s, 4 s, …): a per-second cron missed for a week
    costs a handful of steps, not 600,000.
    """
    floor = not_before - timedelta(microseconds=1)
    window = SECOND
    while True:
        start = max(until - window, floor)
        due = next_due(spec, start)
        if due is not None and due <= until:
            while (later := next_due(spec, due)) is not None and later <= until:
                due = later
            return due
        if start <= floor:
            return None
        window *= 2
