"""What a waiting step waits for (``waitEvent``: the event's subject within fm.events).

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

S = "runner"


def upgrade() -> None:
    op.add_column("step_runs", sa.Column("wait_for", sa.Text), schema=S)
    op.create_index(
        "step_runs_waiting",
        "step_runs",
        ["wait_for"],
        schema=S,
        postgresql_where=sa.text("status = 'waiting' AND wait_for IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index("step_runs_waiting", table_name="step_runs", schema=S)
    op.drop_column("step_runs", "wait_for", schema=S)
