"""The ``scheduler`` schema, as SQLAlchemy Core tables (migrations create it; ``repo`` queries it)."""

from sqlalchemy import BigInteger, Boolean, Column, DateTime, Integer, MetaData, PrimaryKeyConstraint, Table, Text
from sqlalchemy.dialects.postgresql import JSONB, UUID

SCHEMA = "scheduler"
metadata = MetaData(schema=SCHEMA)

schedules = Table(
    "schedules",
    metadata,
    Column("trigger_id", UUID(as_uuid=False), primary_key=True),
    Column("tenant_id", Text, nullable=False),
    Column("flow_id", UUID(as_uuid=False), nullable=False),
    Column("cron", Text, nullable=False),
    Column("timezone", Text, nullable=False),
    Column("misfire", Text, nullable=False),
    Column("enabled", Boolean, nullable=False),
    Column("flow_active", Boolean, nullable=False),
    Column("flow_published", Boolean, nullable=False),
    Column("valid", Boolean, nullable=False),
    Column("trigger_updated_at", DateTime(timezone=True), nullable=False),
    Column("flow_updated_at", DateTime(timezone=True), nullable=False),
    # the one due time the schedule waits for (NULL: not runnable)
    Column("next_due_at", DateTime(timezone=True)),
    # the last due time whose start JetStream acknowledged
    Column("last_fired_at", DateTime(timezone=True)),
    # a replica's claim on next_due_at: fired from its memory unless it lapses
    Column("claimed_by", Text),
    Column("claim_token", UUID(as_uuid=False)),
    Column("claim_until", DateTime(timezone=True)),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

timers = Table(
    "timers",
    metadata,
    Column("owner", Text, nullable=False),
    Column("key", Text, nullable=False),
    Column("due_at", DateTime(timezone=True), nullable=False),
    Column("payload", JSONB, nullable=False),
    Column("claimed_by", Text),
    Column("claim_token", UUID(as_uuid=False)),
    Column("claim_until", DateTime(timezone=True)),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    PrimaryKeyConstraint("owner", "key"),
)

sync_state = Table(
    "sync_state",
    metadata,
    Column("id", Integer, primary_key=True),
    # the highest FLOWS stream sequence applied here (max over the rows): below the stream's first, some
    # were missed
    Column("applied_seq", BigInteger, nullable=False),
)
