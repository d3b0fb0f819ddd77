"""Checking the chain: every link, hash, signed checkpoint and the key table (``verify_chain``), or one
record up to the checkpoint that commits to it (``verify_record``)."""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from .keys import key_from_row
from .rules import check_rules
from .query import tenant_clause
from .records import Header, NotFound, link_hash, sha256_hex
from .schema import (
    GENESIS_HASH, api_keys, audit_payloads, audit_record_blocks, audit_records, chain_head, chain_signatures,
)
from .signing import Checkpoint


@dataclass(frozen=True)
class BrokenLink:
    seq: int
    record_id: str | None
    reason: str


@dataclass(frozen=True)
class VerifyReport:
    ok: bool
    checked: int  # records whose links were checked
    head_seq: int
    head_hash: str
    first_broken: BrokenLink | None
    signed_seq: int | None  # highest seq covered by a valid trusted signature
    signatures_valid: int
    signatures_untrusted: int  # by keys not passed as trusted: ignored
    redacted: int  # records whose payload was erased under a redaction/retention record


@dataclass(frozen=True)
class RecordProof:
    """One record checked on its own: its hashes, and the links from it to the next signed checkpoint."""

    ok: bool
    record_id: str
    seq: int
    reason: str | None  # why not ok
    redacted: bool
    checkpoint_seq: int | None  # the trusted checkpoint that commits to it; None: not signed yet
    links_checked: int


def verify_chain(conn: Connection, trusted: dict[str, Any], checkpoints: Iterable[Checkpoint] = (),
                 chunk: int = 2000) -> VerifyReport:
    """Check every link, content hash, payload hash and signed checkpoint, and the key and rule tables
    against the key and rule records; report the first broken link. ``trusted``: public keys by key id (signatures by
    others are counted, not checked). ``checkpoints`` adds signed checkpoints kept outside the database
    (``read_checkpoint_log``); a checkpoint beyond the last record means deletion. Run it in one
    transaction (a consistent snapshot)."""
    issues: list[BrokenLink] = []
    cps = [Checkpoint(r.seq, r.chain_hash, r.signed_us, r.key_id, r.signature)
           for r in conn.execute(sa.select(chain_signatures))] + list(checkpoints)
    want: dict[int, list[Checkpoint]] = {}
    untrusted = 0
    for cp in cps:
        if cp.key_id not in trusted:
            untrusted += 1
        elif not cp.valid_under(trusted[cp.key_id]):
            issues.append(BrokenLink(cp.seq, None, "a checkpoint's signature does not verify"))
        else:
            want.setdefault(cp.seq, []).append(cp)
    head = conn.execute(sa.select(chain_head)).one()
    expected, prev, checked, signed_seq, valid = 1, GENESIS_HASH, 0, None, 0
    missing: dict[int, str] = {}
    covered: set[int] = set()
    key_state: dict[str, tuple[int, str, dict]] = {}
    rule_events: list[tuple[int, str, dict]] = []
    broken = False
    while not broken:
        rows = conn.execute(sa.select(audit_records).where(audit_records.c.seq >= expected)
                            .order_by(audit_records.c.seq).limit(chunk)).all()
        if not rows:
            break
        lo, hi = rows[0].seq, rows[-1].seq
        labels: dict[int, list[str]] = {}
        for s, label in conn.execute(sa.select(audit_record_blocks).where(
                audit_record_blocks.c.seq.between(lo, hi))):
            labels.setdefault(s, []).append(label)
        bodies = dict(conn.execute(sa.select(audit_payloads.c.seq, audit_payloads.c.body).where(
            audit_payloads.c.seq.between(lo, hi))).all())
        for r in rows:
            problem = check_row(r, expected, prev, labels.get(r.seq, ()), bodies.get(r.seq))
            if problem is not None:
                issues.append(BrokenLink(expected, r.record_id if r.seq == expected else None, problem))
                broken = True
                break
            checked += 1
            body = bodies.get(r.seq)
            if body is None:
                missing[r.seq] = r.record_id
            elif r.kind in ("redaction", "retention"):
                covered.update(covers(r.seq, orjson.loads(body)))
            elif r.kind == "key":
                event = orjson.loads(body)
                key_state[event["key"]["key_id"]] = (r.seq, r.record_id, event)
            elif r.kind == "rule":
                rule_events.append((r.seq, r.record_id, orjson.loads(body)))
            for cp in want.get(r.seq, ()):
                if cp.chain_hash != r.chain_hash:
                    issues.append(BrokenLink(r.seq, r.record_id,
                                             "differs from a signed checkpoint: the chain was rewritten"))
                else:
                    valid += 1
                    signed_seq = r.seq
            prev, expected = r.chain_hash, expected + 1
    last = expected - 1
    if not broken:
        if head.seq != last or head.chain_hash != prev:
            issues.append(BrokenLink(min(head.seq, last) + 1, None,
                                     f"the chain head says seq {head.seq} but the records end at {last}: "
                                     "records were deleted from the end, or the head was altered"))
        for seq in sorted(s for s in want if s > last):
            issues.append(BrokenLink(last + 1, None, f"a signed checkpoint covers seq {seq} but the "
                                     f"records end at {last}: records were deleted"))
    for seq, rid in missing.items():
        if seq not in covered:
            issues.append(BrokenLink(seq, rid, "payload deleted without a redaction record"))
    issues += check_keys(conn, key_state, head.seq + 1)
    issues += [BrokenLink(*problem) for problem in check_rules(conn, rule_events, head.seq + 1)]
    first = min(issues, key=lambda b: b.seq) if issues else None
    return VerifyReport(first is None, checked, head.seq, head.chain_hash, first, signed_seq, valid,
                        untrusted, len(missing) - sum(1 for s in missing if s not in covered))


def verify_record(conn: Connection, record_id: str, *, tenant, trusted: dict[str, Any],
                  checkpoints: Iterable[Checkpoint] = ()) -> RecordProof:
    """Check one record without reading the whole chain: its content and payload hashes, then
    each link from it up to the first trusted signed checkpoint at or after it (the signature
    commits to everything before it). Cost: the records between it and that checkpoint."""
    r = conn.execute(sa.select(audit_records).where(
        audit_records.c.record_id == record_id, tenant_clause(tenant))).first()
    if r is None:
        raise NotFound(f"audit record {record_id!r} not found", "id")
    labels = conn.execute(sa.select(audit_record_blocks.c.label).where(
        audit_record_blocks.c.seq == r.seq)).scalars().all()
    body = conn.execute(sa.select(audit_payloads.c.body).where(audit_payloads.c.seq == r.seq)).scalar()
    prev = conn.execute(sa.select(audit_records.c.chain_hash).where(
        audit_records.c.seq == r.seq - 1)).scalar() if r.seq > 1 else GENESIS_HASH

    def proof(ok: bool, reason: str | None = None, cp: int | None = None, n: int = 1) -> RecordProof:
        return RecordProof(ok, r.record_id, r.seq, reason, body is None, cp, n)

    if prev is None:
        return proof(False, f"record {r.seq - 1} is missing")
    problem = check_row(r, r.seq, prev, labels, body)
    if problem is not None:
        return proof(False, problem)
    if body is None and not any(
            r.seq in covers(seq, orjson.loads(note)) for seq, note in conn.execute(
                sa.select(audit_payloads.c.seq, audit_payloads.c.body).join(audit_records).where(
                    audit_records.c.seq > r.seq, audit_records.c.kind.in_(("redaction", "retention"))))):
        return proof(False, "payload deleted without a redaction record")
    candidates = sorted([Checkpoint(c.seq, c.chain_hash, c.signed_us, c.key_id, c.signature)
                         for c in conn.execute(sa.select(chain_signatures).where(
                             chain_signatures.c.seq >= r.seq))]
                        + [c for c in checkpoints if c.seq >= r.seq], key=lambda c: c.seq)
    anchor = next((c for c in candidates if c.key_id in trusted and c.valid_under(trusted[c.key_id])), None)
    end = anchor.seq if anchor is not None else None
    q = sa.select(audit_records.c.seq, audit_records.c.prev_hash, audit_records.c.content_hash,
                  audit_records.c.chain_hash).where(audit_records.c.seq > r.seq).order_by(audit_records.c.seq)
    if end is not None:
        q = q.where(audit_records.c.seq <= end)
    seq, chain, n = r.seq, r.chain_hash, 1
    for link in conn.execute(q):
        if link.seq != seq + 1:
            return proof(False, f"record {seq + 1} is missing", n=n)
        if link.prev_hash != chain or link_hash(link.seq, link.prev_hash, link.content_hash) != link.chain_hash:
            return proof(False, f"the link at record {link.seq} is broken", n=n)
        seq, chain, n = link.seq, link.chain_hash, n + 1
    if anchor is None:
        return proof(True, n=n)
    if seq != anchor.seq or chain != anchor.chain_hash:
        return proof(False, f"differs from the signed checkpoint at seq {anchor.seq}: the chain was rewritten",
                     n=n)
    return proof(True, cp=anchor.seq, n=n)


def check_row(r, expected: int, prev: str, labels: Iterable[str], body: str | None) -> str | None:
    """Why row ``r`` does not hold as record ``expected`` after chain hash ``prev`` (None: it holds)."""
    if r.seq != expected:
        return f"record {expected} is missing (the next stored record is {r.seq})"
    header = Header(r.record_id, r.kind, r.tenant, r.created_us, r.status, r.model, r.rho_min, r.rho_max,
                    r.fidelity, tuple(labels), r.payload_hash)
    if header.content_hash() != r.content_hash:
        return "content altered: its fields no longer hash to its content hash"
    if r.prev_hash != prev:
        return f"prev_hash is not the chain hash of record {expected - 1}"
    if link_hash(r.seq, r.prev_hash, r.content_hash) != r.chain_hash:
        return "chain_hash does not bind (seq, prev_hash, content_hash)"
    if body is not None and sha256_hex(body.encode()) != r.payload_hash:
        return "payload altered: it no longer hashes to its payload hash"
    return None


def check_keys(conn: Connection, key_state: dict[str, tuple[int, str, dict]], unknown_seq: int) -> list[BrokenLink]:
    """The api_keys table must be exactly what the chained key records say it is."""
    issues = []
    rows = {r.key_id: r for r in conn.execute(sa.select(api_keys))}
    for kid, row in rows.items():
        if kid not in key_state:
            issues.append(BrokenLink(unknown_seq, None, f"api key {kid} has no audit record: "
                                     "it was added behind the store's back"))
            continue
        seq, rid, event = key_state[kid]
        stored = key_from_row(row).to_dict()
        differ = sorted(k for k, v in stored.items() if event["key"].get(k) != v)
        if sha256_hex(row.token_hash.encode()) != event["token_hash_digest"]:
            differ.append("token_hash")
        if differ:
            issues.append(BrokenLink(seq, rid, f"api key {kid}: {', '.join(differ)} differ from its audit records"))
    for kid in key_state.keys() - rows.keys():
        seq, rid, _ = key_state[kid]
        issues.append(BrokenLink(seq, rid, f"api key {kid} was deleted from the key table"))
    return issues


def covers(seq: int, payload: dict) -> set[int]:
    """The earlier records whose payload erasure this redaction/retention record accounts for."""
    if payload.get("action") == "redact":
        targets = {payload["target_seq"]}
    else:
        targets = {s for lo, hi in payload.get("seqs", ()) for s in range(lo, hi + 1)}
    return {s for s in targets if s < seq}
