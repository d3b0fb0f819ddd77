"""Appending to the hash chain: the lock every append takes, and the link of each new record."""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from .records import Entry, link_hash
from .schema import audit_payloads, audit_record_blocks, audit_records, chain_head


@dataclass(frozen=True)
class Receipt:
    """What a committed append returns: the record is durable once you hold this."""

    id: str
    seq: int
    chain_hash: str
    created_us: int


def now_us() -> int:
    return time.time_ns() // 1000


def lock_head(conn: Connection):
    """Take the append lock first, so read-modify-append actions (redact, revoke, ...) are totally
    ordered with every append and cannot deadlock on each other's rows."""
    return conn.execute(sa.select(chain_head).where(chain_head.c.id == 1).with_for_update()).one()


def append(conn: Connection, entries: Sequence[Entry]) -> list[Receipt]:
    """Chain ``entries`` after the current head, in the caller's write transaction."""
    head = lock_head(conn)
    seq, prev = head.seq, head.chain_hash
    created = max(now_us(), head.created_us)  # non-decreasing along the chain
    rows, bodies, labels, receipts = [], [], [], []
    for e in entries:
        seq += 1
        h = e.header(created)
        content = h.content_hash()
        chain = link_hash(seq, prev, content)
        rows.append({
            "seq": seq, "record_id": h.record_id, "kind": h.kind, "tenant": h.tenant,
            "created_us": created, "status": h.status, "model": h.model, "rho_min": h.rho_min,
            "rho_max": h.rho_max, "fidelity": h.fidelity, "payload_hash": h.payload_hash,
            "content_hash": content, "prev_hash": prev, "chain_hash": chain,
        })
        bodies.append({"seq": seq, "body": e.body.decode()})
        labels.extend({"seq": seq, "label": label} for label in h.blocks)
        receipts.append(Receipt(h.record_id, seq, chain, created))
        prev = chain
    conn.execute(sa.insert(audit_records), rows)
    conn.execute(sa.insert(audit_payloads), bodies)
    if labels:
        conn.execute(sa.insert(audit_record_blocks), labels)
    conn.execute(sa.update(chain_head).where(chain_head.c.id == 1).values(seq=seq, chain_hash=prev, created_us=created))
    return receipts
