"""The runner's registry of event triggers, kept from the flows service's announcements.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import UUID

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

S = "runner"


def upgrade() -> None:
    op.create_table(
        "event_triggers",
        sa.Column("trigger_id", UUID(as_uuid=False), primary_key=True),
        sa.Column("tenant_id", sa.Text, nullable=False),
        sa.Column("flow_id", UUID(as_uuid=False), nullable=False),
        sa.Column("key", sa.Text, nullable=False),
        sa.Column("filter", sa.Text),
        sa.Column("enabled", sa.Boolean, nullable=False),
        schema=S,
    )
    op.create_index("event_triggers_key", "event_triggers", ["key"], schema=S)


def downgrade() -> None:
    op.drop_table("event_triggers", schema=S)
