"""covering index for reports

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

COLUMNS = ["sequence", "step_id", "variant", "sender", "channel", "kind", "detail", "touch_id", "occurred_at"]


def upgrade() -> None:
    op.create_index("ix_events_report", "events", COLUMNS, postgresql_include=["id"])


def downgrade() -> None:
    op.drop_index("ix_events_report", table_name="events")
