"""The ``usage`` schema, as SQLAlchemy Core tables (migrations create it; ``repo`` queries it)."""

from sqlalchemy import (
    BigInteger,
    Column,
    Date,
    DateTime,
    ForeignKey,
    Integer,
    LargeBinary,
    MetaData,
    Numeric,
    PrimaryKeyConstraint,
    Table,
    Text,
)
from sqlalchemy.dialects.postgresql import UUID

from flowmesh.runtime.audit import audit_table
from flowmesh.usage.domain import COUNTERS, PLAN_CAPS

SCHEMA = "usage"
metadata = MetaData(schema=SCHEMA)
TS = DateTime(timezone=True)

# the plans as data, so they change without a release; seeded from flowmesh.contracts.plans; limits NULL = unlimited
plans = Table(
    "plans",
    metadata,
    Column("name", Text, primary_key=True),
    Column("flows", Integer),
    Column("runs_per_month", Integer),
    Column("runs_in_flight", Integer),
    Column("requests_per_second", Integer),
    Column("overage_per_1000_runs_usd", Numeric(12, 4)),
    # caps per run, flow, connection and sender (P9, PlanCaps); BigInteger: byte counts
    *(Column(cap, BigInteger) for cap in PLAN_CAPS),
)

# a tenant with a plan of its own (the others have FLOWMESH_DEFAULT_PLAN)
tenants = Table(
    "tenants",
    metadata,
    Column("tenant_id", Text, primary_key=True),
    Column("plan", Text, ForeignKey("plans.name"), nullable=False),
    Column("plan_revision", Integer, nullable=False),
    Column("created_at", TS, nullable=False),
    Column("updated_at", TS, nullable=False),
)

# every run event ever metered, by id: a redelivered or re-published event is counted once
metered_events = Table(
    "metered_events",
    metadata,
    Column("event_id", UUID(as_uuid=False), primary_key=True),
    Column("metered_at", TS, nullable=False),
)


def _counter_columns() -> list[Column[int]]:
    return [Column(name, BigInteger, nullable=False, server_default="0") for name in COUNTERS]


usage_daily = Table(
    "usage_daily",
    metadata,
    Column("tenant_id", Text, nullable=False),
    Column("day", Date, nullable=False),
    *_counter_columns(),
    PrimaryKeyConstraint("tenant_id", "day"),
)

# the same counters per billing month (``month`` is its first day): one row answers a quota check
usage_monthly = Table(
    "usage_monthly",
    metadata,
    Column("tenant_id", Text, nullable=False),
    Column("month", Date, nullable=False),
    *_counter_columns(),
    PrimaryKeyConstraint("tenant_id", "month"),
)

# one row per run, for flow statistics: when it was queued, and its latest final outcome
run_stats = Table(
    "run_stats",
    metadata,
    Column("run_id", UUID(as_uuid=False), primary_key=True),
    Column("tenant_id", Text, nullable=False),
    Column("flow_id", UUID(as_uuid=False), nullable=False),
    Column("queued_at", TS),
    Column("status", Text),
    Column("duration_ms", BigInteger),
    Column("completed_at", TS),
    Column("final_seq", Integer),
)

api_keys = Table(
    "api_keys",
    metadata,
    Column("tenant_id", Text, nullable=False),
    Column("provider", Text, nullable=False),
    Column("ciphertext", LargeBinary, nullable=False),
    Column("key_id", Text, nullable=False),
    Column("key_hint", Text, nullable=False),
    Column("created_at", TS, nullable=False),
    Column("last_used_at", TS),
    PrimaryKeyConstraint("tenant_id", "provider"),
)

audit = audit_table(metadata)
"""Append-only: who stored or removed provider keys and secrets, who changed plans (``flowmesh.runtime.audit``)."""

secrets = Table(
    "secrets",
    metadata,
    Column("tenant_id", Text, nullable=False),
    Column("name", Text, nullable=False),
    Column("ciphertext", LargeBinary, nullable=False),
    Column("key_id", Text, nullable=False),
    Column("hint", Text, nullable=False),
    Column("created_at", TS, nullable=False),
    Column("updated_at", TS, nullable=False),
    PrimaryKeyConstraint("tenant_id", "name"),
)
