"""Initial audit schema: hash-chained records, payloads apart, block labels, chain head, signatures, API keys.

Revision ID: 0001
Revises:
"""
import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

SeqType = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "audit_records",
        sa.Column("seq", SeqType, primary_key=True, autoincrement=False),
        sa.Column("record_id", sa.String(64), nullable=False, unique=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("tenant", sa.String(128), nullable=False),
        sa.Column("created_us", sa.BigInteger(), nullable=False),
        sa.Column("status", sa.String(16), nullable=True),
        sa.Column("model", sa.String(256), nullable=True),
        sa.Column("rho_min", sa.Float(), nullable=True),
        sa.Column("rho_max", sa.Float(), nullable=True),
        sa.Column("fidelity", sa.Float(), nullable=True),
        sa.Column("payload_hash", sa.String(64), nullable=False),
        sa.Column("content_hash", sa.String(64), nullable=False),
        sa.Column("prev_hash", sa.String(64), nullable=False),
        sa.Column("chain_hash", sa.String(64), nullable=False),
    )
    op.create_index("ix_audit_records_tenant_seq", "audit_records", ["tenant", "seq"])
    for col in ("kind", "created_us", "status", "model", "rho_min", "rho_max", "fidelity"):
        op.create_index(f"ix_audit_records_{col}", "audit_records", [col])
    op.create_table(
        "audit_payloads",
        sa.Column("seq", SeqType, sa.ForeignKey("audit_records.seq"), primary_key=True, autoincrement=False),
        sa.Column("body", sa.Text(), nullable=False),
    )
    op.create_table(
        "audit_record_blocks",
        sa.Column("seq", SeqType, sa.ForeignKey("audit_records.seq"), primary_key=True, autoincrement=False),
        sa.Column("label", sa.String(256), primary_key=True),
    )
    op.create_index("ix_audit_record_blocks_label_seq", "audit_record_blocks", ["label", "seq"])
    head = op.create_table(
        "chain_head",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("chain_hash", sa.String(64), nullable=False),
        sa.Column("created_us", sa.BigInteger(), nullable=False),
    )
    op.bulk_insert(head, [{"id": 1, "seq": 0, "chain_hash": "0" * 64, "created_us": 0}])
    op.create_table(
        "chain_signatures",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("chain_hash", sa.String(64), nullable=False),
        sa.Column("signed_us", sa.BigInteger(), nullable=False),
        sa.Column("key_id", sa.String(32), nullable=False),
        sa.Column("signature", sa.String(128), nullable=False),
    )
    op.create_index("ix_chain_signatures_seq", "chain_signatures", ["seq"])
    op.create_table(
        "api_keys",
        sa.Column("key_id", sa.String(32), primary_key=True),
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("tenant", sa.String(128), nullable=False),
        sa.Column("name", sa.String(256), nullable=False),
        sa.Column("admin", sa.Boolean(), nullable=False),
        sa.Column("created_us", sa.BigInteger(), nullable=False),
        sa.Column("revoked_us", sa.BigInteger(), nullable=True),
        sa.Column("rate_limit_per_min", sa.Integer(), nullable=True),
        sa.Column("max_concurrency", sa.Integer(), nullable=True),
    )
    op.create_index("ix_api_keys_tenant", "api_keys", ["tenant"])


def downgrade() -> None:
    for table in ("api_keys", "chain_signatures", "chain_head", "audit_record_blocks", "audit_payloads", "audit_records"):
        op.drop_table(table)
