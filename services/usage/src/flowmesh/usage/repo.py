"""Every SQL statement of the usage service. Every query of tenant data filters by tenant.

Statements that lock several rows (the metering upserts) take them in key order, so two replicas
metering overlapping batches wait for each other instead of deadlocking.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import date, datetime
from typing import Any

from sqlalchemy import bindparam, delete, func, select, text, update
from sqlalchemy.dialects.postgresql import ARRAY, insert
from sqlalchemy.ext.asyncio import AsyncSession

from flowmesh.contracts.ids import utcnow
from flowmesh.contracts.models.audit import AuditAction, AuditEntry, AuditRead, AuditTarget, AuditTargetType
from flowmesh.contracts.models.usage import ApiKeyInfo, FlowStats, Plan, PlanCaps, SecretInfo, UsageDay
from flowmesh.runtime import audit as audit_log
from flowmesh.usage.domain import COUNTERS, Counts, RunFact
from flowmesh.usage.tables import (
    api_keys,
    metered_events,
    plans,
    run_stats,
    secrets,
    tenants,
    usage_daily,
    usage_monthly,
)
from flowmesh.usage.tables import (
    audit as audit_table,
)

# --- metering ---------------------------------------------------------------------------------------

_CLAIM = text(
    "INSERT INTO usage.metered_events (event_id, metered_at) "
    "SELECT id, :now FROM unnest(CAST(:ids AS uuid[])) AS t(id) "
    "ON CONFLICT (event_id) DO NOTHING RETURNING event_id::text"
).bindparams(bindparam("ids", type_=ARRAY(metered_events.c.event_id.type)))


async def claim_events(session: AsyncSession, *, event_ids: Sequence[str], now: datetime) -> set[str]:
    """Record events as metered; the ids that were not metered before (the others are duplicates).

    A concurrent transaction claiming the same id waits for this one and then finds it claimed,
    so an event counts once however many replicas see it.
    """
    if not event_ids:
        return set()
    rows = await session.execute(_CLAIM, {"ids": list(event_ids), "now": now})
    return {r[0] for r in rows}


def _add_counts_sql(table: str, period: str) -> Any:
    columns = ", ".join(COUNTERS)
    arrays = ", ".join(f"CAST(:{name} AS bigint[])" for name in COUNTERS)
    return text(
        f"INSERT INTO usage.{table} AS u (tenant_id, {period}, {columns}) "
        f"SELECT * FROM unnest(CAST(:tenants AS text[]), CAST(:periods AS date[]), {arrays}) "
        f"ON CONFLICT (tenant_id, {period}) DO UPDATE SET "
        + ", ".join(f"{name} = u.{name} + excluded.{name}" for name in COUNTERS)
    )


_ADD_DAILY = _add_counts_sql("usage_daily", "day")
_ADD_MONTHLY = _add_counts_sql("usage_monthly", "month")


async def _add_counts(session: AsyncSession, stmt: Any, sums: dict[tuple[str, date], Counts]) -> None:
    # one statement over arrays, rows in key order (replicas take the row locks in the same order)
    if not sums:
        return
    keys = sorted(sums)
    params: dict[str, Any] = {"tenants": [t for t, _ in keys], "periods": [d for _, d in keys]}
    for name in COUNTERS:
        params[name] = [getattr(sums[k], name) for k in keys]
    await session.execute(stmt, params)


async def add_daily(session: AsyncSession, *, sums: dict[tuple[str, date], Counts]) -> None:
    """Add counters per (tenant, day): one upsert per row, rows in key order."""
    await _add_counts(session, _ADD_DAILY, sums)


async def add_monthly(session: AsyncSession, *, sums: dict[tuple[str, date], Counts]) -> None:
    """Add counters per (tenant, first day of the month)."""
    await _add_counts(session, _ADD_MONTHLY, sums)


_RUN_FACTS = text(
    "INSERT INTO usage.run_stats AS r "
    "(run_id, tenant_id, flow_id, queued_at, status, duration_ms, completed_at, final_seq) "
    "SELECT * FROM unnest(CAST(:run_ids AS uuid[]), CAST(:tenants AS text[]), CAST(:flows AS uuid[]), "
    "CAST(:queued AS timestamptz[]), CAST(:statuses AS text[]), CAST(:durations AS bigint[]), "
    "CAST(:completed AS timestamptz[]), CAST(:seqs AS int[])) "
    "ON CONFLICT (run_id) DO UPDATE SET queued_at = LEAST(r.queued_at, excluded.queued_at), "
    + ", ".join(
        f"{c} = CASE WHEN excluded.final_seq > COALESCE(r.final_seq, -1) THEN excluded.{c} ELSE r.{c} END"
        for c in ("status", "duration_ms", "completed_at", "final_seq")
    )
)


async def put_run_facts(session: AsyncSession, *, facts: Iterable[RunFact]) -> None:
    """Keep per-run statistics: the earliest queue time, and the outcome with the highest ``seq``.

    One statement over arrays, whatever the number of runs (a multi-row VALUES would be compiled
    anew for every batch size).
    """
    ordered = sorted(facts, key=lambda f: f.run_id)
    if not ordered:
        return
    await session.execute(
        _RUN_FACTS,
        {
            "run_ids": [f.run_id for f in ordered],
            "tenants": [f.tenant_id for f in ordered],
            "flows": [f.flow_id for f in ordered],
            "queued": [f.queued_at for f in ordered],
            "statuses": [f.status for f in ordered],
            "durations": [f.duration_ms for f in ordered],
            "completed": [f.completed_at for f in ordered],
            "seqs": [f.final_seq for f in ordered],
        },
    )


async def prune_metered(session: AsyncSession, *, before: datetime, limit: int) -> int:
    """Forget up to ``limit`` metered event ids recorded before ``before``; how many were forgotten."""
    oldest = select(metered_events.c.event_id).where(metered_events.c.metered_at < before).limit(limit)
    result = await session.execute(delete(metered_events).where(metered_events.c.event_id.in_(oldest)))
    return int(result.rowcount)  # type: ignore[attr-defined]


# --- plans and tenants ------------------------------------------------------------------------------


async def load_plans(session: AsyncSession) -> dict[str, Plan]:
    """Every plan by name."""
    rows = (await session.execute(select(plans))).mappings()
    return {
        r["name"]: Plan(
            name=r["name"],
            flows=r["flows"],
            runs_per_month=r["runs_per_month"],
            runs_in_flight=r["runs_in_flight"],
            requests_per_second=r["requests_per_second"],
            overage_per_1000_runs_usd=(
                None if r["overage_per_1000_runs_usd"] is None else float(r["overage_per_1000_runs_usd"])
            ),
            **{cap: r[cap] for cap in PlanCaps.model_fields},
        )
        for r in rows
    }


async def tenant_plans(session: AsyncSession, *, tenant_ids: Iterable[str]) -> dict[str, tuple[str, int]]:
    """The plan and plan revision of each tenant that has a plan of its own."""
    ids = sorted(set(tenant_ids))
    if not ids:
        return {}
    stmt = select(tenants.c.tenant_id, tenants.c.plan, tenants.c.plan_revision).where(tenants.c.tenant_id.in_(ids))
    return {r.tenant_id: (r.plan, r.plan_revision) for r in await session.execute(stmt)}


async def own_plan_locked(session: AsyncSession, *, tenant: str) -> str | None:
    """The plan a tenant was given (None: it has the default), its row locked until the transaction ends."""
    stmt = select(tenants.c.plan).where(tenants.c.tenant_id == tenant).with_for_update()
    return (await session.execute(stmt)).scalar_one_or_none()


async def set_plan(session: AsyncSession, *, tenant: str, plan: str, now: datetime) -> int:
    """Give a tenant a plan (creating its record if new); the assignment's revision."""
    stmt = insert(tenants).values(tenant_id=tenant, plan=plan, plan_revision=1, created_at=now, updated_at=now)
    stmt = stmt.on_conflict_do_update(
        index_elements=[tenants.c.tenant_id],
        set_={"plan": plan, "plan_revision": tenants.c.plan_revision + 1, "updated_at": now},
    )
    return int((await session.execute(stmt.returning(tenants.c.plan_revision))).scalar_one())


# --- reads --------------------------------------------------------------------------------------------


async def month_counts(session: AsyncSession, *, tenant: str, month: date) -> Counts:
    """A tenant's counters for one month (zeros when nothing was metered)."""
    stmt = select(*(usage_monthly.c[n] for n in COUNTERS)).where(
        usage_monthly.c.tenant_id == tenant, usage_monthly.c.month == month
    )
    return Counts.from_row((await session.execute(stmt)).mappings().one_or_none())


async def month_runs(session: AsyncSession, *, tenant_ids: Iterable[str], month: date) -> dict[str, int]:
    """Runs metered this month per tenant (absent: none)."""
    ids = sorted(set(tenant_ids))
    if not ids:
        return {}
    stmt = select(usage_monthly.c.tenant_id, usage_monthly.c.runs).where(
        usage_monthly.c.tenant_id.in_(ids), usage_monthly.c.month == month
    )
    return {r.tenant_id: int(r.runs) for r in await session.execute(stmt)}


async def daily_usage(session: AsyncSession, *, tenant: str, first: date, last: date) -> list[UsageDay]:
    """A tenant's days with usage from ``first`` to ``last`` inclusive, oldest first."""
    stmt = (
        select(usage_daily)
        .where(usage_daily.c.tenant_id == tenant, usage_daily.c.day >= first, usage_daily.c.day <= last)
        .order_by(usage_daily.c.day)
    )
    return [
        UsageDay(date=r["day"], tenant_id=r["tenant_id"], **Counts.from_row(r).as_dict())
        for r in (await session.execute(stmt)).mappings()
    ]


async def flow_stats(session: AsyncSession, *, tenant: str, flow_id: str) -> FlowStats:
    """Executions of one flow: counts by outcome, average and p95 duration of finished runs, the last start."""
    c = run_stats.c
    finished = c.status.is_not(None)
    stmt = select(
        func.count().label("total"),
        func.count().filter(c.status == "succeeded").label("succeeded"),
        func.count().filter(c.status == "failed").label("failed"),
        func.count().filter(c.status == "cancelled").label("cancelled"),
        func.count().filter(c.status == "timedOut").label("timed_out"),
        func.avg(c.duration_ms).filter(finished).label("avg"),
        func.percentile_cont(0.95).within_group(c.duration_ms).filter(finished).label("p95"),
        func.max(func.coalesce(c.queued_at, c.completed_at)).label("last"),
    ).where(c.tenant_id == tenant, c.flow_id == flow_id)
    r = (await session.execute(stmt)).one()
    return FlowStats(
        executions_total=r.total,
        succeeded=r.succeeded,
        failed=r.failed,
        cancelled=r.cancelled,
        timed_out=r.timed_out,
        avg_duration_ms=None if r.avg is None else round(float(r.avg), 3),
        p95_duration_ms=None if r.p95 is None else round(float(r.p95), 3),
        last_executed_at=r.last,
    )


# --- API keys ---------------------------------------------------------------------------------------

_KEY_INFO = (api_keys.c.provider, api_keys.c.key_hint, api_keys.c.created_at, api_keys.c.last_used_at)


def _info(row: Any) -> ApiKeyInfo:
    return ApiKeyInfo(
        provider=row.provider, key_hint=row.key_hint, created_at=row.created_at, last_used_at=row.last_used_at
    )


async def list_keys(session: AsyncSession, *, tenant: str) -> list[ApiKeyInfo]:
    """The tenant's stored keys (hints only), by provider."""
    stmt = select(*_KEY_INFO).where(api_keys.c.tenant_id == tenant).order_by(api_keys.c.provider)
    return [_info(r) for r in await session.execute(stmt)]


async def put_key(
    session: AsyncSession, *, tenant: str, provider: str, ciphertext: bytes, key_id: str, hint: str, now: datetime
) -> ApiKeyInfo:
    """Store a provider's key, replacing the one before (a new key: new ``createdAt``, never used)."""
    values = {"ciphertext": ciphertext, "key_id": key_id, "key_hint": hint, "created_at": now, "last_used_at": None}
    stmt = insert(api_keys).values(tenant_id=tenant, provider=provider, **values)
    stmt = stmt.on_conflict_do_update(index_elements=[api_keys.c.tenant_id, api_keys.c.provider], set_=values)
    return _info((await session.execute(stmt.returning(*_KEY_INFO))).one())


async def delete_key(session: AsyncSession, *, tenant: str, provider: str) -> bool:
    """Forget a provider's key; whether there was one."""
    stmt = delete(api_keys).where(api_keys.c.tenant_id == tenant, api_keys.c.provider == provider)
    return bool((await session.execute(stmt)).rowcount)  # type: ignore[attr-defined]


async def use_key(session: AsyncSession, *, tenant: str, provider: str, now: datetime) -> bytes | None:
    """A provider's sealed key, marked as used now; None when there is none."""
    stmt = (
        update(api_keys)
        .where(api_keys.c.tenant_id == tenant, api_keys.c.provider == provider)
        .values(last_used_at=now)
        .returning(api_keys.c.ciphertext)
    )
    found = (await session.execute(stmt)).scalar_one_or_none()
    return None if found is None else bytes(found)


async def keys_sealed_with_other(session: AsyncSession, *, key_id: str, limit: int) -> list[tuple[str, str, bytes]]:
    """Up to ``limit`` rows sealed under another key than ``key_id`` (to re-seal after a rotation)."""
    stmt = (
        select(api_keys.c.tenant_id, api_keys.c.provider, api_keys.c.ciphertext)
        .where(api_keys.c.key_id != key_id)
        .order_by(api_keys.c.tenant_id, api_keys.c.provider)
        .limit(limit)
    )
    return [(r.tenant_id, r.provider, bytes(r.ciphertext)) for r in await session.execute(stmt)]


async def reseal_key(session: AsyncSession, *, tenant: str, provider: str, old: bytes, new: bytes, key_id: str) -> bool:
    """Replace a row's ciphertext if it is still ``old`` (a key stored meanwhile wins); whether it was."""
    stmt = (
        update(api_keys)
        .where(api_keys.c.tenant_id == tenant, api_keys.c.provider == provider, api_keys.c.ciphertext == old)
        .values(ciphertext=new, key_id=key_id)
    )
    return bool((await session.execute(stmt)).rowcount)  # type: ignore[attr-defined]


# --- audit --------------------------------------------------------------------------------------------


async def audit(
    session: AsyncSession,
    *,
    tenant: str,
    actor: str,
    action: AuditAction,
    target: tuple[AuditTargetType, str],
    details: dict[str, Any] | None = None,
) -> AuditEntry:
    """Record a change in the audit log inside the caller's transaction (the change's own), e.g.
    ``await repo.audit(s, tenant=t, actor=ctx.subject, action="secret.put", target=("secret", name))``.

    ``target`` is (type, id); ``details`` must never hold a secret or key value.
    """
    return await audit_log.append(
        session,
        audit_table,
        tenant=tenant,
        actor=actor,
        action=action,
        target=AuditTarget(type=target[0], id=target[1]),
        details=details,
        now=utcnow(),
    )


async def read_audit(session: AsyncSession, *, tenant: str | None, q: AuditRead) -> list[AuditEntry]:
    """A page of audit entries of ``tenant`` (every tenant's when None), newest first."""
    return await audit_log.read(session, audit_table, tenant=tenant, q=q)


# --- tenant secrets ---------------------------------------------------------------------------------

_SECRET_INFO = (secrets.c.name, secrets.c.hint, secrets.c.created_at, secrets.c.updated_at)


def _secret_info(row: Any) -> SecretInfo:
    return SecretInfo(name=row.name, hint=row.hint, created_at=row.created_at, updated_at=row.updated_at)


async def list_secrets(session: AsyncSession, *, tenant: str) -> list[SecretInfo]:
    """The tenant's stored secrets (hints only), by name."""
    stmt = select(*_SECRET_INFO).where(secrets.c.tenant_id == tenant).order_by(secrets.c.name)
    return [_secret_info(r) for r in await session.execute(stmt)]


async def put_secret(
    session: AsyncSession, *, tenant: str, name: str, ciphertext: bytes, key_id: str, hint: str, now: datetime
) -> SecretInfo:
    """Store a secret, replacing the value of one of the same name (which keeps its ``createdAt``)."""
    values = {"ciphertext": ciphertext, "key_id": key_id, "hint": hint, "updated_at": now}
    stmt = insert(secrets).values(tenant_id=tenant, name=name, created_at=now, **values)
    stmt = stmt.on_conflict_do_update(index_elements=[secrets.c.tenant_id, secrets.c.name], set_=values)
    return _secret_info((await session.execute(stmt.returning(*_SECRET_INFO))).one())


async def delete_secret(session: AsyncSession, *, tenant: str, name: str) -> bool:
    """Forget a secret; whether there was one."""
    stmt = delete(secrets).where(secrets.c.tenant_id == tenant, secrets.c.name == name)
    return bool((await session.execute(stmt)).rowcount)  # type: ignore[attr-defined]


async def sealed_secrets(session: AsyncSession, *, tenant: str, names: Sequence[str]) -> dict[str, bytes]:
    """The sealed values of those of ``names`` the tenant has stored."""
    stmt = select(secrets.c.name, secrets.c.ciphertext).where(
        secrets.c.tenant_id == tenant, secrets.c.name.in_(list(names))
    )
    return {r.name: bytes(r.ciphertext) for r in await session.execute(stmt)}


async def secrets_sealed_with_other(session: AsyncSession, *, key_id: str, limit: int) -> list[tuple[str, str, bytes]]:
    """Up to ``limit`` secret rows sealed under another key than ``key_id`` (to re-seal after a rotation)."""
    stmt = (
        select(secrets.c.tenant_id, secrets.c.name, secrets.c.ciphertext)
        .where(secrets.c.key_id != key_id)
        .order_by(secrets.c.tenant_id, secrets.c.name)
        .limit(limit)
    )
    return [(r.tenant_id, r.name, bytes(r.ciphertext)) for r in await session.execute(stmt)]


async def reseal_secret(session: AsyncSession, *, tenant: str, name: str, old: bytes, new: bytes, key_id: str) -> bool:
    """Replace a secret row's ciphertext if it is still ``old`` (a value stored meanwhile wins); whether it was."""
    stmt = (
        update(secrets)
        .where(secrets.c.tenant_id == tenant, secrets.c.name == name, secrets.c.ciphertext == old)
        .values(ciphertext=new, key_id=key_id)
    )
    return bool((await session.execute(stmt)).rowcount)  # type: ignore[attr-defined]
