"""A run's trace context: the ``traceparent`` of the request (or message) that started it.

Steps executed later (after a wait, a timer, a retry or a restart) continue the run's trace from it.

Revision ID: 0008
Revises: 0007
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

S = "runner"


def upgrade() -> None:
    op.add_column("runs", sa.Column("traceparent", sa.Text(), nullable=True), schema=S)


def downgrade() -> None:
    op.drop_column("runs", "traceparent", schema=S)
