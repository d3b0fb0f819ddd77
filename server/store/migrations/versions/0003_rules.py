"""rules: tenant-scoped rules and rulebooks with immutable versions (issue 21).

A rule (kind ``rule``: text and an optional anchor header) and a rulebook (kind ``rulebook``: a set of
pinned rule versions and the anchor probe made when the version was created) share one label space
per tenant, so a request's reference (``KYC-2``, ``lending@3``) names exactly one of them. Versions
are never updated; retiring a label sets ``retired_us``/``retired_by`` on its row only.

Revision ID: 0003
Revises: 0002
"""
import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "rules",
        sa.Column("rule_id", sa.String(32), primary_key=True),
        sa.Column("tenant", sa.String(128), nullable=False),
        sa.Column("label", sa.String(128), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("created_us", sa.BigInteger(), nullable=False),
        sa.Column("created_by", sa.String(64), nullable=True),
        sa.Column("retired_us", sa.BigInteger(), nullable=True),
        sa.Column("retired_by", sa.String(64), nullable=True),
        sa.UniqueConstraint("tenant", "label", name="uq_rules_tenant_label"),
    )
    op.create_table(
        "rule_versions",
        sa.Column("rule_id", sa.String(32), sa.ForeignKey("rules.rule_id"), primary_key=True),
        sa.Column("version", sa.Integer(), primary_key=True, autoincrement=False),
        sa.Column("created_us", sa.BigInteger(), nullable=False),
        sa.Column("created_by", sa.String(64), nullable=True),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("text", sa.Text(), nullable=True),
        sa.Column("anchor", sa.String(256), nullable=True),
        sa.Column("members", sa.Text(), nullable=True),
        sa.Column("probe", sa.Text(), nullable=True),
    )


def downgrade() -> None:
    op.drop_table("rule_versions")
    op.drop_table("rules")
