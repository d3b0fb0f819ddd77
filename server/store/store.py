"""The audit store: an append-only, hash-chained, signed log of requests and key actions.

SQLite (WAL, ``BEGIN IMMEDIATE``) is the embedded default; PostgreSQL by URL is the scale-out path
(stateless replicas, one database). Appends lock the single ``chain_head`` row (``SELECT ... FOR
UPDATE`` on PostgreSQL, the database write lock on SQLite), so the chain order is total across
threads, processes and hosts. The schema is migrated by Alembic when a store opens.
"""
from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import logging
import os
import queue
import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import orjson
import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import IntegrityError

from . import keys as keymod
from .keys import ApiKey
from .records import (
    KINDS, STATUSES, Entry, Header, RecordError, check_str, link_hash, make_entry, request_entry, sha256_hex, MAX_TENANT,
)
from .schema import (
    GENESIS_HASH, api_keys, audit_payloads, audit_record_blocks, audit_records, auth_state, chain_head,
    chain_signatures,
)
from .signing import Checkpoint, append_checkpoint_log, key_id, load_public_key, load_signing_key

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).with_name("migrations")
MIGRATION_LOCK = 0x10CA1157  # pg_advisory_xact_lock key: one migrator at a time
SYSTEM_TENANT = "_system"
WRITER_BATCH = 256


class _AllTenants:
    def __repr__(self) -> str:
        return "ALL_TENANTS"


ALL_TENANTS = _AllTenants()
"""Pass as ``tenant=`` for an admin's view; a tenant's view is its own name (there is no default)."""


class NotFound(LookupError):
    """No such record or key visible to the caller."""


@dataclass(frozen=True)
class Receipt:
    """What a committed append returns: the record is durable once you hold this."""

    id: str
    seq: int
    chain_hash: str
    created_us: int


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


@dataclass(frozen=True)
class Page:
    records: list[dict]
    next_cursor: str | None


def now_us() -> int:
    return time.time_ns() // 1000


def _to_us(value: Any, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise RecordError(f"{name}: datetime must be timezone-aware")
        return int(round(value.timestamp() * 1_000_000))
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RecordError(f"{name}: must be a datetime or unix seconds, got {value!r}")
    return int(round(value * 1_000_000))


def _resolve(fut: concurrent.futures.Future, result: Any = None, error: BaseException | None = None) -> None:
    """Settle an arecord future. A caller that stopped waiting (cancelled) still gets its record
    written: every request is audited; only the answer goes nowhere."""
    try:
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(result)
    except concurrent.futures.InvalidStateError:
        pass


def _encode_cursor(seq: int) -> str:
    return base64.urlsafe_b64encode(orjson.dumps({"before": seq})).decode().rstrip("=")


def _decode_cursor(cursor: str) -> int:
    try:
        seq = orjson.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))["before"]
        if isinstance(seq, int) and seq > 0:
            return seq
    except Exception:
        pass
    raise RecordError(f"cursor: not a cursor this store issued: {cursor!r}")


def _ranges(seqs: Sequence[int]) -> list[list[int]]:
    out: list[list[int]] = []
    for s in sorted(seqs):
        if out and out[-1][1] == s - 1:
            out[-1][1] = s
        else:
            out.append([s, s])
    return out


class AuditStore:
    """Open (and migrate) the store at ``url``; see the module docstring.

    signing_key_path: Ed25519 PEM kept outside the database (created when ``create_signing_key``);
    with it, ``sign_head`` works, ``verify`` trusts its public key, and a background thread signs
    the head every ``sign_interval_s`` seconds (when it moved) and once more on ``close``.
    checkpoint_log: a file to which every signed checkpoint is also appended.
    """

    def __init__(self, url: str, *, signing_key_path: str | os.PathLike | None = None,
                 create_signing_key: bool = False, checkpoint_log: str | os.PathLike | None = None,
                 sign_interval_s: float | None = None, busy_timeout_s: float = 60.0):
        if sign_interval_s is not None:
            if signing_key_path is None:
                raise ValueError("sign_interval_s: needs signing_key_path")
            if sign_interval_s <= 0:
                raise ValueError(f"sign_interval_s: must be > 0, got {sign_interval_s}")
        sa_url = make_url(url)
        if sa_url.drivername in ("postgresql", "postgres"):
            sa_url = sa_url.set(drivername="postgresql+psycopg")
        self.backend = sa_url.get_backend_name()
        if self.backend == "sqlite":
            if sa_url.database in (None, "", ":memory:"):
                raise ValueError("url: an SQLite audit store needs a file (sqlite:///path/audit.db)")
            Path(sa_url.database).parent.mkdir(parents=True, exist_ok=True)
            self._engine = sa.create_engine(
                sa_url, connect_args={"timeout": busy_timeout_s, "check_same_thread": False})
            self._sqlite_events(busy_timeout_s)
        elif self.backend == "postgresql":
            self._engine = sa.create_engine(sa_url, pool_pre_ping=True)
        else:
            raise ValueError(f"url: unsupported database {self.backend!r} (sqlite or postgresql)")
        # Write transactions carry this option: on SQLite it turns BEGIN into BEGIN IMMEDIATE.
        self._wengine = self._engine.execution_options(localist_write=True)
        self._signing_key = (load_signing_key(signing_key_path, create=create_signing_key)
                             if signing_key_path is not None else None)
        self._checkpoint_log = Path(checkpoint_log) if checkpoint_log is not None else None
        self._queue: queue.SimpleQueue | None = None
        self._writer: threading.Thread | None = None
        self._writer_lock = threading.Lock()
        self._stop = threading.Event()
        self._signer: threading.Thread | None = None
        self._closed = False
        self._migrate()
        if sign_interval_s is not None:
            self._signer = threading.Thread(target=self._sign_loop, args=(sign_interval_s,),
                                            name="localist-audit-signer", daemon=True)
            self._signer.start()

    # -- engine set-up -------------------------------------------------------------------------

    def _sqlite_events(self, busy_timeout_s: float) -> None:
        @sa.event.listens_for(self._engine, "connect")
        def _connect(dbapi_conn, _record):
            dbapi_conn.isolation_level = None  # SQLAlchemy, not pysqlite, emits BEGIN
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")  # an acknowledged commit survives power loss
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
            cur.close()

        @sa.event.listens_for(self._engine, "begin")
        def _begin(conn):
            immediate = conn.get_execution_options().get("localist_write")
            conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    def _migrate(self) -> None:
        """``alembic upgrade head``, one process at a time (the same lock as appends)."""
        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        with self._wengine.begin() as conn:
            if self.backend == "postgresql":
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": MIGRATION_LOCK})
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")

    def close(self) -> None:
        """Drain the async writer, sign the final head (when a key is set), release connections."""
        with self._writer_lock:
            if self._closed:
                return
            self._closed = True
        self._stop.set()
        if self._writer is not None:
            self._queue.put(None)
            self._writer.join()
        if self._signer is not None:
            self._signer.join()
        if self._signing_key is not None:
            self._sign_if_moved()
        self._engine.dispose()

    def __enter__(self) -> AuditStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- appending -----------------------------------------------------------------------------

    @staticmethod
    def _lock_head(conn: Connection):
        """Take the append lock first, so read-modify-append actions (redact, revoke, ...) are
        totally ordered with every append and cannot deadlock on each other's rows."""
        return conn.execute(sa.select(chain_head).where(chain_head.c.id == 1).with_for_update()).one()

    def _append(self, conn: Connection, entries: Sequence[Entry]) -> list[Receipt]:
        """Chain ``entries`` after the current head; the caller's write transaction holds the lock."""
        head = self._lock_head(conn)
        seq, prev = head.seq, head.chain_hash
        created = max(now_us(), head.created_us)  # non-decreasing along the chain
        rows, bodies, labels, receipts = [], [], [], []
        for e in entries:
            seq += 1
            content = e.header(created).content_hash()
            chain = link_hash(seq, prev, content)
            rows.append({
                "seq": seq, "record_id": e.record_id, "kind": e.kind, "tenant": e.tenant,
                "created_us": created, "status": e.status, "model": e.model, "rho_min": e.rho_min,
                "rho_max": e.rho_max, "fidelity": e.fidelity, "payload_hash": e.payload_hash,
                "content_hash": content, "prev_hash": prev, "chain_hash": chain,
            })
            bodies.append({"seq": seq, "body": e.body.decode()})
            labels.extend({"seq": seq, "label": label} for label in e.blocks)
            receipts.append(Receipt(e.record_id, seq, chain, created))
            prev = chain
        conn.execute(sa.insert(audit_records), rows)
        conn.execute(sa.insert(audit_payloads), bodies)
        if labels:
            conn.execute(sa.insert(audit_record_blocks), labels)
        conn.execute(sa.update(chain_head).where(chain_head.c.id == 1)
                     .values(seq=seq, chain_hash=prev, created_us=created))
        return receipts

    def _append_entries(self, entries: Sequence[Entry]) -> list[Receipt]:
        try:
            with self._wengine.begin() as conn:
                return self._append(conn, entries)
        except IntegrityError as e:
            raise RecordError(f"record.id: already stored ({', '.join(x.record_id for x in entries)})") from e

    def record(self, record: dict) -> Receipt:
        """Validate and append one request record (blocking); returns once it is committed."""
        return self._append_entries([request_entry(record)])[0]

    async def arecord(self, record: dict) -> Receipt:
        """``record`` for the event loop: the write runs on the store's writer thread (records that
        arrive together share one commit); awaiting returns once the record is durable. Validation
        runs there too, so leave ``record`` unmodified until this returns."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._writer_queue().put((record, fut))
        return await asyncio.wrap_future(fut)

    def _writer_queue(self) -> queue.SimpleQueue:
        with self._writer_lock:
            if self._closed:
                raise RuntimeError("audit store is closed")
            if self._writer is None:
                self._queue = queue.SimpleQueue()
                self._writer = threading.Thread(target=self._write_loop, name="localist-audit-writer",
                                                daemon=True)
                self._writer.start()
            return self._queue

    def _write_loop(self) -> None:
        done = False
        while not done:
            batch = [self._queue.get()]
            while len(batch) < WRITER_BATCH:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            if None in batch:
                done = True
                batch = [item for item in batch if item is not None]
            pending = []
            for record, fut in batch:
                try:
                    pending.append((request_entry(record), fut))
                except Exception as e:
                    _resolve(fut, error=e)
            if not pending:
                continue
            try:
                receipts = self._append_entries([e for e, _ in pending])
            except RecordError:  # a duplicate id: commit the others one by one
                for entry, fut in pending:
                    try:
                        _resolve(fut, self._append_entries([entry])[0])
                    except Exception as e:
                        _resolve(fut, error=e)
                continue
            except Exception as e:
                for _, fut in pending:
                    _resolve(fut, error=e)
                continue
            for (_, fut), receipt in zip(pending, receipts):
                _resolve(fut, receipt)

    # -- reading -------------------------------------------------------------------------------

    @staticmethod
    def _tenant_clause(tenant):
        if tenant is ALL_TENANTS:
            return sa.true()
        return audit_records.c.tenant == check_str(tenant, "tenant", MAX_TENANT)

    def _rows_to_dicts(self, conn: Connection, rows, include_payload: bool) -> list[dict]:
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

    def get_record(self, record_id: str, *, tenant) -> dict | None:
        """The record with this id if ``tenant`` may see it (None otherwise: no existence leak)."""
        with self._engine.connect() as conn:
            rows = conn.execute(sa.select(audit_records).where(
                audit_records.c.record_id == record_id, self._tenant_clause(tenant))).all()
            return self._rows_to_dicts(conn, rows, True)[0] if rows else None

    def list_records(self, *, tenant, kind: str | None = "request", since=None, until=None,
                     model: str | None = None, status: str | None = None,
                     rho_min: float | None = None, rho_max: float | None = None,
                     fidelity_min: float | None = None, fidelity_max: float | None = None,
                     block: str | None = None, limit: int = 50, cursor: str | None = None,
                     include_payload: bool = True) -> Page:
        """Newest first. ``since`` ≤ created < ``until`` (datetime or unix seconds); the dial range
        keeps records whose every layer's ρ lies in [rho_min, rho_max]; fidelity bounds drop records
        with no fidelity; ``block`` is a block label. ``next_cursor`` continues the listing."""
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 1000:
            raise RecordError(f"limit: must be an integer in [1, 1000], got {limit!r}")
        c = audit_records.c
        where = [self._tenant_clause(tenant)]
        if kind is not None:
            if kind not in KINDS:
                raise RecordError(f"kind: must be one of {', '.join(KINDS)} or null, got {kind!r}")
            where.append(c.kind == kind)
        if (since_us := _to_us(since, "since")) is not None:
            where.append(c.created_us >= since_us)
        if (until_us := _to_us(until, "until")) is not None:
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
        with self._engine.connect() as conn:
            rows = conn.execute(sa.select(audit_records).where(*where).order_by(c.seq.desc())
                                .limit(limit + 1)).all()
            more = len(rows) > limit
            rows = rows[:limit]
            return Page(self._rows_to_dicts(conn, rows, include_payload),
                        _encode_cursor(rows[-1].seq) if more else None)

    # -- redaction and retention ---------------------------------------------------------------

    def redact(self, record_id: str, *, tenant, reason: str, actor: str | None = None) -> Receipt:
        """Erase a request's payload; a redaction record (chained) says who, why and which hash."""
        check_str(reason, "reason", 4096)
        with self._wengine.begin() as conn:
            self._lock_head(conn)
            target = conn.execute(sa.select(audit_records).where(
                audit_records.c.record_id == record_id, self._tenant_clause(tenant))).first()
            if target is None or target.kind != "request":
                raise NotFound(f"record {record_id!r}: no such request record")
            gone = conn.execute(sa.delete(audit_payloads).where(audit_payloads.c.seq == target.seq)).rowcount
            if not gone:
                raise RecordError(f"record {record_id!r}: already redacted")
            entry = make_entry(f"redact-{uuid.uuid4().hex}", "redaction", target.tenant, {
                "action": "redact", "target_id": target.record_id, "target_seq": target.seq,
                "target_payload_hash": target.payload_hash, "reason": reason, "actor": actor})
            return self._append(conn, [entry])[0]

    def purge_payloads(self, *, before, tenant=ALL_TENANTS, actor: str | None = None) -> int:
        """Retention: erase the payloads of request records created before ``before``; one
        retention record lists them. Returns how many were erased."""
        before_us = _to_us(before, "before")
        if before_us is None:
            raise RecordError("before: required")
        with self._wengine.begin() as conn:
            self._lock_head(conn)
            expired = sa.select(audit_records.c.seq).join(
                audit_payloads, audit_payloads.c.seq == audit_records.c.seq).where(
                audit_records.c.kind == "request", audit_records.c.created_us < before_us,
                self._tenant_clause(tenant))
            seqs = conn.execute(expired).scalars().all()
            if not seqs:
                return 0
            # a subquery, not a list: a retention sweep may cover more rows than a statement has parameters
            conn.execute(sa.delete(audit_payloads).where(audit_payloads.c.seq.in_(expired.scalar_subquery())))
            scope = None if tenant is ALL_TENANTS else tenant
            entry = make_entry(f"retention-{uuid.uuid4().hex}", "retention", scope or SYSTEM_TENANT, {
                "action": "retention", "before_us": before_us, "scope": scope, "seqs": _ranges(seqs),
                "actor": actor})
            self._append(conn, [entry])
            return len(seqs)

    # -- API keys ------------------------------------------------------------------------------

    @staticmethod
    def _key(row) -> ApiKey:
        return ApiKey(row.key_id, row.tenant, row.name, row.admin, row.created_us, row.revoked_us,
                      row.rate_limit_per_min, row.max_concurrency)

    def create_key(self, *, tenant: str, name: str, admin: bool = False,
                   rate_limit_per_min: int | None = None, max_concurrency: int | None = None,
                   actor: str | None = None, token: str | None = None) -> tuple[str, ApiKey]:
        """A new key for ``tenant``: returns (token, key). The token is shown once, stored hashed.
        ``token`` imports a configured one (the bootstrap admin key); importing the same token
        again returns the stored key."""
        check_str(tenant, "tenant", MAX_TENANT)
        check_str(name, "name", 256)
        if not isinstance(admin, bool):
            raise RecordError(f"admin: must be true or false, got {admin!r}")
        rate = keymod.check_limit(rate_limit_per_min, "rate_limit_per_min")
        conc = keymod.check_limit(max_concurrency, "max_concurrency")
        if token is None:
            kid, token = keymod.new_token()
        elif (kid := keymod.parse_token(token)) is None:
            raise RecordError("token: not a localist key (lk_<16 hex>_<secret of at least 32 characters>)")
        with self._wengine.begin() as conn:
            self._lock_head(conn)
            row = conn.execute(sa.select(api_keys).where(api_keys.c.key_id == kid)).first()
            if row is not None:
                if not keymod.token_matches(token, row.token_hash):
                    raise RecordError(f"token: key id {kid} is taken by another key")
                return token, self._key(row)
            key = ApiKey(kid, tenant, name, admin, now_us(), None, rate, conc)
            stored_hash = keymod.token_hash(token)
            conn.execute(sa.insert(api_keys).values(token_hash=stored_hash, **key.to_dict()))
            conn.execute(sa.update(auth_state).where(auth_state.c.id == 1, auth_state.c.first_key_us.is_(None))
                         .values(first_key_us=key.created_us))
            self._append(conn, [self._key_event("create", key, stored_hash, actor)])
        return token, key

    @staticmethod
    def _key_event(action: str, key: ApiKey, stored_hash: str, actor: str | None) -> Entry:
        """The chained record of a key action; it pins the key's whole row (the stored token hash
        through a digest of it), so verify notices a key edited, added or swapped in the table."""
        return make_entry(f"key-{action}-{key.key_id}", "key", key.tenant, {
            "action": action, "key": key.to_dict(), "token_hash_digest": sha256_hex(stored_hash.encode()),
            "actor": actor})

    def list_keys(self, *, tenant=ALL_TENANTS, include_revoked: bool = True) -> list[ApiKey]:
        q = sa.select(api_keys).order_by(api_keys.c.created_us, api_keys.c.key_id)
        if tenant is not ALL_TENANTS:
            q = q.where(api_keys.c.tenant == check_str(tenant, "tenant", MAX_TENANT))
        if not include_revoked:
            q = q.where(api_keys.c.revoked_us.is_(None))
        with self._engine.connect() as conn:
            return [self._key(r) for r in conn.execute(q)]

    def revoke_key(self, key_id: str, *, tenant=ALL_TENANTS, actor: str | None = None) -> ApiKey:
        """Revoke (idempotent: an already revoked key is returned unchanged, with no new record)."""
        with self._wengine.begin() as conn:
            self._lock_head(conn)
            q = sa.select(api_keys).where(api_keys.c.key_id == key_id)
            if tenant is not ALL_TENANTS:
                q = q.where(api_keys.c.tenant == tenant)
            row = conn.execute(q).first()
            if row is None:
                raise NotFound(f"key {key_id!r}: no such key")
            if row.revoked_us is not None:
                return self._key(row)
            when = now_us()
            conn.execute(sa.update(api_keys).where(api_keys.c.key_id == key_id).values(revoked_us=when))
            key = self._key(row)
            key = ApiKey(**{**key.to_dict(), "revoked_us": when})
            self._append(conn, [self._key_event("revoke", key, row.token_hash, actor)])
            return key

    def keys_ever_created(self) -> bool:
        """Whether this store has ever held an API key, revoked ones included; once true, never false
        again. The mark set with the first key and any row of the key table each count, so clearing
        one of them by hand does not reopen the server's key-less dev mode; no mark row counts too."""
        with self._engine.connect() as conn:
            row = conn.execute(sa.select(auth_state.c.first_key_us,
                                         sa.exists(sa.select(api_keys.c.key_id)).label("any_key"))
                               .where(auth_state.c.id == 1)).first()
        return row is None or row.first_key_us is not None or bool(row.any_key)

    def verify_key(self, token: str) -> ApiKey | None:
        """The active key this token is, or None (unknown, malformed, wrong secret, or revoked)."""
        kid = keymod.parse_token(token)
        if kid is None:
            return None
        with self._engine.connect() as conn:
            row = conn.execute(sa.select(api_keys).where(api_keys.c.key_id == kid)).first()
        if row is None or row.revoked_us is not None or not keymod.token_matches(token, row.token_hash):
            return None
        return self._key(row)

    # -- signing and verification --------------------------------------------------------------

    def sign_head(self) -> Checkpoint | None:
        """Sign the last record's (seq, chain_hash) now; None when the store is empty."""
        if self._signing_key is None:
            raise RuntimeError("sign_head: the store was opened without signing_key_path")
        with self._engine.connect() as conn:
            last = conn.execute(sa.select(audit_records.c.seq, audit_records.c.chain_hash)
                                .order_by(audit_records.c.seq.desc()).limit(1)).first()
        if last is None:
            return None
        cp = Checkpoint.sign(self._signing_key, last.seq, last.chain_hash, now_us())
        with self._wengine.begin() as conn:
            conn.execute(sa.insert(chain_signatures).values(
                seq=cp.seq, chain_hash=cp.chain_hash, signed_us=cp.signed_us, key_id=cp.key_id,
                signature=cp.signature))
        if self._checkpoint_log is not None:
            append_checkpoint_log(self._checkpoint_log, cp)
        return cp

    def _sign_if_moved(self) -> None:
        """Sign unless this key already signed the head (replicas sharing a key sign it once)."""
        kid = key_id(self._signing_key.public_key())
        with self._engine.connect() as conn:
            head = conn.execute(sa.select(chain_head.c.seq)).scalar_one()
            signed = conn.execute(sa.select(sa.func.max(chain_signatures.c.seq))
                                  .where(chain_signatures.c.key_id == kid)).scalar()
        if head > (signed or 0):
            self.sign_head()

    def _sign_loop(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                self._sign_if_moved()
            except Exception:  # a database hiccup must not kill the signer; the next tick retries
                log.exception("signing the audit chain head failed")

    def verify(self, *, public_keys: Iterable[Any] | None = None, checkpoints: Iterable[Checkpoint] = (),
               chunk: int = 2000) -> VerifyReport:
        """Check every link, content hash, payload hash and signed checkpoint, and the key table
        against the key records; report the first broken link. Trusted keys: ``public_keys`` (key objects, PEM bytes or files), else this
        store's own signing key. ``checkpoints`` adds signed checkpoints kept outside the
        database (``read_checkpoint_log``); a checkpoint beyond the last record means deletion."""
        trusted = self._trusted(public_keys)
        issues: list[BrokenLink] = []
        conn_opts = {"isolation_level": "REPEATABLE READ"} if self.backend == "postgresql" else {}
        with self._engine.connect().execution_options(**conn_opts) as conn, conn.begin():
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
                    problem = self._check_row(r, expected, prev, labels.get(r.seq, ()), bodies.get(r.seq))
                    if problem is not None:
                        issues.append(BrokenLink(expected, r.record_id if r.seq == expected else None, problem))
                        broken = True
                        break
                    checked += 1
                    body = bodies.get(r.seq)
                    if body is None:
                        missing[r.seq] = r.record_id
                    elif r.kind in ("redaction", "retention"):
                        covered.update(self._covers(r.seq, orjson.loads(body)))
                    elif r.kind == "key":
                        event = orjson.loads(body)
                        key_state[event["key"]["key_id"]] = (r.seq, r.record_id, event)
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
            issues += self._check_keys(conn, key_state, head.seq + 1)
        first = min(issues, key=lambda b: b.seq) if issues else None
        return VerifyReport(first is None, checked, head.seq, head.chain_hash, first, signed_seq, valid,
                            untrusted, len(missing) - sum(1 for s in missing if s not in covered))

    def verify_record(self, record_id: str, *, tenant, public_keys: Iterable[Any] | None = None,
                      checkpoints: Iterable[Checkpoint] = ()) -> RecordProof:
        """Check one record without reading the whole chain: its content and payload hashes, then
        each link from it up to the first trusted signed checkpoint at or after it (the signature
        commits to everything before it). Cost: the records between it and that checkpoint."""
        trusted = self._trusted(public_keys)
        with self._engine.connect() as conn:
            r = conn.execute(sa.select(audit_records).where(
                audit_records.c.record_id == record_id, self._tenant_clause(tenant))).first()
            if r is None:
                raise NotFound(f"record {record_id!r}: no such record")
            labels = conn.execute(sa.select(audit_record_blocks.c.label).where(
                audit_record_blocks.c.seq == r.seq)).scalars().all()
            body = conn.execute(sa.select(audit_payloads.c.body).where(audit_payloads.c.seq == r.seq)).scalar()
            prev = conn.execute(sa.select(audit_records.c.chain_hash).where(
                audit_records.c.seq == r.seq - 1)).scalar() if r.seq > 1 else GENESIS_HASH

            def proof(ok: bool, reason: str | None = None, cp: int | None = None, n: int = 1) -> RecordProof:
                return RecordProof(ok, r.record_id, r.seq, reason, body is None, cp, n)

            if prev is None:
                return proof(False, f"record {r.seq - 1} is missing")
            problem = self._check_row(r, r.seq, prev, labels, body)
            if problem is not None:
                return proof(False, problem)
            if body is None and not any(
                    r.seq in self._covers(seq, orjson.loads(note)) for seq, note in conn.execute(
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

    def _trusted(self, public_keys: Iterable[Any] | None) -> dict[str, Any]:
        if public_keys is None:
            keys = [self._signing_key.public_key()] if self._signing_key is not None else []
        else:
            keys = [load_public_key(k) for k in public_keys]
        return {key_id(k): k for k in keys}

    @staticmethod
    def _check_row(r, expected: int, prev: str, labels: Iterable[str], body: str | None) -> str | None:
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

    def _check_keys(self, conn: Connection, key_state: dict[str, tuple[int, str, dict]],
                    unknown_seq: int) -> list[BrokenLink]:
        """The api_keys table must be exactly what the chained key records say it is."""
        issues = []
        rows = {r.key_id: r for r in conn.execute(sa.select(api_keys))}
        for kid, row in rows.items():
            if kid not in key_state:
                issues.append(BrokenLink(unknown_seq, None, f"api key {kid} has no audit record: "
                                         "it was added behind the store's back"))
                continue
            seq, rid, event = key_state[kid]
            stored = self._key(row).to_dict()
            differ = sorted(k for k, v in stored.items() if event["key"].get(k) != v)
            if sha256_hex(row.token_hash.encode()) != event["token_hash_digest"]:
                differ.append("token_hash")
            if differ:
                issues.append(BrokenLink(seq, rid, f"api key {kid}: {', '.join(differ)} differ from its audit records"))
        for kid in key_state.keys() - rows.keys():
            seq, rid, _ = key_state[kid]
            issues.append(BrokenLink(seq, rid, f"api key {kid} was deleted from the key table"))
        return issues

    @staticmethod
    def _covers(seq: int, payload: dict) -> set[int]:
        """The earlier records whose payload erasure this redaction/retention record accounts for."""
        if payload.get("action") == "redact":
            targets = {payload["target_seq"]}
        else:
            targets = {s for lo, hi in payload.get("seqs", ()) for s in range(lo, hi + 1)}
        return {s for s in targets if s < seq}

    # -- async facade (the event loop never waits on the database) -----------------------------

    async def aget_record(self, record_id: str, *, tenant) -> dict | None:
        return await asyncio.to_thread(self.get_record, record_id, tenant=tenant)

    async def alist_records(self, **filters) -> Page:
        return await asyncio.to_thread(lambda: self.list_records(**filters))

    async def aredact(self, record_id: str, *, tenant, reason: str, actor: str | None = None) -> Receipt:
        return await asyncio.to_thread(self.redact, record_id, tenant=tenant, reason=reason, actor=actor)

    async def apurge_payloads(self, **kwargs) -> int:
        return await asyncio.to_thread(lambda: self.purge_payloads(**kwargs))

    async def acreate_key(self, **kwargs) -> tuple[str, ApiKey]:
        return await asyncio.to_thread(lambda: self.create_key(**kwargs))

    async def alist_keys(self, **kwargs) -> list[ApiKey]:
        return await asyncio.to_thread(lambda: self.list_keys(**kwargs))

    async def arevoke_key(self, key_id: str, **kwargs) -> ApiKey:
        return await asyncio.to_thread(lambda: self.revoke_key(key_id, **kwargs))

    async def akeys_ever_created(self) -> bool:
        return await asyncio.to_thread(self.keys_ever_created)

    async def averify_key(self, token: str) -> ApiKey | None:
        return await asyncio.to_thread(self.verify_key, token)

    async def asign_head(self) -> Checkpoint | None:
        return await asyncio.to_thread(self.sign_head)

    async def averify_record(self, record_id: str, **kwargs) -> RecordProof:
        return await asyncio.to_thread(lambda: self.verify_record(record_id, **kwargs))

    async def averify(self, **kwargs) -> VerifyReport:
        return await asyncio.to_thread(lambda: self.verify(**kwargs))
