"""Plans, tenants, metering (event ids, daily and monthly counters, run statistics) and API keys.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import UUID

from flowmesh.contracts.plans import PLANS

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

S = "usage"
TS = sa.DateTime(timezone=True)
COUNTERS = (
    "runs",
    "child_runs",
    "runs_succeeded",
    "runs_failed",
    "runs_cancelled",
    "runs_timed_out",
    "runs_refused",
    "steps",
    "step_ms",
    "input_tokens",
    "output_tokens",
)


def _counters() -> list[sa.Column]:  # type: ignore[type-arg]
    return [sa.Column(name, sa.BigInteger, nullable=False, server_default="0") for name in COUNTERS]


def upgrade() -> None:
    plans = op.create_table(
        "plans",
        sa.Column("name", sa.Text, primary_key=True),
        sa.Column("flows", sa.Integer),
        sa.Column("runs_per_month", sa.Integer),
        sa.Column("runs_in_flight", sa.Integer),
        sa.Column("requests_per_second", sa.Integer),
        sa.Column("overage_per_1000_runs_usd", sa.Numeric(12, 4)),
        schema=S,
    )
    # the plans a fresh installation starts with; from here on they are data (edit the rows)
    op.bulk_insert(
        plans,
        [
            {
                "name": p.name,
                "flows": p.flows,
                "runs_per_month": p.runs_per_month,
                "runs_in_flight": p.runs_in_flight,
                "requests_per_second": p.requests_per_second,
                "overage_per_1000_runs_usd": p.overage_per_1000_runs_usd,
            }
            for p in PLANS.values()
        ],
    )
    op.create_table(
        "tenants",
        sa.Column("tenant_id", sa.Text, primary_key=True),
        sa.Column("plan", sa.Text, sa.ForeignKey(f"{S}.plans.name"), nullable=False),
        sa.Column("plan_revision", sa.Integer, nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        schema=S,
    )
    op.create_table(
        "metered_events",
        sa.Column("event_id", UUID(as_uuid=False), primary_key=True),
        sa.Column("metered_at", TS, nullable=False),
        schema=S,
    )
    op.create_index("metered_events_at", "metered_events", ["metered_at"], schema=S)
    op.create_table(
        "usage_daily",
        sa.Column("tenant_id", sa.Text, nullable=False),
        sa.Column("day", sa.Date, nullable=False),
        *_counters(),
        sa.PrimaryKeyConstraint("tenant_id", "day"),
        schema=S,
    )
    op.create_table(
        "usage_monthly",
        sa.Column("tenant_id", sa.Text, nullable=False),
        sa.Column("month", sa.Date, nullable=False),
        *_counters(),
        sa.PrimaryKeyConstraint("tenant_id", "month"),
        schema=S,
    )
    op.create_table(
        "run_stats",
        sa.Column("run_id", UUID(as_uuid=False), primary_key=True),
        sa.Column("tenant_id", sa.Text, nullable=False),
        sa.Column("flow_id", UUID(as_uuid=False), nullable=False),
        sa.Column("queued_at", TS),
        sa.Column("status", sa.Text),
        sa.Column("duration_ms", sa.BigInteger),
        sa.Column("completed_at", TS),
        sa.Column("final_seq", sa.Integer),
        schema=S,
    )
    op.create_index("run_stats_flow", "run_stats", ["tenant_id", "flow_id"], schema=S)
    op.create_table(
        "api_keys",
        sa.Column("tenant_id", sa.Text, nullable=False),
        sa.Column("provider", sa.Text, nullable=False),
        sa.Column("ciphertext", sa.LargeBinary, nullable=False),
        sa.Column("key_id", sa.Text, nullable=False),
        sa.Column("key_hint", sa.Text, nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("last_used_at", TS),
        sa.PrimaryKeyConstraint("tenant_id", "provider"),
        schema=S,
    )


def downgrade() -> None:
    for table in ("api_keys", "run_stats", "usage_monthly", "usage_daily", "metered_events", "tenants", "plans"):
        op.drop_table(table, schema=S)
