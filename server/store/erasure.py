"""Erasing payloads, one record at a time (redaction) or by age (retention); each erasure is itself a
chained record, so the chain stays valid and says who erased what, when and why."""
from __future__ import annotations

import uuid
from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from .chain import Receipt, append, lock_head
from .query import ALL_TENANTS, tenant_clause, to_us
from .records import AlreadyRedacted, NotFound, RecordError, check_str, make_entry
from .schema import audit_payloads, audit_records

SYSTEM_TENANT = "_system"


def _ranges(seqs: Sequence[int]) -> list[list[int]]:
    out: list[list[int]] = []
    for s in sorted(seqs):
        if out and out[-1][1] == s - 1:
            out[-1][1] = s
        else:
            out.append([s, s])
    return out


def redact(conn: Connection, record_id: str, *, tenant, reason: str, actor: str | None) -> Receipt:
    """Erase a request's payload; a redaction record says who, why and which hash."""
    check_str(reason, "reason", 4096)
    lock_head(conn)
    target = conn.execute(sa.select(audit_records).where(
        audit_records.c.record_id == record_id, tenant_clause(tenant))).first()
    if target is None or target.kind != "request":
        raise NotFound(f"audit record {record_id!r} not found", "id")
    gone = conn.execute(sa.delete(audit_payloads).where(audit_payloads.c.seq == target.seq)).rowcount
    if not gone:
        raise AlreadyRedacted(f"record {record_id!r}: already redacted")
    entry = make_entry(f"redact-{uuid.uuid4().hex}", "redaction", target.tenant, {
        "action": "redact", "target_id": target.record_id, "target_seq": target.seq,
        "target_payload_hash": target.payload_hash, "reason": reason, "actor": actor})
    return append(conn, [entry])[0]


def purge_payloads(conn: Connection, *, before, tenant=ALL_TENANTS, actor: str | None) -> int:
    """Retention: erase the payloads of request records created before ``before``; one retention
    record lists them. Returns how many were erased."""
    before_us = to_us(before, "before")
    if before_us is None:
        raise RecordError("before: required")
    lock_head(conn)
    expired = sa.select(audit_records.c.seq).join(audit_payloads, audit_payloads.c.seq == audit_records.c.seq).where(
        audit_records.c.kind == "request", audit_records.c.created_us < before_us, tenant_clause(tenant))
    seqs = conn.execute(expired).scalars().all()
    if not seqs:
        return 0
    # a subquery, not a list: a retention sweep may cover more rows than a statement has parameters
    conn.execute(sa.delete(audit_payloads).where(audit_payloads.c.seq.in_(expired.scalar_subquery())))
    scope = None if tenant is ALL_TENANTS else tenant
    entry = make_entry(f"retention-{uuid.uuid4().hex}", "retention", scope or SYSTEM_TENANT, {
        "action": "retention", "before_us": before_us, "scope": scope, "seqs": _ranges(seqs), "actor": actor})
    append(conn, [entry])
    return len(seqs)
