"""The usage service: metering, plans and quotas, usage reads, the BYOK key vault (DESIGN §1)."""

from __future__ import annotations

import logging
from datetime import timedelta
from pathlib import Path
from typing import Final

from flowmesh.contracts.ids import utcnow
from flowmesh.contracts.streams import QUOTA_BUCKET, RUN_EVENTS, USAGE_METER
from flowmesh.contracts.subjects import run_events_of_type
from flowmesh.runtime.nats import ensure_bucket
from flowmesh.runtime.service import ServiceRuntime
from flowmesh.usage import domain, handlers, repo
from flowmesh.usage.consumer import BatchConsumer, BatchSpec
from flowmesh.usage.keys import KeyStore
from flowmesh.usage.meter import Meter
from flowmesh.usage.quota import PlanBook, QuotaSnapshots
from flowmesh.usage.settings import UsageSettings
from flowmesh.usage.vault import Vault

MIGRATIONS = Path(__file__).parent / "migrations"
PRUNE_EVERY_S: Final = 3600.0
PRUNE_CHUNK: Final = 10_000
log = logging.getLogger(__name__)


def create_app(settings: UsageSettings) -> ServiceRuntime:
    """The usage service, ready to run (``async with service.running(): ...``)."""
    service = ServiceRuntime("usage", settings, migrations=MIGRATIONS)
    plans = PlanBook(service.sessions, default=settings.default_plan, ttl_s=settings.plan_cache_s)
    snapshots = QuotaSnapshots()
    meter = Meter(service.sessions, plans, snapshots)
    keys = KeyStore(service.sessions, Vault(settings.keys_secret_list))
    handlers.register(service.rpc, service.sessions, plans=plans, snapshots=snapshots, keys=keys)
    consumer = BatchConsumer(
        BatchSpec(
            stream=RUN_EVENTS.name,
            # only the event types that can count: the others are never delivered (nor acked)
            filters=tuple(run_events_of_type(t) for t in sorted(domain.METERED_TYPES)),
            durable=USAGE_METER.durable,
            batch=settings.meter_batch,
            window_s=settings.meter_wait_s,
            ack_wait_s=settings.ack_wait_s,
            max_ack_pending=USAGE_METER.max_ack_pending,
        ),
        handlers.metering(meter),
    )

    async def prune() -> None:
        """Forget metered event ids once no duplicate of them can arrive any more."""
        while True:
            async with service.sessions.begin() as s:
                before = utcnow() - timedelta(days=settings.dedupe_days)
                pruned = await repo.prune_metered(s, before=before, limit=PRUNE_CHUNK)
            if pruned < PRUNE_CHUNK:
                return

    async def open_snapshots() -> None:
        snapshots.kv = await ensure_bucket(service.js, QUOTA_BUCKET, ttl_s=0, replicas=settings.stream_replicas)

    service.on_start(open_snapshots)
    service.resource(
        lambda: consumer.running(settings.nats_url, name="flowmesh-usage-meter", login=settings.nats_login)
    )
    service.every(PRUNE_EVERY_S, prune, name="pruning metered event ids")
    service.background(keys.reseal_all, name="re-sealing stored keys with the current secret (retried at next start)")
    return service
