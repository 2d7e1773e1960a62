"""Runs, their steps and events, and the runner's copy of frozen versions.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB, UUID

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

S = "runner"
TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "versions",
        sa.Column("flow_id", UUID(as_uuid=False), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("tenant_id", sa.Text, nullable=False),
        sa.Column("definition", JSONB, nullable=False),
        sa.Column("input_schema", JSONB),
        sa.Column("settings", JSONB, nullable=False),
        sa.PrimaryKeyConstraint("flow_id", "version"),
        schema=S,
    )
    op.create_table(
        "runs",
        sa.Column("id", UUID(as_uuid=False), primary_key=True),
        sa.Column("tenant_id", sa.Text, nullable=False),
        sa.Column("flow_id", UUID(as_uuid=False), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("trigger_type", sa.Text, nullable=False),
        sa.Column("trigger_id", sa.Text),
        sa.Column("input", JSONB),
        sa.Column("output", JSONB),
        sa.Column("error", JSONB),
        sa.Column("idempotency_key", sa.Text),
        sa.Column("input_hash", sa.Text),
        sa.Column("parent_run_id", UUID(as_uuid=False)),
        sa.Column("parent_step_id", sa.Text),
        sa.Column("retry_of", UUID(as_uuid=False)),
        sa.Column("retry_count", sa.Integer, nullable=False, server_default="0"),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("started_at", TS),
        sa.Column("completed_at", TS),
        sa.Column("updated_at", TS, nullable=False),
        sa.Column("last_seq", sa.Integer, nullable=False, server_default="0"),
        sa.Column("published_seq", sa.Integer, nullable=False, server_default="0"),
        schema=S,
    )
    op.create_index(
        "runs_tenant_created", "runs", ["tenant_id", sa.text("created_at DESC"), sa.text("id DESC")], schema=S
    )
    op.create_index(
        "runs_flow_created", "runs", ["tenant_id", "flow_id", sa.text("created_at DESC"), sa.text("id DESC")], schema=S
    )
    op.create_index(
        "runs_idempotency",
        "runs",
        ["tenant_id", "flow_id", "idempotency_key"],
        unique=True,
        schema=S,
        postgresql_where=sa.text("idempotency_key IS NOT NULL"),
    )
    op.create_index(
        "runs_open",
        "runs",
        ["updated_at"],
        schema=S,
        postgresql_where=sa.text("status IN ('queued', 'running', 'waiting') OR published_seq < last_seq"),
    )
    op.create_index(
        "runs_parent", "runs", ["parent_run_id"], schema=S, postgresql_where=sa.text("parent_run_id IS NOT NULL")
    )
    op.create_table(
        "step_runs",
        sa.Column("run_id", UUID(as_uuid=False), sa.ForeignKey(f"{S}.runs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("step_id", sa.Text, nullable=False),
        sa.Column("type", sa.Text, nullable=False),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("handle", sa.Text),
        sa.Column("handled", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("attempt", sa.Integer, nullable=False, server_default="0"),
        sa.Column("input", JSONB),
        sa.Column("output", JSONB),
        sa.Column("error", JSONB),
        sa.Column("started_at", TS),
        sa.Column("completed_at", TS),
        sa.Column("duration_ms", sa.Integer),
        sa.Column("next_attempt_at", TS),
        sa.Column("updated_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("run_id", "step_id"),
        schema=S,
    )
    op.create_table(
        "run_events",
        sa.Column("run_id", UUID(as_uuid=False), sa.ForeignKey(f"{S}.runs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("seq", sa.Integer, nullable=False),
        sa.Column("id", UUID(as_uuid=False), nullable=False),
        sa.Column("type", sa.Text, nullable=False),
        sa.Column("ts", TS, nullable=False),
        sa.Column("step_id", sa.Text),
        sa.Column("attempt", sa.Integer),
        sa.Column("data", JSONB, nullable=False),
        sa.PrimaryKeyConstraint("run_id", "seq"),
        schema=S,
    )


def downgrade() -> None:
    for table in ("run_events", "step_runs", "runs", "versions"):
        op.drop_table(table, schema=S)
