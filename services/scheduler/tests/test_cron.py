"""Due times of cron expressions: plain cases, seconds first, and daylight-saving changes (pure).

The DST rules (module docstring of ``flowmesh.scheduler.cron``): a missing wall-clock time is due
once, moved forward by the gap; a repeated one is due at its first occurrence only, unless the hour
field starts with ``*``. Beyond hand-checked cases, every expression is compared with a brute-force
oracle that looks at every minute (or second) around each change.
"""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from croniter import croniter

from flowmesh.scheduler.cron import InvalidCron, due_between, first_due, last_due, next_due, parse


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)  # type: ignore[misc]


def walk(expr: str, tz: str, start: datetime, end: datetime) -> list[datetime]:
    spec = parse(expr, tz)
    out: list[datetime] = []
    current = start
    while (due := next_due(spec, current)) is not None and due <= end:
        assert due > current
        out.append(due)
        current = due
    return out


def local(values: list[datetime], tz: str) -> list[str]:
    zone = ZoneInfo(tz)
    return [v.astimezone(zone).strftime("%m-%d %H:%M:%S%z") for v in values]


def oracle(expr: str, tz: str, start: datetime, end: datetime, *, step: timedelta) -> list[datetime]:
    """Every due time in ``(start, end]`` by the rules, found by looking at every ``step``."""
    zone = ZoneInfo(tz)
    fields = expr.split()
    seconds = len(fields) == 6
    wildcard = fields[2 if seconds else 1].startswith("*")
    found: set[datetime] = set()
    t = start.replace(second=0, microsecond=0)
    while t <= end:
        wall = t.astimezone(zone).replace(tzinfo=None)
        if t > start and croniter.match(expr, wall, second_at_beginning=seconds):
            first = wall.replace(tzinfo=zone, fold=0).astimezone(UTC)
            if first == t or wildcard:
                found.add(t)
        t += step
    # wall-clock times that do not exist: due once, at their moved-forward instant
    # (a gap is at most an hour here: its walls lie within an hour of the window's)
    wall = (start - timedelta(hours=1)).astimezone(zone).replace(tzinfo=None, second=0, microsecond=0)
    last = end.astimezone(zone).replace(tzinfo=None)
    while wall <= last:
        there = wall.replace(tzinfo=zone).astimezone(UTC)
        exists = there.astimezone(zone).replace(tzinfo=None) == wall
        if not exists and croniter.match(expr, wall, second_at_beginning=seconds):
            moved = wall.replace(tzinfo=zone, fold=0).astimezone(UTC)
            if start < moved <= end:
                found.add(moved)
        wall += step
    return sorted(found)


# transitions of 2024: Paris 31 Mar 01:00Z (+1 → +2), 27 Oct 01:00Z (+2 → +1);
# New York 10 Mar 07:00Z (-5 → -4), 3 Nov 06:00Z (-4 → -5)
CHANGES = [
    ("Europe/Paris", utc(2024, 3, 31, 1)),
    ("Europe/Paris", utc(2024, 10, 27, 1)),
    ("America/New_York", utc(2024, 3, 10, 7)),
    ("America/New_York", utc(2024, 11, 3, 6)),
]


def test_five_fields_due_times_are_the_matching_minutes() -> None:
    assert walk("*/20 * * * *", "UTC", utc(2024, 1, 1, 0, 5), utc(2024, 1, 1, 1, 0)) == [
        utc(2024, 1, 1, 0, 20),
        utc(2024, 1, 1, 0, 40),
        utc(2024, 1, 1, 1, 0),
    ]


def test_six_fields_put_seconds_first() -> None:
    assert walk("15,45 * * * * *", "UTC", utc(2024, 1, 1), utc(2024, 1, 1, 0, 1, 15)) == [
        utc(2024, 1, 1, 0, 0, 15),
        utc(2024, 1, 1, 0, 0, 45),
        utc(2024, 1, 1, 0, 1, 15),
    ]


def test_next_due_is_strictly_after_even_on_a_due_time_with_fractions() -> None:
    spec = parse("* * * * * *")
    assert next_due(spec, utc(2024, 1, 1, 0, 0, 5)) == utc(2024, 1, 1, 0, 0, 6)
    assert next_due(spec, utc(2024, 1, 1, 0, 0, 4).replace(microsecond=999_999)) == utc(2024, 1, 1, 0, 0, 5)


def test_first_due_is_at_least_one_second_after_the_change() -> None:
    spec = parse("* * * * * *")
    assert first_due(spec, utc(2024, 1, 1, 0, 0, 0)) == utc(2024, 1, 1, 0, 0, 1)
    assert first_due(spec, utc(2024, 1, 1, 0, 0, 0).replace(microsecond=1000)) == utc(2024, 1, 1, 0, 0, 2)
    assert first_due(parse("30 * * * * *"), utc(2024, 1, 1, 0, 0, 29, 500_000)) == utc(2024, 1, 1, 0, 1, 30)


def test_a_time_zone_moves_due_times_by_its_offset() -> None:
    assert walk("0 9 * * *", "Asia/Kolkata", utc(2024, 1, 1), utc(2024, 1, 2)) == [utc(2024, 1, 1, 3, 30)]


def test_an_expression_that_never_matches_has_no_due_time() -> None:
    assert next_due(parse("0 0 31 2 *"), utc(2024, 1, 1)) is None


@pytest.mark.parametrize(
    ("expr", "tz"),
    [("0 0 * * * *", "UTC"), ("17 * * * *", "Europe/Paris"), ("@hourly", "UTC"), ("* * * * *", "Mars/Olympus")],
)
def test_unusable_expressions_and_zones_are_refused(expr: str, tz: str) -> None:
    if expr == "0 0 * * * *":
        parse(expr, tz)  # six fields, seconds first: fine
        with pytest.raises(InvalidCron):
            parse("0 0 * * * * *", tz)
    elif expr == "17 * * * *":
        parse(expr, tz)
        with pytest.raises(InvalidCron):
            parse("61 * * * *", tz)
    else:
        with pytest.raises(InvalidCron):
            parse(expr, tz)


# --- spring forward -------------------------------------------------------------------------------


def test_paris_spring_forward_fires_a_missing_daily_time_once_an_hour_later() -> None:
    due = walk("30 2 * * *", "Europe/Paris", utc(2024, 3, 29, 12), utc(2024, 4, 1, 12))
    assert local(due, "Europe/Paris") == ["03-30 02:30:00+0100", "03-31 03:30:00+0200", "04-01 02:30:00+0200"]


def test_new_york_spring_forward_fires_a_missing_daily_time_once() -> None:
    due = walk("15 2 * * *", "America/New_York", utc(2024, 3, 9, 6), utc(2024, 3, 11, 12))
    assert local(due, "America/New_York") == ["03-09 02:15:00-0500", "03-10 03:15:00-0400", "03-11 02:15:00-0400"]


def test_spring_forward_keeps_an_hourly_cadence_in_real_time_without_doubles() -> None:
    due = walk("0 * * * *", "Europe/Paris", utc(2024, 3, 30, 22), utc(2024, 3, 31, 4))
    assert [b - a for a, b in itertools.pairwise(due)] == [timedelta(hours=1)] * (len(due) - 1)
    assert len(set(due)) == len(due)


def test_a_schedule_created_inside_the_moved_hour_still_gets_its_moved_time() -> None:
    # created at 03:10 CEST on the day 02:30 does not exist: 02:30 is due at 03:30 CEST
    due = next_due(parse("30 2 * * *", "Europe/Paris"), utc(2024, 3, 31, 1, 10))
    assert due == utc(2024, 3, 31, 1, 30)


# --- fall back --------------------------------------------------------------------------------------


def test_paris_fall_back_fires_a_repeated_daily_time_once() -> None:
    due = walk("30 2 * * *", "Europe/Paris", utc(2024, 10, 26, 12), utc(2024, 10, 28, 12))
    assert local(due, "Europe/Paris") == ["10-27 02:30:00+0200", "10-28 02:30:00+0100"]


def test_new_york_fall_back_fires_a_repeated_daily_time_once() -> None:
    due = walk("30 1 * * *", "America/New_York", utc(2024, 11, 2, 12), utc(2024, 11, 4, 12))
    assert local(due, "America/New_York") == ["11-03 01:30:00-0400", "11-04 01:30:00-0500"]


def test_fall_back_fires_a_wildcard_hour_cron_in_both_passes() -> None:
    due = walk("0 * * * *", "America/New_York", utc(2024, 11, 3, 3, 30), utc(2024, 11, 3, 8))
    assert local(due, "America/New_York") == [
        "11-03 00:00:00-0400",
        "11-03 01:00:00-0400",
        "11-03 01:00:00-0500",
        "11-03 02:00:00-0500",
        "11-03 03:00:00-0500",
    ]
    assert [b - a for a, b in itertools.pairwise(due)] == [timedelta(hours=1)] * 4


def test_fall_back_fires_a_fixed_hour_range_once_per_wall_time() -> None:
    due = walk("0,30 1-3 * * *", "Europe/Paris", utc(2024, 10, 26, 22), utc(2024, 10, 27, 4))
    assert local(due, "Europe/Paris") == [
        "10-27 01:00:00+0200",
        "10-27 01:30:00+0200",
        "10-27 02:00:00+0200",
        "10-27 02:30:00+0200",
        "10-27 03:00:00+0100",
        "10-27 03:30:00+0100",
    ]


# --- against the oracle ---------------------------------------------------------------------------

EXPRESSIONS = [
    "30 2 * * *",
    "0 * * * *",
    "*/15 * * * *",
    "0,30 1-3 * * *",
    "* 2 * * *",
    "45 1 * * *",
    "0 */2 * * *",
    "7 2,3 * * *",
    "*/7 1,2 * * *",
]


@pytest.mark.parametrize("expr", EXPRESSIONS)
@pytest.mark.parametrize(("tz", "change"), CHANGES, ids=[f"{z}-{c:%m%d}" for z, c in CHANGES])
def test_due_times_around_each_change_match_the_oracle(expr: str, tz: str, change: datetime) -> None:
    start, end = change - timedelta(hours=8), change + timedelta(hours=8)
    expected = oracle(expr, tz, start, end, step=timedelta(minutes=1))
    assert walk(expr, tz, start, end) == expected
    # and from any starting point, not only from the previous due time
    spec = parse(expr, tz)
    t = change - timedelta(hours=4)
    while t < change + timedelta(hours=4):
        want = next((e for e in expected if e > t), None)
        got = next_due(spec, t)
        assert (got if got is not None and got <= end else None) == want, t
        t += timedelta(minutes=7, seconds=13)


@pytest.mark.parametrize(("tz", "change"), [CHANGES[0], CHANGES[3]], ids=["Paris-spring", "New_York-fall"])
def test_a_seconds_cron_around_a_change_matches_the_oracle(tz: str, change: datetime) -> None:
    start, end = change - timedelta(minutes=20), change + timedelta(minutes=80)
    expected = oracle("*/20 * * * * *", tz, start, end, step=timedelta(seconds=1))
    assert walk("*/20 * * * * *", tz, start, end) == expected


def test_a_half_hour_shift_follows_the_same_rules() -> None:
    # Lord Howe Island moves its clocks by 30 minutes
    start, end = utc(2024, 4, 6, 12), utc(2024, 4, 7, 20)
    assert walk("*/10 1 * * *", "Australia/Lord_Howe", start, end) == oracle(
        "*/10 1 * * *", "Australia/Lord_Howe", start, end, step=timedelta(minutes=1)
    )


# --- ranges for misfires --------------------------------------------------------------------------


def test_due_between_is_bounded_and_oldest_first() -> None:
    spec = parse("* * * * * *")
    got = due_between(spec, utc(2024, 1, 1), utc(2024, 1, 2), limit=3)
    assert got == [utc(2024, 1, 1, 0, 0, 1), utc(2024, 1, 1, 0, 0, 2), utc(2024, 1, 1, 0, 0, 3)]


def test_last_due_finds_the_latest_without_walking_a_week_of_seconds() -> None:
    spec = parse("* * * * * *")
    assert last_due(spec, utc(2024, 1, 8, 0, 0, 0, 500), not_before=utc(2024, 1, 1)) == utc(2024, 1, 8)
    yearly = parse("0 0 1 1 *")
    assert last_due(yearly, utc(2024, 6, 1), not_before=utc(2020, 1, 1)) == utc(2024, 1, 1)
    assert last_due(yearly, utc(2024, 6, 1), not_before=utc(2024, 1, 1)) == utc(2024, 1, 1)
    assert last_due(yearly, utc(2024, 6, 1), not_before=utc(2024, 1, 1, 0, 0, 1)) is None


@pytest.mark.parametrize("tz", ["A" * 300, "Europe", "America/Argentina", "Europe/" + "x" * 260, "zone.tab", "../UTC"])
def test_zones_the_database_cannot_open_are_invalid_not_an_os_error(tz: str) -> None:
    with pytest.raises(InvalidCron, match="IANA"):
        parse("* * * * *", tz)
