"""sender_locks: what a dispatch batch holds while it spends its senders' capacity

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-04
"""
from alembic import op
import sqlalchemy as sa

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "sender_locks",
        sa.Column("sender", sa.String(length=320), nullable=False),
        sa.Column("held_by", sa.String(length=100), nullable=True),
        sa.Column("held_at", sa.DateTime(), nullable=True),
        sa.PrimaryKeyConstraint("sender", name=op.f("pk_sender_locks")),
    )


def downgrade() -> None:
    op.drop_table("sender_locks")
