"""auth_state: the store remembers that it has had API keys (set with the first key, never cleared).

A store migrated from 0001 that already holds keys (revoked ones included) is marked at once, so a
server never starts in key-less dev mode on it.

Revision ID: 0002
Revises: 0001
"""
import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    state = op.create_table(
        "auth_state",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=False),
        sa.Column("first_key_us", sa.BigInteger(), nullable=True),
    )
    first_key_us = op.get_bind().execute(sa.text("SELECT MIN(created_us) FROM api_keys")).scalar()
    op.bulk_insert(state, [{"id": 1, "first_key_us": first_key_us}])


def downgrade() -> None:
    op.drop_table("auth_state")
