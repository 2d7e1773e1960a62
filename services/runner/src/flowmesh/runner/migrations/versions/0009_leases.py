"""Leases of steps a runner executes in its own process, with no work message.

A step handed to the worker that made it ready (the next step of a chain) is recorded with
``lease_until``; the worker extends it while the attempt runs, and the sweep re-sends the work of a
step whose lease ran out (its worker died).

Revision ID: 0009
Revises: 0008
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

S = "runner"


def upgrade() -> None:
    op.add_column("step_runs", sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True), schema=S)
    op.create_index(
        "step_runs_leased",
        "step_runs",
        ["lease_until"],
        schema=S,
        postgresql_where=sa.text("lease_until IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index("step_runs_leased", table_name="step_runs", schema=S)
    op.drop_column("step_runs", "lease_until", schema=S)
