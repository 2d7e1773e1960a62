"""Schedules (the scheduler's copy of cron triggers), durable timers, and the sync mark.

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

S = "scheduler"


def upgrade() -> None:
    op.create_table(
        "schedules",
        sa.Column("trigger_id", UUID(as_uuid=False), primary_key=True),
        sa.Column("tenant_id", sa.Text, nullable=False),
        sa.Column("flow_id", UUID(as_uuid=False), nullable=False),
        sa.Column("cron", sa.Text, nullable=False),
        sa.Column("timezone", sa.Text, nullable=False),
        sa.Column("misfire", sa.Text, nullable=False),
        sa.Column("enabled", sa.Boolean, nullable=False),
        sa.Column("flow_active", sa.Boolean, nullable=False),
        sa.Column("flow_published", sa.Boolean, nullable=False),
        sa.Column("valid", sa.Boolean, nullable=False),
        sa.Column("trigger_updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("flow_updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("next_due_at", sa.DateTime(timezone=True)),
        sa.Column("last_fired_at", sa.DateTime(timezone=True)),
        sa.Column("claimed_by", sa.Text),
        sa.Column("claim_token", UUID(as_uuid=False)),
        sa.Column("claim_until", sa.DateTime(timezone=True)),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        schema=S,
    )
    op.create_index(
        "schedules_due", "schedules", ["next_due_at"], schema=S, postgresql_where=sa.text("next_due_at IS NOT NULL")
    )
    op.create_index("schedules_flow", "schedules", ["flow_id"], schema=S)
    op.create_table(
        "timers",
        sa.Column("owner", sa.Text, nullable=False),
        sa.Column("key", sa.Text, nullable=False),
        sa.Column("due_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("payload", JSONB, nullable=False),
        sa.Column("claimed_by", sa.Text),
        sa.Column("claim_token", UUID(as_uuid=False)),
        sa.Column("claim_until", sa.DateTime(timezone=True)),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("owner", "key"),
        schema=S,
    )
    op.create_index("timers_due", "timers", ["due_at"], schema=S)
    op.create_table(
        "sync_state",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("applied_seq", sa.BigInteger, nullable=False),
        schema=S,
    )


def downgrade() -> None:
    op.drop_table("sync_state", schema=S)
    op.drop_table("timers", schema=S)
    op.drop_table("schedules", schema=S)
