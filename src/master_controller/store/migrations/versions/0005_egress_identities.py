"""each user's sticky egress upstream, and upstreams' sealed credentials

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01 04:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "egress_assignments",
        sa.Column("user_id", sa.String(length=128), nullable=False),
        sa.Column("upstream", sa.String(length=300), nullable=False),
        sa.Column("assigned_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("exit_address", sa.String(length=64), nullable=True),
        sa.Column("checked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("check_ok", sa.Boolean(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("user_id"),
    )
    op.create_index("ix_egress_assignments_upstream", "egress_assignments", ["upstream"])
    op.create_table(
        "upstream_secrets",
        sa.Column("upstream", sa.String(length=300), nullable=False),
        sa.Column("key_id", sa.String(length=32), nullable=False),
        sa.Column("nonce", sa.LargeBinary(), nullable=False),
        sa.Column("ciphertext", sa.LargeBinary(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("upstream"),
    )


def downgrade() -> None:
    op.drop_table("upstream_secrets")
    op.drop_index("ix_egress_assignments_upstream", table_name="egress_assignments")
    op.drop_table("egress_assignments")
