"""A run's revision: one more with every change of the run.

A worker that holds a run as its own last change left it (the step it executes next) writes the
step's result in one statement that applies only if the run's revision is still the one it holds;
any change in between (another worker, a timer, a cancel) makes it take the run's lock instead.

Revision ID: 0010
Revises: 0009
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

S = "runner"


def upgrade() -> None:
    op.add_column("runs", sa.Column("revision", sa.BigInteger, nullable=False, server_default="0"), schema=S)


def downgrade() -> None:
    op.drop_column("runs", "revision", schema=S)
