"""What usage means, without I/O: metering rules, billing periods, plan arithmetic, quota snapshots.

**Metering rules** (what each run event adds to the billed usage). Every rule reads one event
alone, so the counters are sums over events and do not depend on the order of delivery:

- ``run.queued`` of a new run (no ``retryCount``, which only a retry in place carries): a run
  (``runs``) when it has no ``parentRunId``, else a child run (``child_runs``). A retry in place
  reopens the same run and is not a new run; a retry ``fromStart`` is.
- ``run.succeeded|failed|cancelled|timedOut`` of a top-level run: ``runs_<status>``, one per
  outcome (a run retried in place has one per attempt). A ``run.failed`` whose error type is
  ``quota-exceeded`` is a start the plan refused: ``runs_refused``, and no statistics.
- ``step.succeeded`` and ``step.failed`` of any step but the trigger: a step (``steps``), its
  ``durationMs`` (``step_ms``), and ``data.usage.inputTokens|outputTokens`` when present (``llm``).
- Everything else (``*.started``, ``*.waiting``, ``step.retrying``, ``step.skipped`` …) adds nothing.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, fields, replace
from datetime import UTC, date, datetime, time
from typing import Any, Final

from flowmesh.contracts.errors import InvalidInput
from flowmesh.contracts.ids import is_uuid
from flowmesh.contracts.models import FieldError
from flowmesh.contracts.models.run_events import (
    RunEndedData,
    RunQueuedData,
    StepFailedData,
    StepSucceededData,
    event_data,
)
from flowmesh.contracts.models.usage import MAX_SECRET_BYTES, Plan, PlanCaps, TenantQuota, UsageDay, UsageSummary

COUNTERS: Final = (
    "runs",
    "child_runs",
    "runs_succeeded",
    "runs_failed",
    "runs_cancelled",
    "runs_timed_out",
    "runs_refused",
    "steps",
    "step_ms",
    "input_tokens",
    "output_tokens",
)
"""The counters kept per tenant per day and per month (column names)."""

PLAN_CAPS: Final = tuple(PlanCaps.model_fields)
"""The caps of a plan (columns of the plans table, NULL: no cap)."""

FINAL_RUN_EVENTS: Final = {
    "run.succeeded": "succeeded",
    "run.failed": "failed",
    "run.cancelled": "cancelled",
    "run.timedOut": "timedOut",
}
STATUS_COUNTER: Final = {
    "succeeded": "runs_succeeded",
    "failed": "runs_failed",
    "cancelled": "runs_cancelled",
    "timedOut": "runs_timed_out",
}
FINAL_STEP_EVENTS: Final = frozenset({"step.succeeded", "step.failed"})
METERED_TYPES: Final = frozenset({"run.queued", *FINAL_RUN_EVENTS, *FINAL_STEP_EVENTS})
"""The only event types that can add anything; the others need not even be decoded."""
METERED_SUFFIXES: Final = tuple(sorted("." + t for t in METERED_TYPES))
"""Run event subjects end with their type (``fm.runs.{t}.{flowId}.{runId}.<type>``)."""
QUOTA_EXCEEDED: Final = "quota-exceeded"
MAX_EXPORT_DAYS: Final = 366


@dataclass(slots=True)
class Counts:
    """A set of counters; ``+=`` adds another."""

    runs: int = 0
    child_runs: int = 0
    runs_succeeded: int = 0
    runs_failed: int = 0
    runs_cancelled: int = 0
    runs_timed_out: int = 0
    runs_refused: int = 0
    steps: int = 0
    step_ms: int = 0
    input_tokens: int = 0
    output_tokens: int = 0

    def __iadd__(self, other: Counts) -> Counts:
        for name in COUNTERS:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        return self

    def __bool__(self) -> bool:
        return any(getattr(self, name) for name in COUNTERS)

    def as_dict(self) -> dict[str, int]:
        """The counters by column name."""
        return {name: getattr(self, name) for name in COUNTERS}

    @classmethod
    def from_row(cls, row: Any) -> Counts:
        """Counters from a row (mapping) holding every counter column; a missing row is all zeros."""
        if row is None:
            return cls()
        return cls(**{name: int(row[name]) for name in COUNTERS})


assert tuple(f.name for f in fields(Counts)) == COUNTERS


@dataclass(frozen=True, slots=True)
class RunFact:
    """What events say about one run, for flow statistics: when it was queued, its latest outcome."""

    run_id: str
    tenant_id: str
    flow_id: str
    queued_at: datetime | None = None
    final_seq: int | None = None
    status: str | None = None
    duration_ms: int | None = None
    completed_at: datetime | None = None

    @property
    def finished(self) -> bool:
        """Whether a final event is known."""
        return self.final_seq is not None

    def merge(self, other: RunFact) -> RunFact:
        """Both facts together: the earliest queue time, the outcome with the highest ``seq``."""
        queued = [t for t in (self.queued_at, other.queued_at) if t is not None]
        mine = -1 if self.final_seq is None else self.final_seq
        theirs = -1 if other.final_seq is None else other.final_seq
        latest = other if theirs > mine else self
        return replace(latest, queued_at=min(queued) if queued else None)


@dataclass(frozen=True, slots=True)
class Metered:
    """One run event's contribution: counters on its tenant's day, and a fact about its run."""

    event_id: str
    tenant_id: str
    day: date
    counts: Counts
    run: RunFact | None = None
    at: datetime | None = None
    """When the event happened (its ``ts``): metering lag is measured from it."""

    @property
    def matters(self) -> bool:
        """Whether it changes anything (events that do not are not even recorded as metered)."""
        return bool(self.counts) or self.run is not None


class MalformedEvent(ValueError):
    """A message on the run events stream that is not a run event we can read."""


def _time(value: Any) -> datetime:
    if not isinstance(value, str):
        raise MalformedEvent("ts is not a string")
    try:
        ts = datetime.fromisoformat(value)
    except ValueError as exc:
        raise MalformedEvent(f"ts {value!r} is not an RFC 3339 time") from exc
    if ts.tzinfo is None:
        raise MalformedEvent(f"ts {value!r} has no offset")
    return ts.astimezone(UTC)


def read_event(payload: Any) -> Metered:
    """The contribution of one run event (module docstring: the rules).

    Raises:
        MalformedEvent: not an object with a UUID ``id``, ``runId`` and ``flowId``, a ``tenantId``,
            a ``type`` and an RFC 3339 ``ts``.
    """
    if not isinstance(payload, dict):
        raise MalformedEvent("not a JSON object")
    event_id, tenant, run_id, flow_id, kind = (payload.get(k) for k in ("id", "tenantId", "runId", "flowId", "type"))
    if not isinstance(event_id, str) or not is_uuid(event_id):
        raise MalformedEvent("id is not a UUID")
    if not isinstance(tenant, str) or not tenant:
        raise MalformedEvent("tenantId is missing")
    if not isinstance(run_id, str) or not is_uuid(run_id) or not isinstance(flow_id, str) or not is_uuid(flow_id):
        raise MalformedEvent("runId or flowId is not a UUID")
    if not isinstance(kind, str):
        raise MalformedEvent("type is not a string")
    ts = _time(payload.get("ts"))
    data = event_data(kind, payload.get("data"))
    counts = Counts()
    run: RunFact | None = None
    top_level = getattr(data, "parent_run_id", None) is None
    if isinstance(data, RunQueuedData) and not data.retry_count:
        if top_level:
            counts.runs = 1
        else:
            counts.child_runs = 1
        run = RunFact(run_id, tenant, flow_id, queued_at=ts)
    elif kind in FINAL_RUN_EVENTS and isinstance(data, RunEndedData):
        status = FINAL_RUN_EVENTS[kind]
        if status == "failed" and data.error is not None and data.error.type == QUOTA_EXCEEDED:
            counts.runs_refused = 1
        else:
            if top_level:
                setattr(counts, STATUS_COUNTER[status], 1)
            seq = payload.get("seq")
            run = RunFact(
                run_id,
                tenant,
                flow_id,
                final_seq=seq if isinstance(seq, int) and not isinstance(seq, bool) else 0,
                status=status,
                duration_ms=data.duration_ms,
                completed_at=ts,
            )
    elif isinstance(data, StepSucceededData | StepFailedData) and data.step_type != "trigger":
        counts.steps = 1
        counts.step_ms = data.duration_ms or 0
        usage = data.usage if isinstance(data, StepSucceededData) else None
        if usage is not None:
            counts.input_tokens = usage.input_tokens or 0
            counts.output_tokens = usage.output_tokens or 0
    return Metered(event_id, tenant, ts.date(), counts, run, at=ts)


@dataclass(slots=True)
class Batch:
    """A batch of new events summed per tenant per day and per month, and merged per run."""

    daily: dict[tuple[str, date], Counts] = field(default_factory=dict)
    monthly: dict[tuple[str, date], Counts] = field(default_factory=dict)
    runs: dict[str, RunFact] = field(default_factory=dict)

    def add(self, event: Metered) -> None:
        """Add one event's contribution."""
        if event.counts:
            for sums, key in ((self.daily, event.day), (self.monthly, month_of(event.day))):
                counts = sums.setdefault((event.tenant_id, key), Counts())
                counts += event.counts
        if event.run is not None:
            known = self.runs.get(event.run.run_id)
            self.runs[event.run.run_id] = event.run if known is None else known.merge(event.run)


def aggregate(events: Iterable[Metered]) -> Batch:
    """Sum events in memory, so a batch updates each counter row once (a hot tenant is one upsert)."""
    batch = Batch()
    for event in events:
        batch.add(event)
    return batch


def unique(events: Iterable[Metered]) -> list[Metered]:
    """The events that matter, each id once, in id order (locks are then taken in one global order)."""
    seen: dict[str, Metered] = {}
    for event in events:
        if event.matters:
            seen.setdefault(event.event_id, event)
    return [seen[k] for k in sorted(seen)]


# --- billing periods ------------------------------------------------------------------------------


def month_of(day: date) -> date:
    """The first day of ``day``'s month."""
    return day.replace(day=1)


def next_month(month: date) -> date:
    """The first day of the month after ``month`` (a first day)."""
    return date(month.year + 1, 1, 1) if month.month == 12 else date(month.year, month.month + 1, 1)


def previous_month(month: date) -> date:
    """The first day of the month before ``month`` (a first day)."""
    return date(month.year - 1, 12, 1) if month.month == 1 else date(month.year, month.month - 1, 1)


@dataclass(frozen=True, slots=True)
class Period:
    """A billing period: a calendar month, UTC. ``end`` is the first instant of the next month."""

    month: date

    @property
    def start(self) -> datetime:
        """The first instant of the month."""
        return datetime.combine(self.month, time(), UTC)

    @property
    def end(self) -> datetime:
        """The first instant of the next month (exclusive end)."""
        return datetime.combine(next_month(self.month), time(), UTC)

    @property
    def key(self) -> str:
        """``YYYY-MM``."""
        return f"{self.month.year:04d}-{self.month.month:02d}"

    def days_remaining(self, now: datetime) -> int:
        """Days left in the period, today included (0 once it is over)."""
        today = now.astimezone(UTC).date()
        if today >= next_month(self.month):
            return 0
        return (next_month(self.month) - max(today, self.month)).days


_MONTH = re.compile(r"([0-9]{4})-(0[1-9]|1[0-2])")


def period_of(spec: str, now: datetime) -> Period:
    """The period ``current``, ``previous`` or ``YYYY-MM`` names, as of ``now``.

    Raises:
        InvalidInput: any other spec.
    """
    current = month_of(now.astimezone(UTC).date())
    if spec == "current":
        return Period(current)
    if spec == "previous":
        return Period(previous_month(current))
    found = _MONTH.fullmatch(spec)
    if found is None:
        raise InvalidInput(
            f"period {spec!r} is not current, previous or a month as YYYY-MM",
            errors=[FieldError(path="/query/period", message="must be current, previous or YYYY-MM")],
        )
    return Period(date(int(found[1]), int(found[2]), 1))


# --- plans ------------------------------------------------------------------------------------------


def overage_usd(plan: Plan, runs: int) -> float:
    """What the runs over the plan's monthly runs cost, pro rata to the cent (0 when none or refused)."""
    limit, price = plan.runs_per_month, plan.overage_per_1000_runs_usd
    if limit is None or price is None or runs <= limit:
        return 0.0
    return round((runs - limit) * price / 1000, 2)


def runs_percentage(plan: Plan, runs: int) -> float | None:
    """The share of the monthly runs used, in percent to two decimals (None: unlimited)."""
    limit = plan.runs_per_month
    if limit is None:
        return None
    if limit <= 0:
        return 100.0
    return round(runs * 100 / limit, 2)


def summary(plan: Plan, period: Period, counts: Counts, now: datetime) -> UsageSummary:
    """``GET /usage`` for one period."""
    return UsageSummary(
        period_start=period.start,
        period_end=period.end,
        plan=plan.name,
        runs_used=counts.runs,
        runs_limit=plan.runs_per_month,
        steps_used=counts.steps,
        tokens_used=counts.input_tokens + counts.output_tokens,
        runs_percentage=runs_percentage(plan, counts.runs),
        estimated_overage=overage_usd(plan, counts.runs),
        days_remaining=period.days_remaining(now),
        input_tokens=counts.input_tokens,
        output_tokens=counts.output_tokens,
    )


# --- quota snapshots -------------------------------------------------------------------------------


def tenant_quota(
    tenant: str, plan: Plan, plan_revision: int, period: Period, runs_used: int, now: datetime
) -> TenantQuota:
    """A tenant's limits and the month's metered runs, as the quota RPC answers and ``fm_quota`` keeps."""
    limit = plan.runs_per_month
    overage = plan.overage_per_1000_runs_usd is not None
    return TenantQuota(
        tenant_id=tenant,
        plan=plan.name,
        plan_revision=plan_revision,
        period=period.key,
        period_start=period.start,
        period_end=period.end,
        runs_used=runs_used,
        runs_limit=limit,
        runs_in_flight_limit=plan.runs_in_flight,
        flows_limit=plan.flows,
        overage_allowed=overage,
        runs_exhausted=limit is not None and runs_used >= limit and not overage,
        updated_at=now,
        caps=plan.caps(),
    )


_PLAN_FIELDS: Final = (
    "plan",
    "plan_revision",
    "runs_limit",
    "runs_in_flight_limit",
    "flows_limit",
    "overage_allowed",
    "caps",
)
_COUNT_FIELDS: Final = ("period", "period_start", "period_end", "runs_used")


def merge_quota(current: TenantQuota | None, new: TenantQuota) -> TenantQuota | None:
    """What a snapshot should say once ``new`` is known; None when ``current`` already says it.

    Replicas write snapshots concurrently and in any order, so nothing older may overwrite
    anything newer: runs only grow within a month (the later month wins), and a plan change
    carries a revision (an equal revision is the same assignment, read later: limits edited in
    the plans table).
    """
    if current is None or current.tenant_id != new.tenant_id:
        return new
    if new.period != current.period:
        counted = new if new.period > current.period else current
    else:
        counted = new if new.runs_used >= current.runs_used else current
    planned = new if new.plan_revision >= current.plan_revision else current
    values = {
        **{k: getattr(counted, k) for k in _COUNT_FIELDS},
        **{k: getattr(planned, k) for k in _PLAN_FIELDS},
    }
    runs_limit = values["runs_limit"]
    values["runs_exhausted"] = (
        runs_limit is not None and values["runs_used"] >= runs_limit and not values["overage_allowed"]
    )
    if all(getattr(current, k) == v for k, v in values.items()):
        return None
    return TenantQuota(tenant_id=new.tenant_id, updated_at=new.updated_at, **values)


# --- export -----------------------------------------------------------------------------------------


def export_range(first: date | None, last: date | None, today: date) -> tuple[date, date]:
    """The days an export covers: ``from`` to ``to`` inclusive; by default this month up to today.

    Raises:
        InvalidInput: ``from`` after ``to``, or more than :data:`MAX_EXPORT_DAYS` days.
    """
    first = first or month_of(today)
    last = last or max(today, first)
    if first > last:
        raise InvalidInput(
            f"from ({first}) is after to ({last})",
            errors=[FieldError(path="/query/from", message="must not be after to")],
        )
    if (last - first).days + 1 > MAX_EXPORT_DAYS:
        raise InvalidInput(
            f"an export covers at most {MAX_EXPORT_DAYS} days; ask for several",
            errors=[FieldError(path="/query/to", message=f"at most {MAX_EXPORT_DAYS} days after from")],
        )
    return first, last


CSV_COLUMNS: Final = ("date", "tenantId", *(UsageDay.model_fields[n].alias or n for n in COUNTERS))


def render_csv(days: Iterable[UsageDay]) -> str:
    """Days as RFC 4180 CSV with a header line of the JSON field names."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(CSV_COLUMNS)
    for day in days:
        row = day.wire()
        writer.writerow([row[c] for c in CSV_COLUMNS])
    return out.getvalue()


# --- API keys ---------------------------------------------------------------------------------------

MIN_KEY_FOR_HINT: Final = 12
"""Shorter keys get no visible characters in their hint: four would be a third of the key or more."""
_PRINTABLE_KEY = re.compile(r"[\x21-\x7e]+")


def provider_name(provider: str) -> str:
    """Providers are case-insensitive (``OpenAI`` and ``openai`` are one)."""
    return provider.lower()


def clean_key(api_key: str) -> str:
    """The key as it will be sent: surrounding whitespace (a pasted newline) removed.

    Raises:
        InvalidInput: empty, or holding spaces, control or non-ASCII characters (it becomes an HTTP header).
    """
    key = api_key.strip()
    if not key or not _PRINTABLE_KEY.fullmatch(key):
        raise InvalidInput(
            "apiKey must be printable ASCII without spaces",
            errors=[FieldError(path="/apiKey", message="must be printable ASCII without spaces")],
        )
    return key


def key_hint(api_key: str) -> str:
    """What may be shown of a key: ``…`` and its last four characters (nothing more for short keys)."""
    return "…" + api_key[-4:] if len(api_key) >= MIN_KEY_FOR_HINT else "…"


# --- tenant secrets ---------------------------------------------------------------------------------


def clean_secret_value(value: str) -> str:
    """The value as it will be stored: exactly as given, once it is not empty, has no NUL and fits.

    Raises:
        InvalidInput: empty, holds a NUL character, or longer than :data:`MAX_SECRET_BYTES` in UTF-8.
    """
    problem = None
    if not value:
        problem = "must not be empty"
    elif "\x00" in value:
        problem = "must not contain a NUL character"
    elif len(value.encode("utf-8", errors="surrogatepass")) > MAX_SECRET_BYTES:
        problem = f"must be at most {MAX_SECRET_BYTES} bytes in UTF-8"
    if problem is not None:
        raise InvalidInput(f"value {problem}", errors=[FieldError(path="/value", message=problem)])
    return value


def secret_hint(value: str) -> str:
    """What may be shown of a secret: as of a key, ``…`` and its last four characters for long values only."""
    return key_hint(value)
