"""Tables of the audit store (the query side; migrations/ creates them, a test checks they agree).

The chain lives in ``audit_records`` (hashes plus the indexed fields the filters need); payloads live
apart in ``audit_payloads`` so that erasing one leaves every hash, and so the chain, intact.
"""
from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()

# INTEGER PRIMARY KEY is SQLite's rowid alias: the cheapest key there; BIGINT elsewhere.
SeqType = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

GENESIS_HASH = "0" * 64

audit_records = sa.Table(
    "audit_records",
    metadata,
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
    sa.Index("ix_audit_records_tenant_seq", "tenant", "seq"),
    sa.Index("ix_audit_records_kind", "kind"),
    sa.Index("ix_audit_records_created_us", "created_us"),
    sa.Index("ix_audit_records_status", "status"),
    sa.Index("ix_audit_records_model", "model"),
    sa.Index("ix_audit_records_rho_min", "rho_min"),
    sa.Index("ix_audit_records_rho_max", "rho_max"),
    sa.Index("ix_audit_records_fidelity", "fidelity"),
)

audit_payloads = sa.Table(
    "audit_payloads",
    metadata,
    sa.Column("seq", SeqType, sa.ForeignKey("audit_records.seq"), primary_key=True, autoincrement=False),
    sa.Column("body", sa.Text(), nullable=False),
)

audit_record_blocks = sa.Table(
    "audit_record_blocks",
    metadata,
    sa.Column("seq", SeqType, sa.ForeignKey("audit_records.seq"), primary_key=True, autoincrement=False),
    sa.Column("label", sa.String(256), primary_key=True),
    sa.Index("ix_audit_record_blocks_label_seq", "label", "seq"),
)



def _chain_point() -> tuple[sa.Column, sa.Column]:
    """A point of the chain: a seq and the chain hash there (new columns for each table)."""
    return sa.Column("seq", sa.BigInteger(), nullable=False), sa.Column("chain_hash", sa.String(64), nullable=False)


# One row (id = 1): locking it serialises appends across threads, processes and replicas.
chain_head = sa.Table(
    "chain_head",
    metadata,
    sa.Column("id", sa.Integer(), primary_key=True, autoincrement=False),
    *_chain_point(),
    sa.Column("created_us", sa.BigInteger(), nullable=False),
)

# Signed checkpoints of the head.
chain_signatures = sa.Table(
    "chain_signatures",
    metadata,
    sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
    *_chain_point(),
    sa.Column("signed_us", sa.BigInteger(), nullable=False),
    sa.Column("key_id", sa.String(32), nullable=False),
    sa.Column("signature", sa.String(128), nullable=False),
    sa.Index("ix_chain_signatures_seq", "seq"),
)

api_keys = sa.Table(
    "api_keys",
    metadata,
    sa.Column("key_id", sa.String(32), primary_key=True),
    sa.Column("token_hash", sa.String(64), nullable=False),
    sa.Column("tenant", sa.String(128), nullable=False),
    sa.Column("name", sa.String(256), nullable=False),
    sa.Column("admin", sa.Boolean(), nullable=False),
    sa.Column("created_us", sa.BigInteger(), nullable=False),
    sa.Column("revoked_us", sa.BigInteger(), nullable=True),
    sa.Column("rate_limit_per_min", sa.Integer(), nullable=True),
    sa.Column("max_concurrency", sa.Integer(), nullable=True),
    sa.Index("ix_api_keys_tenant", "tenant"),
)

# One row (id = 1): when this store's first API key was created, set together with that key and never
# cleared. The server's key-less dev mode is only for a store that has never had a key.
auth_state = sa.Table(
    "auth_state",
    metadata,
    sa.Column("id", sa.Integer(), primary_key=True, autoincrement=False),
    sa.Column("first_key_us", sa.BigInteger(), nullable=True),
)

# Rules and rulebooks (server/store/rules.py): one label space per tenant; versions are never updated.
rules = sa.Table(
    "rules",
    metadata,
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

rule_versions = sa.Table(
    "rule_versions",
    metadata,
    sa.Column("rule_id", sa.String(32), sa.ForeignKey("rules.rule_id"), primary_key=True),
    sa.Column("version", sa.Integer(), primary_key=True, autoincrement=False),
    sa.Column("created_us", sa.BigInteger(), nullable=False),
    sa.Column("created_by", sa.String(64), nullable=True),
    sa.Column("sha256", sa.String(64), nullable=False),
    sa.Column("text", sa.Text(), nullable=True),
    sa.Column("anchor", sa.String(256), nullable=True),
    sa.Column("members", sa.Text(), nullable=True),  # a rulebook's pinned rule versions (JSON)
    sa.Column("probe", sa.Text(), nullable=True),  # a rulebook's anchor probe (JSON)
)
