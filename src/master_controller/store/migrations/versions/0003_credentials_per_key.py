"""credentials belong to the API key that captured them; records say what they are bound to

One record per (api_key_id, user_id, provider) instead of per (user_id, provider): another
key signing the same user in no longer replaces (or reports on) the first key's record.
Existing rows keep their api_key_id; rows without one are reachable by admin keys only.
``binding`` says what a record's AEAD associated data covers: existing rows are 1 (record
id, user, provider); new rows are 2 (also the API key id), and a rotation makes every row 2.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30 18:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("credentials") as batch_op:
        batch_op.add_column(sa.Column("binding", sa.Integer(), server_default="1", nullable=False))
        batch_op.drop_index("ux_credentials_user_provider")
        batch_op.create_index(
            "ux_credentials_key_user_provider",
            ["api_key_id", "user_id", "provider"],
            unique=True,
        )


def downgrade() -> None:
    # The older code reads binding-1 records only, and one record per user and provider:
    # going back with anything else would lose credentials silently, so it is refused.
    connection = op.get_bind()
    newer = connection.execute(
        sa.text("SELECT count(*) FROM credentials WHERE binding <> 1")
    ).scalar_one()
    shared = connection.execute(
        sa.text(
            "SELECT count(*) FROM (SELECT user_id, provider FROM credentials "
            "GROUP BY user_id, provider HAVING count(*) > 1) AS several"
        )
    ).scalar_one()
    if newer or shared:
        raise RuntimeError(
            f"cannot downgrade below 0003: {newer} credential records are bound to their API "
            f"key and {shared} user/provider pairs have records under several keys; the older "
            "code could not read them (delete them first)"
        )
    with op.batch_alter_table("credentials") as batch_op:
        batch_op.drop_index("ux_credentials_key_user_provider")
        batch_op.create_index("ux_credentials_user_provider", ["user_id", "provider"], unique=True)
        batch_op.drop_column("binding")
