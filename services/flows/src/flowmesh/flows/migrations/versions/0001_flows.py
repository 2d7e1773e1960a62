"""Flows (drafts) and their immutable versions.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB, UUID

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

S = "flows"


def upgrade() -> None:
    op.create_table(
        "flows",
        sa.Column("id", UUID(as_uuid=False), primary_key=True),
        sa.Column("tenant_id", sa.Text, nullable=False),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("description", sa.Text),
        sa.Column("definition", JSONB, nullable=False),
        sa.Column("input_schema", JSONB),
        sa.Column("settings", JSONB, nullable=False, server_default="{}"),
        sa.Column("revision", sa.Integer, nullable=False, server_default="1"),
        sa.Column("active", sa.Boolean, nullable=False, server_default=sa.true()),
        sa.Column("active_version", sa.Integer),
        sa.Column("latest_version", sa.Integer),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("deleted_at", sa.DateTime(timezone=True)),
        schema=S,
    )
    op.create_index(
        "flows_tenant_updated",
        "flows",
        ["tenant_id", sa.text("updated_at DESC"), sa.text("id DESC")],
        schema=S,
        postgresql_where=sa.text("deleted_at IS NULL"),
    )
    op.create_table(
        "flow_versions",
        sa.Column("flow_id", UUID(as_uuid=False), sa.ForeignKey(f"{S}.flows.id"), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("tenant_id", sa.Text, nullable=False),
        sa.Column("definition", JSONB, nullable=False),
        sa.Column("input_schema", JSONB),
        sa.Column("settings", JSONB, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("flow_id", "version"),
        schema=S,
    )
    # a published version is immutable in the database too, whatever code runs against it
    op.execute(f"""
        CREATE FUNCTION {S}.refuse_version_update() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            RAISE EXCEPTION 'flow versions are immutable (flow %, version %)', OLD.flow_id, OLD.version;
        END $$;
    """)
    op.execute(f"""
        CREATE TRIGGER flow_versions_immutable BEFORE UPDATE ON {S}.flow_versions
        FOR EACH ROW EXECUTE FUNCTION {S}.refuse_version_update();
    """)


def downgrade() -> None:
    op.drop_table("flow_versions", schema=S)
    op.drop_table("flows", schema=S)
    op.execute(f"DROP FUNCTION IF EXISTS {S}.refuse_version_update()")
