"""Baseline of the usage schema: the schema itself (created by the runtime); tables come with features.

Revision ID: 0001
Revises:
"""

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Nothing beyond the schema yet; later revisions add this service's tables."""


def downgrade() -> None:
    """Nothing to undo."""
