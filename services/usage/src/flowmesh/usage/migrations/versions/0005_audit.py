"""The audit log of provider keys, plans and secrets: append-only (a trigger refuses UPDATE, DELETE and TRUNCATE).

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB, UUID

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

S = "usage"


def upgrade() -> None:
    op.create_table(
        "audit",
        sa.Column("id", UUID(as_uuid=False), primary_key=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("tenant_id", sa.Text, nullable=False),
        sa.Column("actor", sa.Text, nullable=False),
        sa.Column("action", sa.Text, nullable=False),
        sa.Column("target_type", sa.Text, nullable=False),
        sa.Column("target_id", sa.Text, nullable=False),
        sa.Column("target_name", sa.Text),
        sa.Column("details", JSONB, nullable=False),
        schema=S,
    )
    op.create_index("audit_tenant_at", "audit", ["tenant_id", sa.text("at DESC"), sa.text("id DESC")], schema=S)
    op.create_index("audit_at", "audit", [sa.text("at DESC"), sa.text("id DESC")], schema=S)
    # append-only in the database too: the service's own role (the table's owner) is refused alike
    op.execute(
        f"CREATE FUNCTION {S}.audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        "RAISE EXCEPTION 'the audit log is append-only: % refused', TG_OP USING ERRCODE = 'insufficient_privilege'; "
        "END $$"
    )
    op.execute(
        f"CREATE TRIGGER audit_append_only BEFORE UPDATE OR DELETE ON {S}.audit "
        f"FOR EACH ROW EXECUTE FUNCTION {S}.audit_append_only()"
    )
    op.execute(
        f"CREATE TRIGGER audit_no_truncate BEFORE TRUNCATE ON {S}.audit "
        f"FOR EACH STATEMENT EXECUTE FUNCTION {S}.audit_append_only()"
    )


def downgrade() -> None:
    op.drop_table("audit", schema=S)
    op.execute(f"DROP FUNCTION {S}.audit_append_only()")
