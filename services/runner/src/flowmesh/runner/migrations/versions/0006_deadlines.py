"""Deadlines: when a run's time limit, or a step's wait or attempt, runs out.

The scheduler's durable timers act on them on time; these columns are the truth the timers are
checked against, and what the sweep reads to enforce a deadline whose timer was lost.

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

S = "runner"
TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.add_column("runs", sa.Column("deadline_at", TS), schema=S)
    op.add_column("step_runs", sa.Column("deadline_at", TS), schema=S)
    op.create_index(
        "runs_deadline",
        "runs",
        ["deadline_at"],
        schema=S,
        postgresql_where=sa.text("deadline_at IS NOT NULL AND status IN ('queued', 'running', 'waiting')"),
    )
    op.create_index(
        "step_runs_deadline",
        "step_runs",
        ["deadline_at"],
        schema=S,
        postgresql_where=sa.text("deadline_at IS NOT NULL AND status IN ('running', 'waiting')"),
    )


def downgrade() -> None:
    op.drop_index("step_runs_deadline", table_name="step_runs", schema=S)
    op.drop_index("runs_deadline", table_name="runs", schema=S)
    op.drop_column("step_runs", "deadline_at", schema=S)
    op.drop_column("runs", "deadline_at", schema=S)
