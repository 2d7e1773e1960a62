"""The plans' caps per run, flow, connection and sender (P9): columns of ``plans``, seeded per plan.

Revision ID: 0004
Revises: 0003

Self-contained: the figures are written here as they were when this revision was made (a later
change of ``flowmesh.contracts.plans`` must not change what this revision did). A plan row an
operator added keeps NULL caps (none) until edited; the seeded plans get their figures.
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

S = "usage"
KIB = 1024
MIB = 1024 * KIB
CAPS = (
    "foreach_items",
    "children_per_run",
    "triggers_per_flow",
    "cron_min_interval_s",
    "websockets_per_token",
    "websockets_per_tenant",
    "webhooks_per_second",
    "step_output_bytes",
    "run_output_bytes",
)
FIGURES: dict[str, tuple[int | None, ...]] = {
    "free": (100, 100, 5, 300, 5, 10, 10, 256 * KIB, 256 * KIB),
    "pro": (1_000, 1_000, 20, 60, 20, 100, 100, MIB, MIB),
    "enterprise": (10_000, 10_000, 100, 1, 100, 1_000, 1_000, MIB, MIB),
    "high_frequency": (10_000, 10_000, 100, 1, 1_000, 10_000, None, MIB, MIB),
}


def upgrade() -> None:
    for cap in CAPS:
        op.add_column("plans", sa.Column(cap, sa.BigInteger), schema=S)
    plans = sa.table("plans", sa.column("name", sa.Text), *(sa.column(c, sa.BigInteger) for c in CAPS), schema=S)
    for name, figures in FIGURES.items():
        op.execute(plans.update().where(plans.c.name == name).values(dict(zip(CAPS, figures, strict=True))))


def downgrade() -> None:
    for cap in reversed(CAPS):
        op.drop_column("plans", cap, schema=S)
