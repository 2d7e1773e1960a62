"""The usage service: metering, plans and quotas, usage reads, the BYOK key vault."""

from __future__ import annotations

from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Final

from flowmesh.contracts.ids import utcnow
from flowmesh.contracts.streams import QUOTA_BUCKET, USAGE_METER
from flowmesh.contracts.subjects import run_events_of_type
from flowmesh.runtime.consumers import PullOptions
from flowmesh.runtime.nats import ensure_bucket
from flowmesh.runtime.service import ServiceRuntime
from flowmesh.usage import domain, handlers, repo
from flowmesh.usage.deps import UsageDeps
from flowmesh.usage.keys import KeyStore
from flowmesh.usage.meter import Meter
from flowmesh.usage.quota import PlanBook, QuotaSnapshots
from flowmesh.usage.secrets import SecretStore
from flowmesh.usage.settings import UsageSettings
from flowmesh.usage.vault import Vault

MIGRATIONS = Path(__file__).parent / "migrations"
PRUNE_EVERY_S: Final = 3600.0
PRUNE_CHUNK: Final = 10_000


def create_app(settings: UsageSettings) -> ServiceRuntime:
    """The usage service, ready to run (``async with service.running(): ...``)."""
    service = ServiceRuntime("usage", settings, migrations=MIGRATIONS)
    db = service.db
    plans = PlanBook(db, default=settings.default_plan, ttl_s=settings.plan_cache_s)
    snapshots = QuotaSnapshots()
    vault = Vault(settings.keys_secret_list)
    keys = KeyStore(db, vault)
    secrets = SecretStore(db, vault)
    deps = UsageDeps(db, plans, snapshots, keys, Meter(db, plans, snapshots), secrets)
    service.rpc.include(handlers.router, deps)
    service.consumers.batches(
        USAGE_METER,
        handlers.meter_batch,
        deps,
        window_s=settings.meter_wait_s,
        options=PullOptions(
            # only the event types that can count: the others are never delivered (nor acked)
            filters=tuple(run_events_of_type(t) for t in sorted(domain.METERED_TYPES)),
            ack_wait_s=settings.ack_wait_s,
            batch=settings.meter_batch,
        ),
    )
    service.on_start(partial(_open_snapshots, service, snapshots, settings))
    service.every(PRUNE_EVERY_S, partial(_prune_metered, service, settings), name="pruning metered event ids")
    service.background(keys.reseal_all, name="re-sealing stored keys with the current secret (retried at next start)")
    service.background(
        secrets.reseal_all, name="re-sealing stored secrets with the current secret (retried at next start)"
    )
    return service


async def _open_snapshots(service: ServiceRuntime, snapshots: QuotaSnapshots, settings: UsageSettings) -> None:
    """The ``fm_quota`` bucket the quota snapshots are written to (made if missing)."""
    snapshots.kv = await ensure_bucket(service.js, QUOTA_BUCKET, ttl_s=0, replicas=settings.stream_replicas)


async def _prune_metered(service: ServiceRuntime, settings: UsageSettings) -> None:
    """Forget metered event ids once no duplicate of them can arrive any more (in chunks)."""
    while True:
        async with service.db.transaction() as conn:
            before = utcnow() - timedelta(days=settings.dedupe_days)
            pruned = await repo.prune_metered(conn, before=before, limit=PRUNE_CHUNK)
        if pruned < PRUNE_CHUNK:
            return
