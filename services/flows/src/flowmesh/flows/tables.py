"""The ``flows`` schema, as SQLAlchemy Core tables (migrations create it; ``repo`` queries it)."""

from sqlalchemy import (
    Boolean,
    Column,
    DateTime,
    ForeignKeyConstraint,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    Table,
    Text,
)
from sqlalchemy.dialects.postgresql import JSONB, UUID

from flowmesh.runtime.audit import audit_table
from flowmesh.runtime.outbox import outbox_table

SCHEMA = "flows"
metadata = MetaData(schema=SCHEMA)

flows = Table(
    "flows",
    metadata,
    Column("id", UUID(as_uuid=False), primary_key=True),
    Column("tenant_id", Text, nullable=False),
    Column("name", Text, nullable=False),
    Column("description", Text),
    Column("definition", JSONB, nullable=False),
    Column("input_schema", JSONB),
    Column("settings", JSONB, nullable=False),
    Column("revision", Integer, nullable=False),
    Column("active", Boolean, nullable=False),
    Column("active_version", Integer),
    Column("latest_version", Integer),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Column("deleted_at", DateTime(timezone=True)),
)

flow_versions = Table(
    "flow_versions",
    metadata,
    Column("flow_id", UUID(as_uuid=False), nullable=False),
    Column("version", Integer, nullable=False),
    Column("tenant_id", Text, nullable=False),
    Column("definition", JSONB, nullable=False),
    Column("input_schema", JSONB),
    Column("settings", JSONB, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    PrimaryKeyConstraint("flow_id", "version"),
    ForeignKeyConstraint(["flow_id"], [f"{SCHEMA}.flows.id"]),
)

triggers = Table(
    "triggers",
    metadata,
    Column("id", UUID(as_uuid=False), primary_key=True),
    Column("tenant_id", Text, nullable=False),
    Column("flow_id", UUID(as_uuid=False), nullable=False),
    Column("type", Text, nullable=False),
    Column("name", Text, nullable=False),
    Column("config", JSONB, nullable=False),
    Column("enabled", Boolean, nullable=False),
    Column("token_hash", Text, unique=True),
    Column("signing_secret", Text),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    ForeignKeyConstraint(["flow_id"], [f"{SCHEMA}.flows.id"]),
)

outbox = outbox_table(metadata)

audit = audit_table(metadata)
"""Append-only: who created, changed, published, deleted … flows and triggers (see ``flowmesh.runtime.audit``)."""
