"""Every SQL statement of the usage service. Every query of tenant data filters by tenant.

Statements that lock several rows (the metering upserts) take them in key order, so two replicas
metering overlapping batches wait for each other instead of deadlocking.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import date, datetime
from typing import Any, Final

from flowmesh.contracts.ids import utcnow
from flowmesh.contracts.models.audit import AuditAction, AuditEntry, AuditRead, AuditTarget, AuditTargetType
from flowmesh.contracts.models.usage import ApiKeyInfo, FlowStats, Plan, PlanCaps, SecretInfo, UsageDay
from flowmesh.runtime import audit as audit_log
from flowmesh.runtime.db import Connection
from flowmesh.usage.domain import COUNTERS, Counts, RunFact

SCHEMA: Final = "usage"
"""The service's schema (its migrations create it)."""


def _changed(status: str) -> int:
    """How many rows a statement changed, from its status (``DELETE 3``, ``UPDATE 1``)."""
    return int(status.rsplit(" ", 1)[-1])


# --- metering ---------------------------------------------------------------------------------------

_CLAIM: Final = (
    "INSERT INTO usage.metered_events (event_id, metered_at) "
    "SELECT id, $2::timestamptz FROM unnest($1::uuid[]) AS t(id) "
    "ON CONFLICT (event_id) DO NOTHING RETURNING event_id::text"
)


async def claim_events(conn: Connection, *, event_ids: Sequence[str], now: datetime) -> set[str]:
    """Record events as metered; the ids that were not metered before (the others are duplicates).

    A concurrent transaction claiming the same id waits for this one and then finds it claimed,
    so an event counts once however many replicas see it.
    """
    if not event_ids:
        return set()
    return {r[0] for r in await conn.fetch(_CLAIM, list(event_ids), now)}


def _add_counts_sql(table: str, period: str) -> str:
    columns = ", ".join(COUNTERS)
    arrays = ", ".join(f"${i}::bigint[]" for i in range(3, 3 + len(COUNTERS)))
    return (
        f"INSERT INTO usage.{table} AS u (tenant_id, {period}, {columns}) "
        f"SELECT * FROM unnest($1::text[], $2::date[], {arrays}) "
        f"ON CONFLICT (tenant_id, {period}) DO UPDATE SET "
        + ", ".join(f"{name} = u.{name} + excluded.{name}" for name in COUNTERS)
    )


_ADD_DAILY: Final = _add_counts_sql("usage_daily", "day")
_ADD_MONTHLY: Final = _add_counts_sql("usage_monthly", "month")


async def _add_counts(conn: Connection, sql: str, sums: dict[tuple[str, date], Counts]) -> None:
    # one statement over arrays, rows in key order (replicas take the row locks in the same order)
    if not sums:
        return
    keys = sorted(sums)
    counters = ([getattr(sums[k], name) for k in keys] for name in COUNTERS)
    await conn.execute(sql, [t for t, _ in keys], [d for _, d in keys], *counters)


async def add_daily(conn: Connection, *, sums: dict[tuple[str, date], Counts]) -> None:
    """Add counters per (tenant, day): one upsert per row, rows in key order."""
    await _add_counts(conn, _ADD_DAILY, sums)


async def add_monthly(conn: Connection, *, sums: dict[tuple[str, date], Counts]) -> None:
    """Add counters per (tenant, first day of the month)."""
    await _add_counts(conn, _ADD_MONTHLY, sums)


_RUN_FACTS: Final = (
    "INSERT INTO usage.run_stats AS r "
    "(run_id, tenant_id, flow_id, queued_at, status, duration_ms, completed_at, final_seq) "
    "SELECT * FROM unnest($1::uuid[], $2::text[], $3::uuid[], $4::timestamptz[], $5::text[], $6::bigint[], "
    "$7::timestamptz[], $8::int[]) "
    "ON CONFLICT (run_id) DO UPDATE SET queued_at = LEAST(r.queued_at, excluded.queued_at), "
    + ", ".join(
        f"{c} = CASE WHEN excluded.final_seq > COALESCE(r.final_seq, -1) THEN excluded.{c} ELSE r.{c} END"
        for c in ("status", "duration_ms", "completed_at", "final_seq")
    )
)


async def put_run_facts(conn: Connection, *, facts: Iterable[RunFact]) -> None:
    """Keep per-run statistics: the earliest queue time, and the outcome with the highest ``seq``.

    One statement over arrays, whatever the number of runs (a multi-row VALUES would be prepared
    anew for every batch size).
    """
    ordered = sorted(facts, key=lambda f: f.run_id)
    if not ordered:
        return
    await conn.execute(
        _RUN_FACTS,
        [f.run_id for f in ordered],
        [f.tenant_id for f in ordered],
        [f.flow_id for f in ordered],
        [f.queued_at for f in ordered],
        [f.status for f in ordered],
        [f.duration_ms for f in ordered],
        [f.completed_at for f in ordered],
        [f.final_seq for f in ordered],
    )


async def prune_metered(conn: Connection, *, before: datetime, limit: int) -> int:
    """Forget up to ``limit`` metered event ids recorded before ``before``; how many were forgotten."""
    status = await conn.execute(
        "DELETE FROM usage.metered_events WHERE event_id IN "
        "(SELECT event_id FROM usage.metered_events WHERE metered_at < $1 LIMIT $2)",
        before,
        limit,
    )
    return _changed(status)


# --- plans and tenants ------------------------------------------------------------------------------


async def load_plans(conn: Connection) -> dict[str, Plan]:
    """Every plan by name."""
    rows = await conn.fetch("SELECT * FROM usage.plans")
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


async def tenant_plans(conn: Connection, *, tenant_ids: Iterable[str]) -> dict[str, tuple[str, int]]:
    """The plan and plan revision of each tenant that has a plan of its own."""
    ids = sorted(set(tenant_ids))
    if not ids:
        return {}
    rows = await conn.fetch(
        "SELECT tenant_id, plan, plan_revision FROM usage.tenants WHERE tenant_id = ANY($1::text[])", ids
    )
    return {r["tenant_id"]: (r["plan"], r["plan_revision"]) for r in rows}


async def own_plan_locked(conn: Connection, *, tenant: str) -> str | None:
    """The plan a tenant was given (None: it has the default), its row locked until the transaction ends."""
    plan: str | None = await conn.fetchval("SELECT plan FROM usage.tenants WHERE tenant_id = $1 FOR UPDATE", tenant)
    return plan


async def set_plan(conn: Connection, *, tenant: str, plan: str, now: datetime) -> int:
    """Give a tenant a plan (creating its record if new); the assignment's revision."""
    revision = await conn.fetchval(
        "INSERT INTO usage.tenants AS t (tenant_id, plan, plan_revision, created_at, updated_at) "
        "VALUES ($1, $2, 1, $3, $3) ON CONFLICT (tenant_id) DO UPDATE SET "
        "plan = excluded.plan, plan_revision = t.plan_revision + 1, updated_at = excluded.updated_at "
        "RETURNING plan_revision",
        tenant,
        plan,
        now,
    )
    return int(revision)


# --- reads --------------------------------------------------------------------------------------------

_COUNTER_COLUMNS: Final = ", ".join(COUNTERS)


async def month_counts(conn: Connection, *, tenant: str, month: date) -> Counts:
    """A tenant's counters for one month (zeros when nothing was metered)."""
    row = await conn.fetchrow(
        f"SELECT {_COUNTER_COLUMNS} FROM usage.usage_monthly WHERE tenant_id = $1 AND month = $2", tenant, month
    )
    return Counts.from_row(row)


async def month_runs(conn: Connection, *, tenant_ids: Iterable[str], month: date) -> dict[str, int]:
    """Runs metered this month per tenant (absent: none)."""
    ids = sorted(set(tenant_ids))
    if not ids:
        return {}
    rows = await conn.fetch(
        "SELECT tenant_id, runs FROM usage.usage_monthly WHERE tenant_id = ANY($1::text[]) AND month = $2", ids, month
    )
    return {r["tenant_id"]: int(r["runs"]) for r in rows}


async def daily_usage(conn: Connection, *, tenant: str, first: date, last: date) -> list[UsageDay]:
    """A tenant's days with usage from ``first`` to ``last`` inclusive, oldest first."""
    rows = await conn.fetch(
        f"SELECT tenant_id, day, {_COUNTER_COLUMNS} FROM usage.usage_daily "
        "WHERE tenant_id = $1 AND day >= $2 AND day <= $3 ORDER BY day",
        tenant,
        first,
        last,
    )
    return [UsageDay(date=r["day"], tenant_id=r["tenant_id"], **Counts.from_row(r).as_dict()) for r in rows]


_FLOW_STATS: Final = (
    "SELECT count(*) AS total,"
    " count(*) FILTER (WHERE status = 'succeeded') AS succeeded,"
    " count(*) FILTER (WHERE status = 'failed') AS failed,"
    " count(*) FILTER (WHERE status = 'cancelled') AS cancelled,"
    " count(*) FILTER (WHERE status = 'timedOut') AS timed_out,"
    " avg(duration_ms) FILTER (WHERE status IS NOT NULL) AS avg,"
    " percentile_cont(0.95) WITHIN GROUP (ORDER BY duration_ms) FILTER (WHERE status IS NOT NULL) AS p95,"
    " max(COALESCE(queued_at, completed_at)) AS last"
    " FROM usage.run_stats WHERE tenant_id = $1 AND flow_id = $2"
)


async def flow_stats(conn: Connection, *, tenant: str, flow_id: str) -> FlowStats:
    """Executions of one flow: counts by outcome, average and p95 duration of finished runs, the last start."""
    r = await conn.fetchrow(_FLOW_STATS, tenant, flow_id)
    return FlowStats(
        executions_total=r["total"],
        succeeded=r["succeeded"],
        failed=r["failed"],
        cancelled=r["cancelled"],
        timed_out=r["timed_out"],
        avg_duration_ms=None if r["avg"] is None else round(float(r["avg"]), 3),
        p95_duration_ms=None if r["p95"] is None else round(float(r["p95"]), 3),
        last_executed_at=r["last"],
    )


# --- API keys ---------------------------------------------------------------------------------------

_KEY_INFO: Final = "provider, key_hint, created_at, last_used_at"


def _info(row: Any) -> ApiKeyInfo:
    return ApiKeyInfo(
        provider=row["provider"],
        key_hint=row["key_hint"],
        created_at=row["created_at"],
        last_used_at=row["last_used_at"],
    )


async def list_keys(conn: Connection, *, tenant: str) -> list[ApiKeyInfo]:
    """The tenant's stored keys (hints only), by provider."""
    rows = await conn.fetch(f"SELECT {_KEY_INFO} FROM usage.api_keys WHERE tenant_id = $1 ORDER BY provider", tenant)
    return [_info(r) for r in rows]


async def put_key(
    conn: Connection, *, tenant: str, provider: str, ciphertext: bytes, key_id: str, hint: str, now: datetime
) -> ApiKeyInfo:
    """Store a provider's key, replacing the one before (a new key: new ``createdAt``, never used)."""
    row = await conn.fetchrow(
        "INSERT INTO usage.api_keys (tenant_id, provider, ciphertext, key_id, key_hint, created_at, last_used_at) "
        "VALUES ($1, $2, $3, $4, $5, $6, NULL) ON CONFLICT (tenant_id, provider) DO UPDATE SET "
        "ciphertext = excluded.ciphertext, key_id = excluded.key_id, key_hint = excluded.key_hint, "
        f"created_at = excluded.created_at, last_used_at = NULL RETURNING {_KEY_INFO}",
        tenant,
        provider,
        ciphertext,
        key_id,
        hint,
        now,
    )
    return _info(row)


async def delete_key(conn: Connection, *, tenant: str, provider: str) -> bool:
    """Forget a provider's key; whether there was one."""
    status = await conn.execute("DELETE FROM usage.api_keys WHERE tenant_id = $1 AND provider = $2", tenant, provider)
    return bool(_changed(status))


async def use_key(conn: Connection, *, tenant: str, provider: str, now: datetime) -> bytes | None:
    """A provider's sealed key, marked as used now; None when there is none."""
    found = await conn.fetchval(
        "UPDATE usage.api_keys SET last_used_at = $3 WHERE tenant_id = $1 AND provider = $2 RETURNING ciphertext",
        tenant,
        provider,
        now,
    )
    return None if found is None else bytes(found)


async def keys_sealed_with_other(conn: Connection, *, key_id: str, limit: int) -> list[tuple[str, str, bytes]]:
    """Up to ``limit`` rows sealed under another key than ``key_id`` (to re-seal after a rotation)."""
    rows = await conn.fetch(
        "SELECT tenant_id, provider, ciphertext FROM usage.api_keys WHERE key_id <> $1 "
        "ORDER BY tenant_id, provider LIMIT $2",
        key_id,
        limit,
    )
    return [(r["tenant_id"], r["provider"], bytes(r["ciphertext"])) for r in rows]


async def reseal_key(conn: Connection, *, tenant: str, provider: str, old: bytes, new: bytes, key_id: str) -> bool:
    """Replace a row's ciphertext if it is still ``old`` (a key stored meanwhile wins); whether it was."""
    status = await conn.execute(
        "UPDATE usage.api_keys SET ciphertext = $4, key_id = $5 WHERE tenant_id = $1 AND provider = $2 "
        "AND ciphertext = $3",
        tenant,
        provider,
        old,
        new,
        key_id,
    )
    return bool(_changed(status))


# --- audit --------------------------------------------------------------------------------------------


async def audit(
    conn: Connection,
    *,
    tenant: str,
    actor: str,
    action: AuditAction,
    target: tuple[AuditTargetType, str],
    details: dict[str, Any] | None = None,
) -> AuditEntry:
    """Record a change in the audit log inside the caller's transaction (the change's own), e.g.
    ``await repo.audit(conn, tenant=t, actor=ctx.subject, action="secret.put", target=("secret", name))``.

    ``target`` is (type, id); ``details`` must never hold a secret or key value.
    """
    return await audit_log.append(
        conn,
        SCHEMA,
        tenant=tenant,
        actor=actor,
        action=action,
        target=AuditTarget(type=target[0], id=target[1]),
        details=details,
        now=utcnow(),
    )


async def read_audit(conn: Connection, *, tenant: str | None, q: AuditRead) -> list[AuditEntry]:
    """A page of audit entries of ``tenant`` (every tenant's when None), newest first."""
    return await audit_log.read(conn, SCHEMA, tenant=tenant, q=q)


# --- tenant secrets ---------------------------------------------------------------------------------

_SECRET_INFO: Final = "name, hint, created_at, updated_at"


def _secret_info(row: Any) -> SecretInfo:
    return SecretInfo(name=row["name"], hint=row["hint"], created_at=row["created_at"], updated_at=row["updated_at"])


async def list_secrets(conn: Connection, *, tenant: str) -> list[SecretInfo]:
    """The tenant's stored secrets (hints only), by name."""
    rows = await conn.fetch(f"SELECT {_SECRET_INFO} FROM usage.secrets WHERE tenant_id = $1 ORDER BY name", tenant)
    return [_secret_info(r) for r in rows]


async def put_secret(
    conn: Connection, *, tenant: str, name: str, ciphertext: bytes, key_id: str, hint: str, now: datetime
) -> SecretInfo:
    """Store a secret, replacing the value of one of the same name (which keeps its ``createdAt``)."""
    row = await conn.fetchrow(
        "INSERT INTO usage.secrets (tenant_id, name, ciphertext, key_id, hint, created_at, updated_at) "
        "VALUES ($1, $2, $3, $4, $5, $6, $6) ON CONFLICT (tenant_id, name) DO UPDATE SET "
        "ciphertext = excluded.ciphertext, key_id = excluded.key_id, hint = excluded.hint, "
        f"updated_at = excluded.updated_at RETURNING {_SECRET_INFO}",
        tenant,
        name,
        ciphertext,
        key_id,
        hint,
        now,
    )
    return _secret_info(row)


async def delete_secret(conn: Connection, *, tenant: str, name: str) -> bool:
    """Forget a secret; whether there was one."""
    status = await conn.execute("DELETE FROM usage.secrets WHERE tenant_id = $1 AND name = $2", tenant, name)
    return bool(_changed(status))


async def sealed_secrets(conn: Connection, *, tenant: str, names: Sequence[str]) -> dict[str, bytes]:
    """The sealed values of those of ``names`` the tenant has stored."""
    rows = await conn.fetch(
        "SELECT name, ciphertext FROM usage.secrets WHERE tenant_id = $1 AND name = ANY($2::text[])",
        tenant,
        list(names),
    )
    return {r["name"]: bytes(r["ciphertext"]) for r in rows}


async def secrets_sealed_with_other(conn: Connection, *, key_id: str, limit: int) -> list[tuple[str, str, bytes]]:
    """Up to ``limit`` secret rows sealed under another key than ``key_id`` (to re-seal after a rotation)."""
    rows = await conn.fetch(
        "SELECT tenant_id, name, ciphertext FROM usage.secrets WHERE key_id <> $1 ORDER BY tenant_id, name LIMIT $2",
        key_id,
        limit,
    )
    return [(r["tenant_id"], r["name"], bytes(r["ciphertext"])) for r in rows]


async def reseal_secret(conn: Connection, *, tenant: str, name: str, old: bytes, new: bytes, key_id: str) -> bool:
    """Replace a secret row's ciphertext if it is still ``old`` (a value stored meanwhile wins); whether it was."""
    status = await conn.execute(
        "UPDATE usage.secrets SET ciphertext = $4, key_id = $5 WHERE tenant_id = $1 AND name = $2 AND ciphertext = $3",
        tenant,
        name,
        old,
        new,
        key_id,
    )
    return bool(_changed(status))
