"""Plans as data, and the per-tenant quota snapshots kept in the ``fm_quota`` KV bucket.

A snapshot is a :class:`TenantQuota`: the tenant's limits and this month's metered runs. The
metering refreshes it after every batch that started runs of the tenant, and a plan change right
away, so a run's start can be checked against it without asking the usage service.

How far over a limit concurrent starts can go: a start sees the runs metered before it, and a run
is metered once its ``run.queued`` event is published (right after the start's commit), collected
(at most ``FLOWMESH_USAGE_METER_WAIT_S``, 0.2 s, after the first event of a batch), committed and
written here — a fraction of a second in normal operation. So a tenant can exceed ``runsLimit``
by at most the runs it starts within that lag (bounded by its request rate: a free tenant's
20 requests/s per gateway replica make a handful of runs); while the usage service is down or
behind, by the runs started during the outage. A start path that must be tighter counts its own
starts since the snapshot's ``updatedAt``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Sequence
from typing import Final

import orjson
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue
from pydantic import ValidationError

from flowmesh.contracts.ids import utcnow
from flowmesh.contracts.models.usage import Plan, TenantQuota, quota_key
from flowmesh.runtime.cache import TtlCache
from flowmesh.runtime.db import Connection, Database
from flowmesh.usage import repo
from flowmesh.usage.domain import Period, merge_quota, month_of
from flowmesh.usage.domain import tenant_quota as build_quota

log = logging.getLogger(__name__)

SNAPSHOT_ATTEMPTS: Final = 5


class PlanBook:
    """The plans table, remembered for ``ttl_s`` (plans are data: an edited row applies within that)."""

    def __init__(self, db: Database, *, default: str, ttl_s: float) -> None:
        self._db = db
        self.default = default
        # an empty table is not kept: read again until the plans are there
        self._plans: TtlCache[None, dict[str, Plan]] = TtlCache(ttl_s, ttl_of=lambda plans: ttl_s if plans else 0)

    async def plans(self) -> dict[str, Plan]:
        """Every plan by name."""
        return await self._plans.get(None, self._load)

    async def _load(self) -> dict[str, Plan]:
        async with self._db.reading() as conn:
            return await repo.load_plans(conn)

    async def plan(self, name: str) -> Plan:
        """A plan by name; a name the table no longer has reads as the default plan."""
        plans = await self.plans()
        return plans.get(name) or plans[self.default]

    async def assignments(self, conn: Connection, tenant_ids: Iterable[str]) -> dict[str, tuple[Plan, int]]:
        """Each tenant's plan and plan revision (the default plan, revision 0, without a record)."""
        ids = set(tenant_ids)
        own = await repo.tenant_plans(conn, tenant_ids=ids)
        out: dict[str, tuple[Plan, int]] = {}
        for tenant in ids:
            name, revision = own.get(tenant, (self.default, 0))
            out[tenant] = (await self.plan(name), revision)
        return out

    async def quotas(self, conn: Connection, tenant_ids: Iterable[str]) -> list[TenantQuota]:
        """Quota answers of tenants as the connection sees them now (this month's runs, current plan)."""
        ids = set(tenant_ids)
        if not ids:
            return []
        now = utcnow()
        period = Period(month_of(now.date()))
        runs = await repo.month_runs(conn, tenant_ids=ids, month=period.month)
        assigned = await self.assignments(conn, ids)
        return [build_quota(t, assigned[t][0], assigned[t][1], period, runs.get(t, 0), now) for t in sorted(ids)]


class QuotaSnapshots:
    """Writes tenants' :class:`TenantQuota` into the ``fm_quota`` KV bucket, never going backwards.

    Each write reads the entry, merges (:func:`merge_quota`) and writes with a compare-and-set on
    the revision it read, so replicas writing in any order leave the newest facts.
    """

    def __init__(self) -> None:
        self.kv: KeyValue | None = None

    async def write(self, quotas: Sequence[TenantQuota]) -> None:
        """Bring each tenant's snapshot up to ``quotas``.

        Raises:
            Exception: the bucket could not be written (NATS errors; the caller decides whether to retry).
        """
        if self.kv is None or not quotas:
            return
        await asyncio.gather(*(self._write_one(self.kv, q) for q in quotas))

    async def _write_one(self, kv: KeyValue, quota: TenantQuota) -> None:
        key = quota_key(quota.tenant_id)
        for _ in range(SNAPSHOT_ATTEMPTS):
            try:
                entry = await kv.get(key)
            except KeyNotFoundError:  # also a deleted key
                entry = None
            current = _decode(entry.value if entry is not None else None)
            merged = merge_quota(current, quota)
            if merged is None:
                return
            value = merged.model_dump_json(by_alias=True).encode()
            try:
                if entry is None:
                    await kv.create(key, value)
                else:
                    await kv.update(key, value, last=entry.revision)
                return
            except KeyWrongLastSequenceError:
                continue  # another replica wrote meanwhile: merge with what it wrote
        log.warning("the quota snapshot of tenant %r kept changing under us; left for the next batch", quota.tenant_id)


def _decode(value: bytes | None) -> TenantQuota | None:
    if not value:
        return None
    try:
        return TenantQuota.model_validate(orjson.loads(value))
    except (orjson.JSONDecodeError, ValidationError):
        return None  # unreadable: replaced
