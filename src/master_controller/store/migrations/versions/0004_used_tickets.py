"""redeemed viewer tickets (single-use tickets)

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30 20:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "used_tickets",
        sa.Column("jti", sa.String(length=64), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("jti"),
    )
    op.create_index("ix_used_tickets_expires_at", "used_tickets", ["expires_at"])


def downgrade() -> None:
    op.drop_index("ix_used_tickets_expires_at", table_name="used_tickets")
    op.drop_table("used_tickets")
