"""The audit store: an append-only, hash-chained, signed log of requests and key actions.

SQLite (WAL, ``BEGIN IMMEDIATE``) is the embedded default; PostgreSQL by URL is the scale-out path
(stateless replicas, one database). Appends lock the single ``chain_head`` row (``SELECT ... FOR
UPDATE`` on PostgreSQL, the database write lock on SQLite), so the chain order is total across
threads, processes and hosts. The schema is migrated by Alembic when a store opens.

:class:`AuditStore` owns the database, the writer thread and the signer; the work is done in the
modules beside it: ``chain`` (appending), ``writer`` (batched writes from the event loop),
``query`` (reading), ``erasure`` (redaction, retention), ``keys`` (API keys), ``verification``.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError

from . import erasure, keys, query, rules, verification
from .availability import Availability, StoreUnavailable, is_outage
from .chain import Receipt, append, lock_head, now_us
from .keys import ApiKey
from .query import ALL_TENANTS, Page
from .records import Entry, RecordError, request_entry
from .schema import audit_records, chain_head, chain_signatures
from .signing import Checkpoint, append_checkpoint_log, key_id, load_public_key, load_signing_key
from .verification import RecordProof, VerifyReport
from .writer import RecordWriter

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).with_name("migrations")
MIGRATION_LOCK = 0x10CA1157  # pg_advisory_xact_lock key: one migrator at a time
# A no-op write can commit on a full disk (SQLite reuses its WAL's pages), so on SQLite the probe
# also wants this much free space beside the database before it calls an outage over.
SQLITE_PROBE_FREE_BYTES = 1 << 20


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
        self._writer = RecordWriter(self._append_entries)
        self.availability = Availability(self._probe)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._signer: threading.Thread | None = None
        self._closed = False
        self._migrate()
        if sign_interval_s is not None:
            self._signer = threading.Thread(target=self._sign_loop, args=(sign_interval_s,),
                                            name="localist-audit-signer", daemon=True)
            self._signer.start()

    # -- the database ---------------------------------------------------------------------------

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

    def _reading(self) -> contextlib.AbstractContextManager[sa.Connection]:
        """A connection; a database that cannot be used raises StoreUnavailable (and starts an outage)."""
        return self._guarded(self._engine.connect)

    def _writing(self) -> contextlib.AbstractContextManager[sa.Connection]:
        """A write transaction (committed on leaving); outages as in ``_reading``."""
        return self._guarded(self._wengine.begin)

    @contextlib.contextmanager
    def _guarded(self, connect: Callable[[], contextlib.AbstractContextManager[sa.Connection]]) -> Iterator[sa.Connection]:
        try:
            with connect() as conn:
                yield conn
        except sa.exc.DBAPIError as e:
            if is_outage(e):
                raise self.availability.failed(e) from e
            raise

    def _probe(self) -> None:
        """A write that commits nothing new (the append lock taken, the head rewritten as it is); raises
        while the database cannot take writes."""
        if self.backend == "sqlite":
            free = shutil.disk_usage(Path(self._engine.url.database).parent).free
            if free < SQLITE_PROBE_FREE_BYTES:
                raise StoreUnavailable(f"disk full: {free} bytes free beside the database")
        with self._wengine.begin() as conn:
            lock_head(conn)
            conn.execute(sa.update(chain_head).where(chain_head.c.id == 1).values(seq=chain_head.c.seq))

    def ensure_available(self) -> None:
        """Raise StoreUnavailable while an outage lasts (checked before a request does any work)."""
        self.availability.ensure_available()

    def close(self) -> None:
        """Drain the async writer, sign the final head (when a key is set), release connections."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._stop.set()
        self._writer.close()
        self.availability.close()
        if self._signer is not None:
            self._signer.join()
        if self._signing_key is not None:
            try:
                self._sign_if_moved()
            except StoreUnavailable as e:  # the checkpoint is signed by the next run instead
                log.warning("the final head was not signed: %s", e)
        self._engine.dispose()

    def __enter__(self) -> AuditStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- appending ------------------------------------------------------------------------------

    def _append_entries(self, entries: Sequence[Entry]) -> list[Receipt]:
        try:
            with self._writing() as conn:
                return append(conn, entries)
        except IntegrityError as e:
            raise RecordError(f"record.id: already stored ({', '.join(x.unplaced.record_id for x in entries)})") from e

    def record(self, record: dict) -> Receipt:
        """Validate and append one request record (blocking); returns once it is committed."""
        return self._append_entries([request_entry(record)])[0]

    async def arecord(self, record: dict) -> Receipt:
        """``record`` for the event loop: the write runs on the store's writer thread (records that
        arrive together share one commit); awaiting returns once the record is durable. Validation
        runs there too, so leave ``record`` unmodified until this returns."""
        return await asyncio.wrap_future(self._writer.submit(record))

    # -- reading, erasing -----------------------------------------------------------------------

    def get_record(self, record_id: str, *, tenant) -> dict | None:
        """The record with this id if ``tenant`` may see it (None otherwise: no existence leak)."""
        with self._reading() as conn:
            return query.get_record(conn, record_id, tenant)

    def list_records(self, *, tenant, **filters) -> Page:
        """Newest first, filtered (``query.list_records`` names the filters); ``next_cursor`` continues."""
        with self._reading() as conn:
            return query.list_records(conn, tenant=tenant, **filters)

    def redact(self, record_id: str, *, tenant, reason: str, actor: str | None = None) -> Receipt:
        """Erase a request's payload; a redaction record (chained) says who, why and which hash."""
        with self._writing() as conn:
            return erasure.redact(conn, record_id, tenant=tenant, reason=reason, actor=actor)

    def purge_payloads(self, *, before, tenant=ALL_TENANTS, actor: str | None = None) -> int:
        """Retention: erase the payloads of request records created before ``before``; one retention
        record lists them. Returns how many were erased."""
        with self._writing() as conn:
            return erasure.purge_payloads(conn, before=before, tenant=tenant, actor=actor)

    # -- API keys -------------------------------------------------------------------------------

    def create_key(self, *, tenant: str, name: str, admin: bool = False,
                   rate_limit_per_min: int | None = None, max_concurrency: int | None = None,
                   actor: str | None = None, token: str | None = None) -> tuple[str, ApiKey]:
        """A new key for ``tenant``: returns (token, key). The token is shown once, stored hashed.
        ``token`` imports a configured one (the bootstrap admin key); importing the same token
        again returns the stored key."""
        with self._writing() as conn:
            return keys.create_key(conn, tenant=tenant, name=name, admin=admin, rate_limit_per_min=rate_limit_per_min,
                                   max_concurrency=max_concurrency, actor=actor, token=token)

    def list_keys(self, *, tenant=ALL_TENANTS, include_revoked: bool = True) -> list[ApiKey]:
        with self._reading() as conn:
            return keys.list_keys(conn, tenant=tenant, include_revoked=include_revoked)

    def revoke_key(self, key_id: str, *, tenant=ALL_TENANTS, actor: str | None = None) -> ApiKey:
        """Revoke (idempotent: an already revoked key is returned unchanged, with no new record)."""
        with self._writing() as conn:
            return keys.revoke_key(conn, key_id, tenant=tenant, actor=actor)

    def keys_ever_created(self) -> bool:
        """Whether this store has ever held an API key (``keys.keys_ever_created``)."""
        with self._reading() as conn:
            return keys.keys_ever_created(conn)

    def verify_key(self, token: str) -> ApiKey | None:
        """The active key this token is, or None (unknown, malformed, wrong secret, or revoked)."""
        with self._reading() as conn:
            return keys.verify_key(conn, token)

    # -- rules and rulebooks (``rules``) -----------------------------------------------------------

    def create_rule_version(self, **kwargs) -> rules.StoredRule:
        """A rule's or rulebook's next version (``rules.create_version``), with its chained record."""
        with self._writing() as conn:
            return rules.create_version(conn, **kwargs)

    def retire_rule(self, **kwargs) -> rules.StoredRule:
        with self._writing() as conn:
            return rules.retire(conn, **kwargs)

    def get_rule(self, *, tenant: str, label: str) -> rules.StoredRule | None:
        with self._reading() as conn:
            return rules.get_rule(conn, tenant=tenant, label=label)

    def list_rules(self, *, tenant: str, include_retired: bool = False) -> list[rules.StoredRule]:
        with self._reading() as conn:
            return rules.list_rules(conn, tenant=tenant, include_retired=include_retired)

    # -- backup -------------------------------------------------------------------------------------

    def backup(self, dest: str | os.PathLike) -> None:
        """Copy an SQLite store to the new file ``dest`` with SQLite's online backup API: a consistent
        snapshot while the server keeps writing. A PostgreSQL store is backed up with ``pg_dump``
        (docs/server.md, "Backup and restore")."""
        if self.backend != "sqlite":
            raise ValueError("backup: a PostgreSQL store is backed up with pg_dump --format=custom, "
                             "restored with pg_restore")
        dest = Path(dest)
        if dest.exists():
            raise ValueError(f"backup: {dest} exists; a backup goes to a new file")
        dest.parent.mkdir(parents=True, exist_ok=True)
        target = sqlite3.connect(dest)
        try:
            with self._reading() as conn:
                conn.connection.driver_connection.backup(target)
        finally:
            target.close()

    # -- signing and verification ---------------------------------------------------------------

    def sign_head(self) -> Checkpoint | None:
        """Sign the last record's (seq, chain_hash) now; None when the store is empty."""
        if self._signing_key is None:
            raise RuntimeError("sign_head: the store was opened without signing_key_path")
        with self._reading() as conn:
            last = conn.execute(sa.select(audit_records.c.seq, audit_records.c.chain_hash)
                                .order_by(audit_records.c.seq.desc()).limit(1)).first()
        if last is None:
            return None
        cp = Checkpoint.sign(self._signing_key, last.seq, last.chain_hash, now_us())
        with self._writing() as conn:
            conn.execute(sa.insert(chain_signatures).values(
                seq=cp.seq, chain_hash=cp.chain_hash, signed_us=cp.signed_us, key_id=cp.key_id,
                signature=cp.signature))
        if self._checkpoint_log is not None:
            append_checkpoint_log(self._checkpoint_log, cp)
        return cp

    def _sign_if_moved(self) -> None:
        """Sign unless this key already signed the head (replicas sharing a key sign it once)."""
        kid = key_id(self._signing_key.public_key())
        with self._reading() as conn:
            head = conn.execute(sa.select(chain_head.c.seq)).scalar_one()
            signed = conn.execute(sa.select(sa.func.max(chain_signatures.c.seq))
                                  .where(chain_signatures.c.key_id == kid)).scalar()
        if head > (signed or 0):
            self.sign_head()

    def _sign_loop(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                self._sign_if_moved()
            except StoreUnavailable:  # said once by the outage; the tick after it ends signs
                pass
            except Exception:  # a database hiccup must not kill the signer; the next tick retries
                log.exception("signing the audit chain head failed")

    def _trusted(self, public_keys: Iterable[Any] | None) -> dict[str, Any]:
        """Trusted keys by key id: ``public_keys`` (key objects, PEM bytes or files), else this store's own."""
        if public_keys is None:
            trusted = [self._signing_key.public_key()] if self._signing_key is not None else []
        else:
            trusted = [load_public_key(k) for k in public_keys]
        return {key_id(k): k for k in trusted}

    def verify(self, *, public_keys: Iterable[Any] | None = None, checkpoints: Iterable[Checkpoint] = (),
               chunk: int = 2000) -> VerifyReport:
        """Check the whole chain (``verification.verify_chain``) against ``public_keys`` (else this store's
        own key), with ``checkpoints`` kept outside the database (``read_checkpoint_log``)."""
        trusted = self._trusted(public_keys)
        options = {"isolation_level": "REPEATABLE READ"} if self.backend == "postgresql" else {}
        with self._reading() as conn, conn.execution_options(**options).begin():
            return verification.verify_chain(conn, trusted, checkpoints, chunk)

    def verify_record(self, record_id: str, *, tenant, public_keys: Iterable[Any] | None = None,
                      checkpoints: Iterable[Checkpoint] = ()) -> RecordProof:
        """Check one record up to the trusted checkpoint that commits to it (``verification.verify_record``)."""
        trusted = self._trusted(public_keys)
        with self._reading() as conn:
            return verification.verify_record(conn, record_id, tenant=tenant, trusted=trusted,
                                              checkpoints=checkpoints)

    # -- async facade (the event loop never waits on the database) ------------------------------

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

    async def acreate_rule_version(self, **kwargs) -> rules.StoredRule:
        return await asyncio.to_thread(lambda: self.create_rule_version(**kwargs))

    async def aretire_rule(self, **kwargs) -> rules.StoredRule:
        return await asyncio.to_thread(lambda: self.retire_rule(**kwargs))

    async def aget_rule(self, **kwargs) -> rules.StoredRule | None:
        return await asyncio.to_thread(lambda: self.get_rule(**kwargs))

    async def alist_rules(self, **kwargs) -> list[rules.StoredRule]:
        return await asyncio.to_thread(lambda: self.list_rules(**kwargs))

    async def akeys_ever_created(self) -> bool:
        return await asyncio.to_thread(self.keys_ever_created)

    async def averify_key(self, token: str) -> ApiKey | None:
        return await asyncio.to_thread(self.verify_key, token)

    async def averify_record(self, record_id: str, **kwargs) -> RecordProof:
        return await asyncio.to_thread(lambda: self.verify_record(record_id, **kwargs))

    async def averify(self, **kwargs) -> VerifyReport:
        return await asyncio.to_thread(lambda: self.verify(**kwargs))
