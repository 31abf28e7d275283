"""drop indexes no query uses

Every touch sent writes an event and rewrites its enrollment, and each index on them is one
more write: on PostgreSQL these three cost some 5 % of a dispatch run. No query reads
events by (sequence, kind) (the reports read ix_events_report, which leads with sequence)
or by touch_id, and the unique (prospect_id, sequence) of enrollments serves every lookup by
prospect_id, the foreign key's included.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02
"""
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_index("ix_events_sequence_kind", table_name="events")
    op.drop_index("ix_events_touch_id", table_name="events")
    op.drop_index("ix_enrollments_prospect_id", table_name="enrollments")


def downgrade() -> None:
    op.create_index("ix_enrollments_prospect_id", "enrollments", ["prospect_id"])
    op.create_index("ix_events_touch_id", "events", ["touch_id"])
    op.create_index("ix_events_sequence_kind", "events", ["sequence", "kind"])
