"""A tenant's top-level runs in flight (queued or running), counted at each start against its plan.

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

S = "runner"


def upgrade() -> None:
    op.create_index(
        "runs_in_flight",
        "runs",
        ["tenant_id"],
        schema=S,
        postgresql_where=sa.text("parent_run_id IS NULL AND status IN ('queued', 'running')"),
    )


def downgrade() -> None:
    op.drop_index("runs_in_flight", table_name="runs", schema=S)
