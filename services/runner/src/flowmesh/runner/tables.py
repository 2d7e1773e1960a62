"""The ``runner`` schema, as SQLAlchemy Core tables (migrations create it; ``repo`` queries it)."""

from sqlalchemy import BigInteger, Boolean, Column, DateTime, Integer, MetaData, PrimaryKeyConstraint, Table, Text
from sqlalchemy.dialects.postgresql import JSONB, UUID

SCHEMA = "runner"
metadata = MetaData(schema=SCHEMA)

# the runner's own copy of each frozen version it runs: in-flight runs never depend on the flows service
versions = Table(
    "versions",
    metadata,
    Column("flow_id", UUID(as_uuid=False), nullable=False),
    Column("version", Integer, nullable=False),
    Column("tenant_id", Text, nullable=False),
    Column("definition", JSONB, nullable=False),
    Column("input_schema", JSONB),
    Column("settings", JSONB, nullable=False),
    PrimaryKeyConstraint("flow_id", "version"),
)

runs = Table(
    "runs",
    metadata,
    Column("id", UUID(as_uuid=False), primary_key=True),
    Column("tenant_id", Text, nullable=False),
    Column("flow_id", UUID(as_uuid=False), nullable=False),
    Column("version", Integer, nullable=False),
    Column("status", Text, nullable=False),
    Column("trigger_type", Text, nullable=False),
    Column("trigger_id", Text),
    Column("input", JSONB),
    Column("output", JSONB),
    Column("error", JSONB),
    Column("idempotency_key", Text),
    Column("input_hash", Text),
    Column("parent_run_id", UUID(as_uuid=False)),
    Column("parent_step_id", Text),
    Column("parent_index", Integer),
    Column("retry_of", UUID(as_uuid=False)),
    Column("retry_count", Integer, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("started_at", DateTime(timezone=True)),
    Column("completed_at", DateTime(timezone=True)),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Column("last_seq", Integer, nullable=False),
    Column("published_seq", Integer, nullable=False),
    Column("deadline_at", DateTime(timezone=True)),
    Column("traceparent", Text),
    Column("revision", BigInteger, nullable=False, server_default="0"),
)

step_runs = Table(
    "step_runs",
    metadata,
    Column("run_id", UUID(as_uuid=False), nullable=False),
    Column("step_id", Text, nullable=False),
    Column("type", Text, nullable=False),
    Column("status", Text, nullable=False),
    Column("handle", Text),
    Column("handled", Boolean, nullable=False),
    Column("attempt", Integer, nullable=False),
    Column("input", JSONB),
    Column("output", JSONB),
    Column("error", JSONB),
    Column("started_at", DateTime(timezone=True)),
    Column("completed_at", DateTime(timezone=True)),
    Column("duration_ms", Integer),
    Column("next_attempt_at", DateTime(timezone=True)),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Column("wait_for", Text),
    Column("deadline_at", DateTime(timezone=True)),
    # a step executed by the worker that made it ready, with no work message: until when that worker
    # answers for it (extended while the attempt runs; the sweep re-sends the step's work after it)
    Column("lease_until", DateTime(timezone=True)),
    PrimaryKeyConstraint("run_id", "step_id"),
)

run_events = Table(
    "run_events",
    metadata,
    Column("run_id", UUID(as_uuid=False), nullable=False),
    Column("seq", Integer, nullable=False),
    Column("id", UUID(as_uuid=False), nullable=False),
    Column("type", Text, nullable=False),
    Column("ts", DateTime(timezone=True), nullable=False),
    Column("step_id", Text),
    Column("attempt", Integer),
    Column("data", JSONB, nullable=False),
    PrimaryKeyConstraint("run_id", "seq"),
)

# event triggers, kept from fm.flows.{t}.triggerChanged: key is "{tenant token}.{eventType}"
event_triggers = Table(
    "event_triggers",
    metadata,
    Column("trigger_id", UUID(as_uuid=False), primary_key=True),
    Column("tenant_id", Text, nullable=False),
    Column("flow_id", UUID(as_uuid=False), nullable=False),
    Column("key", Text, nullable=False),
    Column("filter", Text),
    Column("enabled", Boolean, nullable=False),
)
