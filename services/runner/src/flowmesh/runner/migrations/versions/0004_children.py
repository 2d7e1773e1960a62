"""Child runs of foreach steps know their element's index.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

S = "runner"


def upgrade() -> None:
    op.add_column("runs", sa.Column("parent_index", sa.Integer), schema=S)
    op.drop_index("runs_parent", table_name="runs", schema=S)
    op.create_index(
        "runs_parent",
        "runs",
        ["parent_run_id", "parent_step_id"],
        schema=S,
        postgresql_where=sa.text("parent_run_id IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index("runs_parent", table_name="runs", schema=S)
    op.create_index(
        "runs_parent", "runs", ["parent_run_id"], schema=S, postgresql_where=sa.text("parent_run_id IS NOT NULL")
    )
    op.drop_column("runs", "parent_index", schema=S)
