"""Tenants' plan limits where a start is decided, without a round trip per start.

The usage service keeps a :class:`TenantQuota` snapshot per tenant in the ``fm_quota`` KV bucket,
refreshed after every metered batch and at once on a plan change. :class:`QuotaView` follows the
bucket with a watch, so a check is a dictionary lookup; a tenant without a snapshot yet (never
metered, never re-planned) is asked of the usage service (``fm.rpc.usage.quota``) and the answer
remembered until the watch brings a newer one or ``ask_ttl_s`` passes.

When the usage service cannot answer, the check lets the start through and says so in the log:
limits are for billing, and a run refused because metering is down would be an outage of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Final

from nats.js import JetStreamContext
from nats.js.kv import KeyValue
from pydantic import ValidationError

from flowmesh.contracts.errors import FlowmeshError
from flowmesh.contracts.ids import utcnow
from flowmesh.contracts.models.usage import TenantQuota
from flowmesh.contracts.streams import QUOTA_BUCKET
from flowmesh.contracts.subjects import UsageOp
from flowmesh.runtime.cache import TtlCache
from flowmesh.runtime.nats import ensure_bucket
from flowmesh.runtime.rpc import RpcClient

log = logging.getLogger(__name__)

ASK_TIMEOUT_S: Final = 2.0
UNKNOWN_RETRY_S: Final = 5.0


def refuses_runs(quota: TenantQuota, now: datetime) -> bool:
    """Whether the tenant's plan refuses a new run now (monthly runs used up, no overage)."""
    if quota.overage_allowed or quota.runs_limit is None:
        return False
    used = quota.runs_used if quota.period == now.strftime("%Y-%m") else 0  # a new month starts at 0
    return used >= quota.runs_limit


class QuotaView:
    """The ``fm_quota`` snapshots of every tenant, followed as they change."""

    def __init__(self, rpc: RpcClient, *, ask_ttl_s: float = 30.0) -> None:
        self._rpc = rpc
        self._watched: dict[str, TenantQuota] = {}
        # an answer is kept until the watch brings a newer one or ask_ttl_s passes; "unknown" shortly
        self._asked: TtlCache[str, TenantQuota | None] = TtlCache(
            ask_ttl_s, ttl_of=lambda q: ask_ttl_s if q is not None else UNKNOWN_RETRY_S
        )
        self._watcher: KeyValue.KeyWatcher | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self, js: JetStreamContext, *, replicas: int = 1) -> None:
        """Follow the bucket (created, with ``replicas``, if the usage service has not yet)."""
        kv = await ensure_bucket(js, QUOTA_BUCKET, ttl_s=0, replicas=replicas)
        self._watcher = await kv.watchall()
        self._task = asyncio.create_task(self._follow(self._watcher), name="quota-watch")

    @contextlib.asynccontextmanager
    async def running(self, js: JetStreamContext, *, replicas: int = 1) -> AsyncIterator[QuotaView]:
        """Follow the bucket for the duration of the block (a service resource)."""
        await self.start(js, replicas=replicas)
        try:
            yield self
        finally:
            await self.stop()

    async def stop(self) -> None:
        """Stop following the bucket."""
        if self._watcher is not None:
            with contextlib.suppress(Exception):
                await self._watcher.stop()  # type: ignore[no-untyped-call]
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _follow(self, watcher: KeyValue.KeyWatcher) -> None:
        async for entry in watcher:
            if entry is None or not entry.value:  # the end of the initial values, or a deletion
                continue
            try:
                quota = TenantQuota.model_validate_json(entry.value)
            except ValidationError as exc:
                log.warning("unreadable quota snapshot %r: %s", entry.key, exc)
                continue
            self._watched[quota.tenant_id] = quota  # the usage service only ever moves a snapshot forward
            self._asked.discard(quota.tenant_id)

    async def get(self, tenant: str) -> TenantQuota | None:
        """The tenant's quota, or None when nobody can say right now (the start goes ahead)."""
        if (quota := self._watched.get(tenant)) is not None:
            return quota
        # one question per tenant at a time, however many starts wait for it
        answer = await self._asked.get(tenant, lambda: self._ask(tenant))
        return self._watched.get(tenant, answer)

    def known(self, tenant: str) -> TenantQuota | None:
        """The tenant's quota if already known here (watched, or answered recently), without asking.

        For checks made where no round trip may wait (inside a transaction); None reads as no caps.
        """
        if (quota := self._watched.get(tenant)) is not None:
            return quota
        found, answer = self._asked.lookup(tenant)
        return answer if found else None

    async def _ask(self, tenant: str) -> TenantQuota | None:
        try:
            return TenantQuota.model_validate(await self._rpc.call(UsageOp.QUOTA, tenant=tenant, timeout=ASK_TIMEOUT_S))
        except (FlowmeshError, ValidationError) as exc:
            log.warning("quota of tenant %r unknown, not enforced for %.0fs: %s", tenant, UNKNOWN_RETRY_S, exc)
            return None

    def refuses_runs(self, quota: TenantQuota | None) -> bool:
        """Whether ``quota`` refuses a new run now."""
        return quota is not None and refuses_runs(quota, utcnow())
