"""Reading records: one by id, or listed by filters, newest first, a page at a time."""
from __future__ import annotations

import base64
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from .records import KINDS, MAX_TENANT, STATUSES, RecordError, check_str
from .schema import audit_payloads, audit_record_blocks, audit_records


class _AllTenants:
    def __repr__(self) -> str:
        return "ALL_TENANTS"


ALL_TENANTS = _AllTenants()
"""Pass as ``tenant=`` for an admin's view; a tenant's view is its own name (there is no default)."""


@dataclass(frozen=True)
class Page:
    records: list[dict]
    next_cursor: str | None


def to_us(value: Any, name: str) -> int | None:
    """A time given as an aware datetime or unix seconds, in microseconds."""
    if value is None:
        return None
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise RecordError(f"{name}: datetime must be timezone-aware")
        return int(round(value.timestamp() * 1_000_000))
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RecordError(f"{name}: must be a datetime or unix seconds, got {value!r}")
    return int(round(value * 1_000_000))


def tenant_clause(tenant):
    if tenant is ALL_TENANTS:
        return sa.true()
    return audit_records.c.tenant == check_str(tenant, "tenant", MAX_TENANT)


def _encode_cursor(seq: int) -> str:
    return base64.urlsafe_b64encode(orjson.dumps({"before": seq})).decode().rstrip("=")


def _decode_cursor(cursor: str) -> int:
    try:
        seq = orjson.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))["before"]
        if isinstance(seq, int) and 0 < seq < 2**63:  # a database integer
            return seq
    except Exception:
        pass
    raise RecordError(f"cursor: not a cursor this store issued: {cursor!r}")


def _records(conn: Connection, rows, include_payload: bool) -> list[dict]:
    """Rows as records: the header (indexed fields and hashes), with the payload's parts merged in."""
    seqs = [r.seq for r in rows]
    labels: dict[int, list[str]] = {s: [] for s in seqs}
    bodies: dict[int, str] = {}
    if seqs:
        for s, label in conn.execute(sa.select(audit_record_blocks.c.seq, audit_record_blocks.c.label)
                                     .where(audit_record_blocks.c.seq.in_(seqs))
                                     .order_by(audit_record_blocks.c.label)):
            labels[s].append(label)
        cols = [audit_payloads.c.seq, audit_payloads.c.body if include_payload else sa.literal("")]
        bodies = dict(conn.execute(sa.select(*cols).where(audit_payloads.c.seq.in_(seqs))).all())
    out = []
    for r in rows:
        d = {
            "id": r.record_id, "seq": r.seq, "kind": r.kind, "tenant": r.tenant,
            "created_us": r.created_us,
            "created_at": datetime.fromtimestamp(r.created_us / 1e6, tz=timezone.utc).isoformat(),
            "status": r.status, "model": r.model, "rho_min": r.rho_min, "rho_max": r.rho_max,
            "fidelity": r.fidelity, "blocks": labels[r.seq], "redacted": r.seq not in bodies,
            "hashes": {"payload": r.payload_hash, "content": r.content_hash, "prev": r.prev_hash,
                       "chain": r.chain_hash},
        }
        if include_payload and r.seq in bodies:
            d.update(orjson.loads(bodies[r.seq]))
        out.append(d)
    return out


def get_record(conn: Connection, record_id: str, tenant) -> dict | None:
    """The record with this id if ``tenant`` may see it (None otherwise: no existence leak)."""
    rows = conn.execute(sa.select(audit_records).where(
        audit_records.c.record_id == record_id, tenant_clause(tenant))).all()
    return _records(conn, rows, True)[0] if rows else None


def list_records(conn: Connection, *, tenant, kind: str | None = "request", since=None, until=None,
                 model: str | None = None, status: str | None = None,
                 rho_min: float | None = None, rho_max: float | None = None,
                 fidelity_min: float | None = None, fidelity_max: float | None = None,
                 block: str | None = None, limit: int = 50, cursor: str | None = None,
                 include_payload: bool = True) -> Page:
    """Newest first. ``since`` ≤ created < ``until`` (datetime or unix seconds); the dial range keeps
    records whose every layer's ρ lies in [rho_min, rho_max]; fidelity bounds drop records with no
    fidelity; ``block`` is a block label. ``next_cursor`` continues the listing."""
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 1000:
        raise RecordError(f"limit: must be an integer in [1, 1000], got {limit!r}")
    c = audit_records.c
    where = [tenant_clause(tenant)]
    if kind is not None:
        if kind not in KINDS:
            raise RecordError(f"kind: must be one of {', '.join(KINDS)} or null, got {kind!r}")
        where.append(c.kind == kind)
    if (since_us := to_us(since, "since")) is not None:
        where.append(c.created_us >= since_us)
    if (until_us := to_us(until, "until")) is not None:
        where.append(c.created_us < until_us)
    for value, name in ((model, "model"), (block, "block")):
        if value is not None:
            check_str(value, name, 256)
    if model is not None:
        where.append(c.model == model)
    if status is not None:
        if status not in STATUSES:
            raise RecordError(f"status: must be one of {', '.join(STATUSES)}, got {status!r}")
        where.append(c.status == status)
    for value, name, col, op in ((rho_min, "rho_min", c.rho_min, "ge"), (rho_max, "rho_max", c.rho_max, "le"),
                                 (fidelity_min, "fidelity_min", c.fidelity, "ge"),
                                 (fidelity_max, "fidelity_max", c.fidelity, "le")):
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise RecordError(f"{name}: must be a number, got {value!r}")
            where.append(col >= value if op == "ge" else col <= value)
    if block is not None:
        b = audit_record_blocks.c
        where.append(sa.exists().where(b.seq == c.seq, b.label == block))
    if cursor is not None:
        where.append(c.seq < _decode_cursor(cursor))
    rows = conn.execute(sa.select(audit_records).where(*where).order_by(c.seq.desc()).limit(limit + 1)).all()
    more = len(rows) > limit
    rows = rows[:limit]
    return Page(_records(conn, rows, include_payload), _encode_cursor(rows[-1].seq) if more else None)
