"""Metering run events exactly: after any fault, the counters equal what the runs' events say.

A batch of run events is metered in one transaction: the events' ids are claimed in
``metered_events`` (a redelivered or re-published event finds its id taken and adds nothing), the
new events are summed in memory per tenant per day and per month, and each counter row is upserted
once. The batch is acknowledged after the commit; a crash before the acknowledgement redelivers it,
and the claimed ids make that a no-op. So the counters equal what the events say, whatever fails.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final

from prometheus_client import Counter, Histogram

from flowmesh.contracts.ids import utcnow
from flowmesh.contracts.models.usage import TenantQuota
from flowmesh.runtime.db import Database
from flowmesh.usage import repo
from flowmesh.usage.domain import MalformedEvent, Metered, aggregate, read_event, unique
from flowmesh.usage.quota import PlanBook, QuotaSnapshots

log = logging.getLogger(__name__)

EVENTS: Final = Counter("flowmesh_usage_events_total", "Run events seen by metering", ["outcome"])
LAG: Final = Histogram(
    "flowmesh_usage_metering_lag_seconds",
    "Time from a run event (its ts) to its being metered (the commit of its batch); new events only",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800),
)


@dataclass(frozen=True, slots=True)
class Metering:
    """What metering one batch did."""

    new: int
    duplicates: int
    malformed: int
    quotas: list[TenantQuota]


class Meter:
    """Meters batches of run events (one transaction each) and refreshes the quota snapshots."""

    def __init__(self, db: Database, plans: PlanBook, snapshots: QuotaSnapshots) -> None:
        self.db = db
        self.plans = plans
        self.snapshots = snapshots

    async def meter(self, payloads: Iterable[Any]) -> Metering:
        """Meter decoded run events; safe to call again with the same events (nothing counts twice).

        Raises:
            Exception: the database or the KV bucket failed; nothing is acknowledged, the batch comes again.
        """
        events: list[Metered] = []
        malformed = 0
        for payload in payloads:
            try:
                events.append(read_event(payload))
            except MalformedEvent as exc:
                malformed += 1
                log.warning("ignoring a message on the run events stream that is not a run event: %s", exc)
        candidates = unique(events)
        # tenants whose runs may have grown: their snapshots are refreshed even when every event
        # was a duplicate (the batch may be a redelivery after a crash between commit and snapshot)
        counted = {e.tenant_id for e in candidates if e.counts.runs}
        async with self.db.transaction() as conn:
            claimed = await repo.claim_events(conn, event_ids=[e.event_id for e in candidates], now=utcnow())
            batch = aggregate(e for e in candidates if e.event_id in claimed)
            await repo.add_daily(conn, sums=batch.daily)
            await repo.add_monthly(conn, sums=batch.monthly)
            await repo.put_run_facts(conn, facts=batch.runs.values())
            quotas = await self.plans.quotas(conn, counted)
        _observe_lag(e for e in candidates if e.event_id in claimed)
        await self.snapshots.write(quotas)
        EVENTS.labels("metered").inc(len(claimed))
        EVENTS.labels("duplicate").inc(len(candidates) - len(claimed))
        EVENTS.labels("malformed").inc(malformed)
        return Metering(new=len(claimed), duplicates=len(candidates) - len(claimed), malformed=malformed, quotas=quotas)


def _observe_lag(metered: Iterable[Metered]) -> None:
    """How long each newly metered event waited (a redelivered batch's duplicates are not counted again)."""
    now = utcnow()
    for event in metered:
        if event.at is not None:
            LAG.observe(max(0.0, (now - event.at).total_seconds()))
