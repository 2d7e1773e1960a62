"""Metering rules, periods, plan arithmetic and quota snapshots, without I/O."""

from __future__ import annotations

import csv
import io
import itertools
import random
from datetime import UTC, date, datetime
from typing import Any

import pytest

from flowmesh.contracts.errors import InvalidInput
from flowmesh.contracts.ids import format_time, new_id
from flowmesh.contracts.models.usage import UsageDay
from flowmesh.contracts.plans import ENTERPRISE, FREE, PRO
from flowmesh.usage.domain import (
    CSV_COLUMNS,
    Counts,
    MalformedEvent,
    Period,
    aggregate,
    clean_key,
    export_range,
    key_hint,
    merge_quota,
    overage_usd,
    period_of,
    read_event,
    render_csv,
    summary,
    tenant_quota,
    unique,
)

NOW = datetime(2026, 3, 20, 15, 30, tzinfo=UTC)
RUN, FLOW = new_id(), new_id()


def ev(type_: str, *, at: datetime = NOW, seq: int = 1, tenant: str = "acme", run: str = RUN, **data: Any) -> Any:
    return {
        "id": new_id(),
        "seq": seq,
        "type": type_,
        "ts": format_time(at),
        "tenantId": tenant,
        "runId": run,
        "flowId": FLOW,
        "version": 1,
        "data": data,
    }


def counts(payload: Any) -> dict[str, int]:
    return {k: v for k, v in read_event(payload).counts.as_dict().items() if v}


def test_a_new_top_level_run_counts_and_a_retry_in_place_does_not() -> None:
    assert counts(ev("run.queued", status="queued", triggerType="manual", parentRunId=None)) == {"runs": 1}
    assert counts(ev("run.queued", status="queued", triggerType="retry")) == {"runs": 1}  # fromStart: a new run
    assert counts(ev("run.queued", status="queued", retryCount=1)) == {}
    assert counts(ev("run.queued", status="queued", parentRunId=new_id())) == {"child_runs": 1}
    assert counts(ev("run.started", status="running")) == {}


def test_outcomes_count_for_top_level_runs_and_quota_refusals_apart() -> None:
    assert counts(ev("run.succeeded", durationMs=5, parentRunId=None)) == {"runs_succeeded": 1}
    assert counts(ev("run.timedOut", durationMs=5)) == {"runs_timed_out": 1}
    assert counts(ev("run.cancelled", durationMs=5, parentRunId=new_id())) == {}
    refused = ev("run.failed", durationMs=0, error={"type": "quota-exceeded", "message": "over"})
    assert counts(refused) == {"runs_refused": 1} and read_event(refused).run is None
    failed = read_event(ev("run.failed", seq=9, durationMs=7, error={"type": "fail", "message": "x"}))
    assert failed.counts.runs_failed == 1
    assert failed.run is not None and (failed.run.status, failed.run.duration_ms, failed.run.final_seq) == (
        "failed",
        7,
        9,
    )


def test_finished_steps_count_without_the_trigger_with_duration_and_tokens() -> None:
    assert counts(ev("step.succeeded", stepType="trigger", durationMs=0)) == {}
    assert counts(ev("step.succeeded", stepType="http", durationMs=120)) == {"steps": 1, "step_ms": 120}
    assert counts(ev("step.failed", stepType="http", durationMs=3, handled=True)) == {"steps": 1, "step_ms": 3}
    llm = ev("step.succeeded", stepType="llm", durationMs=900, usage={"inputTokens": 100, "outputTokens": 25})
    assert counts(llm) == {"steps": 1, "step_ms": 900, "input_tokens": 100, "output_tokens": 25}
    odd = ev("step.succeeded", stepType="llm", durationMs=-1, usage={"inputTokens": True, "outputTokens": "9"})
    assert counts(odd) == {"steps": 1}
    for other in ("step.started", "step.retrying", "step.waiting", "step.skipped", "run.waiting", "run.resumed"):
        assert counts(ev(other, stepType="http", durationMs=5)) == {}


@pytest.mark.parametrize(
    "broken",
    [
        None,
        [],
        {"id": "x"},
        {**ev("run.queued"), "id": "not-a-uuid"},
        {**ev("run.queued"), "tenantId": ""},
        {**ev("run.queued"), "runId": 7},
        {**ev("run.queued"), "flowId": "f"},
        {**ev("run.queued"), "type": None},
        {**ev("run.queued"), "ts": "yesterday"},
        {**ev("run.queued"), "ts": "2026-03-20T10:00:00"},
    ],
)
def test_what_is_not_a_run_event_is_refused(broken: Any) -> None:
    with pytest.raises(MalformedEvent):
        read_event(broken)


def test_days_are_utc_days_of_the_event_time() -> None:
    late = datetime.fromisoformat("2026-03-31T23:30:00-02:00")  # 1 April in UTC
    assert read_event(ev("run.queued", at=late)).day == date(2026, 4, 1)


def test_a_batch_sums_per_tenant_and_period_whatever_the_order() -> None:
    other = new_id()
    events = [
        ev("run.queued", seq=1),
        ev("step.succeeded", seq=2, stepType="http", durationMs=10),
        ev("run.failed", seq=3, durationMs=30, error={"type": "x"}),
        ev("run.queued", seq=4, retryCount=1),
        ev("run.succeeded", seq=5, durationMs=40),
        ev("run.queued", seq=1, run=other, tenant="globex", at=datetime(2026, 2, 28, 23, 59, tzinfo=UTC)),
        ev("run.queued", seq=1, run=new_id(), at=datetime(2026, 3, 1, tzinfo=UTC)),
    ]
    metered = [read_event(e) for e in events]
    results = set()
    for order in itertools.islice(itertools.permutations(metered), 0, None, 97):
        batch = aggregate(order)
        results.add(
            (
                tuple(sorted((k, tuple(v.as_dict().values())) for k, v in batch.daily.items())),
                tuple(sorted((k, tuple(v.as_dict().values())) for k, v in batch.monthly.items())),
                tuple(sorted(batch.runs.items())),
            )
        )
    assert len(results) == 1
    batch = aggregate(metered)
    assert batch.monthly[("acme", date(2026, 3, 1))].runs == 2
    assert batch.daily[("acme", NOW.date())] == Counts(runs=1, runs_failed=1, runs_succeeded=1, steps=1, step_ms=10)
    assert batch.monthly[("globex", date(2026, 2, 1))] == Counts(runs=1)
    fact = batch.runs[RUN]
    assert (fact.status, fact.duration_ms, fact.final_seq, fact.queued_at) == ("succeeded", 40, 5, NOW)


def test_unique_keeps_each_event_once_and_drops_those_that_change_nothing() -> None:
    queued = read_event(ev("run.queued"))
    started = read_event(ev("run.started"))
    assert unique([queued, started, queued]) == [queued]


def test_periods_are_calendar_months_in_utc() -> None:
    current = period_of("current", NOW)
    assert (current.key, current.start, current.end) == (
        "2026-03",
        datetime(2026, 3, 1, tzinfo=UTC),
        datetime(2026, 4, 1, tzinfo=UTC),
    )
    assert current.days_remaining(NOW) == 12  # 20 to 31 March, today included
    assert period_of("previous", datetime(2026, 1, 5, tzinfo=UTC)).key == "2025-12"
    december = period_of("2025-12", NOW)
    assert december.end == datetime(2026, 1, 1, tzinfo=UTC) and december.days_remaining(NOW) == 0
    assert Period(date(2026, 5, 1)).days_remaining(NOW) == 31
    for bad in ("2026-13", "last", "2026-3", ""):
        with pytest.raises(InvalidInput):
            period_of(bad, NOW)


def test_the_summary_against_each_kind_of_plan() -> None:
    used = Counts(runs=1_500, steps=9_000, input_tokens=700, output_tokens=300)
    free = summary(FREE, period_of("current", NOW), used, NOW)
    assert (free.runs_limit, free.runs_percentage, free.estimated_overage) == (1_000, 150.0, 0.0)
    assert (free.steps_used, free.tokens_used, free.days_remaining) == (9_000, 1_000, 12)
    pro = summary(PRO, period_of("current", NOW), Counts(runs=100_001), NOW)
    assert pro.runs_percentage == 100.0 and pro.estimated_overage == 0.0
    assert overage_usd(PRO, 102_500) == 1.25  # 2,500 over at $0.50 per 1,000
    assert overage_usd(PRO, 100_999) == 0.5
    unlimited = summary(ENTERPRISE, period_of("current", NOW), used, NOW)
    assert (unlimited.runs_limit, unlimited.runs_percentage, unlimited.estimated_overage) == (None, None, 0.0)


def test_a_quota_is_exhausted_only_when_the_plan_refuses_overage() -> None:
    period = period_of("current", NOW)
    assert tenant_quota("t", FREE, 0, period, 999, NOW).runs_exhausted is False
    assert tenant_quota("t", FREE, 0, period, 1_000, NOW).runs_exhausted is True
    assert tenant_quota("t", PRO, 1, period, 200_000, NOW).runs_exhausted is False
    assert tenant_quota("t", ENTERPRISE, 1, period, 10**9, NOW).runs_exhausted is False


def test_snapshots_never_go_backwards() -> None:
    march, april = period_of("current", NOW), period_of("2026-04", NOW)
    base = tenant_quota("t", FREE, 0, march, 10, NOW)
    assert merge_quota(None, base) == base
    assert merge_quota(base, tenant_quota("t", FREE, 0, march, 10, NOW)) is None  # nothing new
    assert merge_quota(base, tenant_quota("t", FREE, 0, march, 9, NOW)) is None  # an older count
    assert merge_quota(base, tenant_quota("t", FREE, 0, march, 11, NOW)).runs_used == 11  # type: ignore[union-attr]
    upgraded = tenant_quota("t", PRO, 3, march, 10, NOW)
    stale_plan_newer_runs = tenant_quota("t", FREE, 2, march, 12, NOW)
    merged = merge_quota(upgraded, stale_plan_newer_runs)
    assert merged is not None and (merged.plan, merged.plan_revision, merged.runs_used) == ("pro", 3, 12)
    assert merged.runs_limit == 100_000 and merged.overage_allowed is True
    assert merge_quota(merged, tenant_quota("t", FREE, 0, march, 1_000, NOW)) is not None
    next_month = merge_quota(merged, tenant_quota("t", PRO, 3, april, 1, NOW))
    assert next_month is not None and (next_month.period, next_month.runs_used) == ("2026-04", 1)
    assert merge_quota(next_month, tenant_quota("t", PRO, 3, march, 50, NOW)) is None  # last month's count
    exhausted = merge_quota(tenant_quota("t", PRO, 1, march, 5_000, NOW), tenant_quota("t", FREE, 2, march, 0, NOW))
    assert exhausted is not None and exhausted.plan == "free" and exhausted.runs_exhausted is True


def test_export_ranges_default_to_this_month_and_are_bounded() -> None:
    today = NOW.date()
    assert export_range(None, None, today) == (date(2026, 3, 1), today)
    assert export_range(date(2026, 3, 25), None, today) == (date(2026, 3, 25), date(2026, 3, 25))
    assert export_range(date(2025, 3, 20), date(2026, 3, 20), today) == (date(2025, 3, 20), date(2026, 3, 20))
    with pytest.raises(InvalidInput, match="after"):
        export_range(date(2026, 3, 2), date(2026, 3, 1), today)
    with pytest.raises(InvalidInput, match="366"):
        export_range(date(2025, 3, 19), date(2026, 3, 20), today)


def test_csv_has_a_header_and_one_line_per_day() -> None:
    days = [
        UsageDay(date=date(2026, 3, d), tenant_id='a "quoted", tenant', **Counts(runs=d, steps=2 * d).as_dict())
        for d in (1, 2)
    ]
    text = render_csv(days)
    assert text.count("\r\n") == 3
    rows = list(csv.DictReader(io.StringIO(text)))
    assert list(rows[0]) == list(CSV_COLUMNS)
    assert rows[1]["date"] == "2026-03-02" and rows[1]["tenantId"] == 'a "quoted", tenant'
    assert (rows[1]["runs"], rows[1]["steps"], rows[1]["stepMs"]) == ("2", "4", "0")


def test_keys_are_cleaned_and_hinted_by_their_last_four_characters() -> None:
    key = "sk-" + "".join(random.choices("abcdef0123456789", k=40))
    assert clean_key(f"\t{key}\n") == key
    assert key_hint(key) == "…" + key[-4:]
    assert key_hint("short-key") == "…"
    for bad in ("", " ", "two words", "tab\tinside", "é" * 20):
        with pytest.raises(InvalidInput):
            clean_key(bad)
