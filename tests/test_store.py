"""The audit store on SQLite (this file) and, through the same ``StoreContract``, on a real
PostgreSQL (test_store_postgres.py): schema from empty, round trip, filters, pagination, tenant
isolation, concurrent writers (threads and OS processes), tampering, redaction, signing, API keys.
"""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from localist.server.store import (
    ALL_TENANTS, AuditStore, NotFound, RecordError, load_public_key, public_key_pem, read_checkpoint_log,
)
from localist.server.store.records import Header, link_hash
from localist.server.store.schema import metadata


def make_record(i: int, tenant: str = "acme", **over) -> dict:
    """A request record as the server fills it; fields vary with ``i`` so filters have work to do."""
    rho = [0.1 * (i % 5), 0.1 * (i % 5) + 0.3] if i % 2 else 0.2 * (i % 4)
    rec = {
        "id": f"req-{tenant}-{i}",
        "tenant": tenant,
        "status": ("completed", "aborted", "failed")[i % 3],
        "error": "engine error" if i % 3 == 2 else None,
        "request": {
            "model": f"model-{i % 2}", "weights_hash": f"sha256:{i % 2:064d}", "rho": rho,
            "blocks": [{"label": "sys"}, {"label": f"doc-{i % 3}"}], "params": {"max_tokens": 8 + i},
        },
        "output": {"text": f"answer {i}", "token_ids": [i, i + 1], "finish_reason": "stop"},
        "metrics": {"fidelity": None if i % 7 == 6 else (i % 10) / 10, "entropy_bits": 1.5 + i},
        "timestamps": {"received": 1.7e9 + i, "finished": 1.7e9 + i + 0.25},
        "replay": {"prompt_token_ids": [1, 2, 3, i], "block_spans": [[0, 1, "sink", 1, 0, "sink"], [1, 4, "document", 0, 0, "doc"]], "seed": i,
                   "tokenizer_hash": "tok", "chat_template_hash": "tpl", "versions": {"localist": "0.1.0"}},
    }
    rec.update(over)
    return rec


def raw_engine(url: str) -> sa.Engine:
    """A plain connection to the store's database: what an attacker with database access has."""
    return sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://"))


def rehash_chain(conn) -> None:
    """Recompute every content, link and head hash: a consistent rewrite of the whole chain."""
    r, b = sa.table("audit_records", *[sa.column(c) for c in metadata.tables["audit_records"].c.keys()]), \
        metadata.tables["audit_record_blocks"]
    prev = "0" * 64
    for row in conn.execute(sa.select(r).order_by(r.c.seq)).all():
        labels = tuple(conn.execute(sa.select(b.c.label).where(b.c.seq == row.seq)).scalars())
        content = Header(row.record_id, row.kind, row.tenant, row.created_us, row.status, row.model, row.rho_min,
                         row.rho_max, row.fidelity, labels, row.payload_hash).content_hash()
        chain = link_hash(row.seq, prev, content)
        conn.execute(sa.update(r).where(r.c.seq == row.seq).values(content_hash=content, prev_hash=prev,
                                                                    chain_hash=chain))
        prev = chain
    conn.execute(sa.text("UPDATE chain_head SET chain_hash = :h"), {"h": prev})


PROCESS_WRITER = textwrap.dedent("""
    import asyncio
    import sys
    sys.path.insert(0, sys.argv[4])
    from test_store import make_record
    from localist.server.store import AuditStore
    url, tenant, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    with AuditStore(url) as store:  # every process migrates the (possibly empty) database on open
        for i in range(n // 2):
            store.record(make_record(i, tenant=tenant))
        async def rest():  # and the async writer, as the server uses it
            await asyncio.gather(*[store.arecord(make_record(i, tenant=tenant)) for i in range(n // 2, n)])
        asyncio.run(rest())
""")


KILLED_AFTER_ACK = textwrap.dedent("""
    import asyncio, os, signal, sys
    sys.path.insert(0, sys.argv[2])
    from test_store import make_record
    from localist.server.store import AuditStore
    store = AuditStore(sys.argv[1])
    receipt = asyncio.run(store.arecord(make_record(1)))
    print(receipt.id, receipt.seq, receipt.chain_hash, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # no close(), no flush, no goodbye
""")


class StoreContract:
    """Behaviour every backend must have; subclasses provide the ``url`` fixture (a fresh database)."""

    @pytest.fixture
    def store(self, url, tmp_path):
        with AuditStore(url, signing_key_path=tmp_path / "keys" / "audit.pem", create_signing_key=True,
                        checkpoint_log=tmp_path / "checkpoints.jsonl") as s:
            yield s

    # -- schema --------------------------------------------------------------------------------

    def test_open_migrates_empty_database_to_head(self, url):
        engine = raw_engine(url)
        assert sa.inspect(engine).get_table_names() == []
        AuditStore(url).close()
        AuditStore(url).close()  # a second open finds the schema at head and changes nothing
        with engine.connect() as conn:
            assert set(sa.inspect(conn).get_table_names()) == set(metadata.tables) | {"localist_alembic_version"}
            ctx = MigrationContext.configure(conn, opts={"version_table": "localist_alembic_version"})
            assert ctx.get_current_revision() == "0003"
            # The migration and the query-side tables agree column for column, index for index.
            assert compare_metadata(ctx, metadata) == []
            assert conn.execute(sa.text("SELECT seq, chain_hash FROM chain_head")).one() == (0, "0" * 64)
        engine.dispose()

    # -- writing and reading -------------------------------------------------------------------

    def test_record_round_trip(self, store):
        rec = make_record(3)
        receipt = store.record(rec)
        assert (receipt.id, receipt.seq) == ("req-acme-3", 1)
        got = store.get_record("req-acme-3", tenant="acme")
        for key in ("request", "output", "metrics", "error", "timestamps", "replay"):
            assert got[key] == rec[key]
        assert got["seq"] == 1 and got["kind"] == "request" and got["status"] == "completed"
        assert got["model"] == "model-1" and got["blocks"] == ["doc-0", "sys"]
        assert got["rho_min"] == pytest.approx(0.3) and got["rho_max"] == pytest.approx(0.6)
        assert got["fidelity"] == 0.3 and got["redacted"] is False
        assert got["hashes"]["chain"] == receipt.chain_hash and got["created_us"] == receipt.created_us
        assert abs(got["created_us"] / 1e6 - time.time()) < 60
        with pytest.raises(RecordError, match="record.id: already stored"):
            store.record(rec)

    def test_filters_and_cursor_pagination(self, store):
        recs = [make_record(i, tenant="acme" if i % 4 else "globex") for i in range(40)]
        for rec in recs:
            store.record(rec)
        acme = [r for r in recs if r["tenant"] == "acme"]

        def rho_range(r):
            rho = r["request"]["rho"]
            return (min(rho), max(rho)) if isinstance(rho, list) else (rho, rho)

        def ids(**filters):
            out, cursor = [], None
            while True:
                page = store.list_records(tenant="acme", limit=4, cursor=cursor, include_payload=False, **filters)
                out += [r["id"] for r in page.records]
                if page.next_cursor is None:
                    return out
                cursor = page.next_cursor

        newest_first = [r["id"] for r in reversed(acme)]
        assert ids() == newest_first
        assert ids(model="model-0") == [r["id"] for r in reversed(acme) if r["request"]["model"] == "model-0"]
        assert ids(status="failed") == [r["id"] for r in reversed(acme) if r["status"] == "failed"]
        assert ids(block="doc-2") == [r["id"] for r in reversed(acme)
                                      if {"label": "doc-2"} in r["request"]["blocks"]]
        assert ids(rho_min=0.2, rho_max=0.5) == [
            r["id"] for r in reversed(acme) if rho_range(r)[0] >= 0.2 - 1e-12 and rho_range(r)[1] <= 0.5 + 1e-12]
        assert ids(fidelity_min=0.5, fidelity_max=0.8) == [
            r["id"] for r in reversed(acme)
            if r["metrics"]["fidelity"] is not None and 0.5 <= r["metrics"]["fidelity"] <= 0.8]
        all_rows = store.list_records(tenant="acme", limit=1000).records
        mid = all_rows[len(all_rows) // 2]["created_us"]
        assert ids(since=mid / 1e6) == [r["id"] for r in all_rows if r["created_us"] >= mid]
        assert ids(until=mid / 1e6) == [r["id"] for r in all_rows if r["created_us"] < mid]
        with pytest.raises(RecordError, match="cursor"):
            store.list_records(tenant="acme", cursor="not-a-cursor")
        with pytest.raises(RecordError, match="limit"):
            store.list_records(tenant="acme", limit=0)
        with pytest.raises(RecordError, match="status: must be one of"):
            store.list_records(tenant="acme", status="done")
        with pytest.raises(RecordError, match="kind: must be one of"):
            store.list_records(tenant="acme", kind="requests")

    def test_tenant_isolation(self, store):
        store.record(make_record(1, tenant="acme"))
        store.record(make_record(2, tenant="globex"))
        assert store.get_record("req-globex-2", tenant="acme") is None
        assert store.get_record("req-globex-2", tenant="globex")["tenant"] == "globex"
        assert [r["id"] for r in store.list_records(tenant="acme").records] == ["req-acme-1"]
        assert [r["id"] for r in store.list_records(tenant=ALL_TENANTS).records] == ["req-globex-2", "req-acme-1"]
        with pytest.raises(NotFound):
            store.redact("req-globex-2", tenant="acme", reason="not yours")
        with pytest.raises(RecordError, match="tenant"):
            store.list_records(tenant=None)

    # -- concurrency ---------------------------------------------------------------------------

    def test_concurrent_threads_and_async_writers_keep_the_chain(self, store):
        def writer(t):
            for i in range(25):
                store.record(make_record(i, tenant=f"thread{t}"))

        async def async_writers():
            return await asyncio.gather(*[store.arecord(make_record(i, tenant="async")) for i in range(50)])

        threads = [threading.Thread(target=writer, args=(t,)) for t in range(4)]
        for th in threads:
            th.start()
        receipts = asyncio.run(async_writers())
        for th in threads:
            th.join()
        report = store.verify()
        assert report.ok, report.first_broken
        assert report.checked == report.head_seq == 150
        assert sorted(r.seq for r in receipts) == sorted(set(r.seq for r in receipts))
        assert len(store.list_records(tenant=ALL_TENANTS, limit=1000).records) == 150

    def test_racing_revokes_and_redactions_are_ordered(self, store):
        """Eight threads revoke one key and redact one record at once: one of each wins, the rest
        see the result; no duplicate key record, no deadlock, the chain stays valid."""
        store.record(make_record(1))
        _, key = store.create_key(tenant="acme", name="shared")
        results, errors = [], []
        barrier = threading.Barrier(8)

        def race():
            barrier.wait()
            results.append(store.revoke_key(key.key_id))
            try:
                results.append(store.redact("req-acme-1", tenant="acme", reason="race"))
            except RecordError as e:
                errors.append(str(e))

        threads = [threading.Thread(target=race) for _ in range(8)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        revoked = {r for r in results if not hasattr(r, "seq")}
        assert len(revoked) == 1 and next(iter(revoked)).revoked_us is not None
        assert len(errors) == 7 and all("already redacted" in e for e in errors)
        assert len(store.list_records(tenant=ALL_TENANTS, kind="key").records) == 2  # create + one revoke
        assert len(store.list_records(tenant=ALL_TENANTS, kind="redaction").records) == 1
        assert store.verify().ok

    def test_concurrent_processes_keep_the_chain(self, url, tmp_path):
        """Three OS processes (think: server replicas) open the empty database at once and append."""
        tests_dir = os.path.dirname(__file__)
        procs = [subprocess.Popen([sys.executable, "-c", PROCESS_WRITER, url, f"replica{p}", "30", tests_dir],
                                  stderr=subprocess.PIPE, text=True) for p in range(3)]
        for p in procs:
            _, err = p.communicate(timeout=300)
            assert p.returncode == 0, err
        with AuditStore(url) as store:
            report = store.verify()
            assert report.ok, report.first_broken
            assert report.checked == report.head_seq == 90
            for p in range(3):
                page = store.list_records(tenant=f"replica{p}", limit=1000, include_payload=False)
                assert len(page.records) == 30

    def test_acknowledged_record_survives_a_killed_process(self, url):
        AuditStore(url).close()
        done = subprocess.run([sys.executable, "-c", KILLED_AFTER_ACK, url, os.path.dirname(__file__)],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == -9, done.stderr
        rid, seq, chain = done.stdout.split()
        with AuditStore(url) as store:
            got = store.get_record(rid, tenant="acme")
            assert (got["seq"], got["hashes"]["chain"]) == (int(seq), chain)
            assert store.verify().ok

    # -- tampering -----------------------------------------------------------------------------

    @pytest.fixture
    def signed(self, store, url):
        """Ten records, the head signed at seq 10, then two more (unsigned) records."""
        for i in range(10):
            store.record(make_record(i))
        assert store.sign_head().seq == 10
        for i in range(10, 12):
            store.record(make_record(i))
        assert store.verify().ok
        engine = raw_engine(url)
        yield store, engine
        engine.dispose()

    @pytest.mark.parametrize("sql, seq, reason", [
        ("UPDATE audit_records SET model = 'other' WHERE seq = 4", 4, "content altered"),
        ("UPDATE audit_records SET fidelity = 0.99 WHERE seq = 5", 5, "content altered"),
        ("UPDATE audit_records SET tenant = 'globex' WHERE seq = 2", 2, "content altered"),
        ("UPDATE audit_record_blocks SET label = 'forged' WHERE seq = 3 AND label = 'sys'", 3, "content altered"),
        ("UPDATE audit_payloads SET body = REPLACE(body, 'answer', 'forged') WHERE seq = 7", 7, "payload altered"),
        ("UPDATE audit_records SET prev_hash = chain_hash WHERE seq = 8", 8, "content altered|prev_hash"),
        ("DELETE FROM audit_payloads WHERE seq = 6", 6, "payload deleted without a redaction record"),
    ])
    def test_edits_are_caught_at_the_first_broken_link(self, signed, sql, seq, reason):
        store, engine = signed
        with engine.begin() as conn:
            conn.execute(sa.text(sql))
        report = store.verify()
        assert not report.ok
        assert report.first_broken.seq == seq
        assert any(part in report.first_broken.reason for part in reason.split("|"))

    def test_deleting_a_row_is_caught(self, signed):
        store, engine = signed
        with engine.begin() as conn:
            for table in ("audit_payloads", "audit_record_blocks", "audit_records"):
                conn.execute(sa.text(f"DELETE FROM {table} WHERE seq = 6"))
        report = store.verify()
        assert (report.first_broken.seq, report.first_broken.reason) == (6, "record 6 is missing (the next stored record is 7)")

    def test_reordering_is_caught(self, signed):
        """Swap records 3 and 4 completely (fields, hashes, payloads, labels) between positions."""
        store, engine = signed
        with engine.begin() as conn:
            rows = {r.seq: r._asdict() for r in conn.execute(sa.text("SELECT * FROM audit_records WHERE seq IN (3, 4)"))}
            bodies = dict(conn.execute(sa.text("SELECT seq, body FROM audit_payloads WHERE seq IN (3, 4)")).all())
            labels = conn.execute(sa.text("SELECT seq, label FROM audit_record_blocks WHERE seq IN (3, 4)")).all()
            conn.execute(sa.text("UPDATE audit_records SET record_id = 'tmp' || seq WHERE seq IN (3, 4)"))
            conn.execute(sa.text("DELETE FROM audit_record_blocks WHERE seq IN (3, 4)"))
            for a, b in ((3, 4), (4, 3)):
                cols = {k: v for k, v in rows[b].items() if k != "seq"}
                conn.execute(sa.text("UPDATE audit_records SET " + ", ".join(f"{k} = :{k}" for k in cols)
                                     + " WHERE seq = :seq"), {**cols, "seq": a})
                conn.execute(sa.text("UPDATE audit_payloads SET body = :b WHERE seq = :s"), {"b": bodies[b], "s": a})
            for s, label in labels:
                conn.execute(sa.text("INSERT INTO audit_record_blocks (seq, label) VALUES (:s, :l)"),
                             {"s": 7 - s, "l": label})
        report = store.verify()
        assert report.first_broken.seq == 3
        assert "prev_hash" in report.first_broken.reason or "chain_hash" in report.first_broken.reason

    def test_truncating_the_tail_is_caught(self, signed):
        store, engine = signed
        with engine.begin() as conn:  # drop records 9..12 and make the head agree with record 8
            for table in ("audit_payloads", "audit_record_blocks", "audit_records"):
                conn.execute(sa.text(f"DELETE FROM {table} WHERE seq > 8"))
            conn.execute(sa.text("UPDATE chain_head SET seq = 8, chain_hash = "
                                 "(SELECT chain_hash FROM audit_records WHERE seq = 8)"))
        report = store.verify()
        assert report.first_broken.seq == 9
        assert "signed checkpoint covers seq 10" in report.first_broken.reason

    def test_consistent_rewrite_is_caught_only_by_the_signatures(self, signed, tmp_path):
        store, engine = signed
        with engine.begin() as conn:
            conn.execute(sa.text("UPDATE audit_records SET model = 'rewritten' WHERE seq = 2"))
            rehash_chain(conn)
        assert store.verify(public_keys=[]).ok  # the chain alone is consistent again
        report = store.verify()
        assert report.first_broken.seq == 10
        assert "signed checkpoint" in report.first_broken.reason
        # An auditor holding only the public key file reaches the same verdict.
        pub = tmp_path / "audit.pub"
        pub.write_bytes(public_key_pem(load_public_key(tmp_path / "keys" / "audit.pem")))
        assert store.verify(public_keys=[pub]).first_broken.seq == 10

    def test_rewrite_that_drops_the_stored_signatures_is_caught_by_the_checkpoint_log(self, signed, tmp_path):
        store, engine = signed
        with engine.begin() as conn:
            conn.execute(sa.text("UPDATE audit_records SET status = 'completed' WHERE seq = 3"))
            rehash_chain(conn)
            conn.execute(sa.text("DELETE FROM chain_signatures"))
        assert store.verify().ok and store.verify().signed_seq is None  # nothing left in the database
        log = read_checkpoint_log(tmp_path / "checkpoints.jsonl")
        assert [cp.seq for cp in log] == [10]
        report = store.verify(checkpoints=log)
        assert (report.ok, report.first_broken.seq) == (False, 10)

    def test_forged_signature_is_caught(self, signed):
        store, engine = signed
        with engine.begin() as conn:
            sig = conn.execute(sa.text("SELECT signature FROM chain_signatures")).scalar_one()
            forged = ("0" if sig[0] != "0" else "1") + sig[1:]
            conn.execute(sa.text("UPDATE chain_signatures SET signature = :s"), {"s": forged})
        report = store.verify()
        assert (report.first_broken.seq, report.first_broken.reason) == (10, "a checkpoint's signature does not verify")

    @pytest.mark.parametrize("sql, reason", [
        ("UPDATE api_keys SET admin = TRUE WHERE name = 'ci'", "admin differ"),
        ("UPDATE api_keys SET tenant = 'globex' WHERE name = 'ci'", "tenant differ"),
        ("UPDATE api_keys SET revoked_us = NULL WHERE name = 'ci'", "revoked_us differ"),
        ("UPDATE api_keys SET token_hash = (SELECT token_hash FROM api_keys WHERE name = 'mine') WHERE name = 'ci'",
         "token_hash differ"),
        ("INSERT INTO api_keys SELECT 'ffffffffffffffff', token_hash, tenant, 'planted', TRUE, created_us, NULL, "
         "NULL, NULL FROM api_keys WHERE name = 'mine'", "added behind the store's back"),
        ("DELETE FROM api_keys WHERE name = 'ci'", "deleted from the key table"),
    ])
    def test_key_table_edits_are_caught(self, store, url, sql, reason):
        store.record(make_record(0))
        _, ci = store.create_key(tenant="acme", name="ci")
        store.create_key(tenant="acme", name="mine")
        revoke = store.revoke_key(ci.key_id)
        assert store.verify().ok and revoke.revoked_us is not None
        engine = raw_engine(url)
        with engine.begin() as conn:
            conn.execute(sa.text(sql))
        engine.dispose()
        report = store.verify()
        assert not report.ok and reason in report.first_broken.reason
        # The contradicted record is ci's last key record (seq 4: the revocation), or past the head.
        assert report.first_broken.seq == (5 if "planted" in sql else 4)

    def test_verify_one_record_up_to_its_checkpoint(self, signed):
        store, engine = signed
        proof = store.verify_record("req-acme-3", tenant="acme")
        assert (proof.ok, proof.seq, proof.checkpoint_seq, proof.links_checked) == (True, 4, 10, 7)
        unsigned = store.verify_record("req-acme-10", tenant="acme")
        assert (unsigned.ok, unsigned.checkpoint_seq, unsigned.links_checked) == (True, None, 2)
        with pytest.raises(NotFound):
            store.verify_record("req-acme-3", tenant="globex")
        store.redact("req-acme-5", tenant="acme", reason="erasure")
        redacted = store.verify_record("req-acme-5", tenant="acme")
        assert redacted.ok and redacted.redacted and redacted.checkpoint_seq == 10
        with engine.begin() as conn:
            conn.execute(sa.text("DELETE FROM audit_payloads WHERE seq = 3"))
        assert store.verify_record("req-acme-2", tenant="acme").reason == "payload deleted without a redaction record"
        with engine.begin() as conn:
            conn.execute(sa.text("UPDATE audit_records SET prev_hash = chain_hash WHERE seq = 7"))
        broken = store.verify_record("req-acme-3", tenant="acme")
        assert (broken.ok, broken.reason) == (False, "the link at record 7 is broken")
        with engine.begin() as conn:
            conn.execute(sa.text("UPDATE audit_records SET model = 'rewritten' WHERE seq = 2"))
            rehash_chain(conn)
        assert store.verify_record("req-acme-3", tenant="acme", public_keys=[]).ok  # no key: the chain alone
        rewritten = store.verify_record("req-acme-3", tenant="acme")
        assert not rewritten.ok and "signed checkpoint at seq 10" in rewritten.reason
        with engine.begin() as conn:
            conn.execute(sa.text("UPDATE audit_records SET model = 'edited' WHERE seq = 4"))
        assert store.verify_record("req-acme-3", tenant="acme").reason.startswith("content altered")

    # -- redaction, retention, signing ---------------------------------------------------------

    def test_redaction_and_retention_keep_the_chain_valid(self, store):
        for i in range(6):
            store.record(make_record(i))
        receipt = store.redact("req-acme-2", tenant="acme", reason="erasure request", actor="key:admin")
        got = store.get_record("req-acme-2", tenant="acme")
        assert got["redacted"] is True and "request" not in got and got["model"] == "model-0"
        note = store.list_records(tenant="acme", kind="redaction").records
        assert [(n["target_id"], n["target_seq"], n["reason"], n["seq"]) for n in note] == [
            ("req-acme-2", 3, "erasure request", receipt.seq)]
        with pytest.raises(RecordError, match="already redacted"):
            store.redact("req-acme-2", tenant="acme", reason="again")
        report = store.verify()
        assert report.ok and report.redacted == 1
        cutoff = store.get_record("req-acme-4", tenant="acme")["created_us"] / 1e6
        assert store.purge_payloads(before=cutoff) == 3  # records 0, 1, 3 (2 was already erased)
        report = store.verify()
        assert report.ok and report.redacted == 4
        assert store.get_record("req-acme-4", tenant="acme")["redacted"] is False

    def test_periodic_signing_and_final_signature(self, url, tmp_path):
        key = tmp_path / "k.pem"
        with AuditStore(url, signing_key_path=key, create_signing_key=True, sign_interval_s=0.2,
                        checkpoint_log=tmp_path / "cp.jsonl") as store:
            for i in range(5):
                store.record(make_record(i))
            deadline = time.time() + 30
            while store.verify().signed_seq != 5 and time.time() < deadline:
                time.sleep(0.05)
            assert store.verify().signed_seq == 5
            store.record(make_record(5))
        assert oct(key.stat().st_mode & 0o777) == "0o600"
        with AuditStore(url) as store:
            report = store.verify(public_keys=[key])
            assert report.ok and report.signed_seq == 6  # close() signed the final head
        log = read_checkpoint_log(tmp_path / "cp.jsonl")
        assert log[-1].seq == 6 and [cp.seq for cp in log].count(6) == 1
        AuditStore(url, signing_key_path=key, checkpoint_log=tmp_path / "cp.jsonl").close()
        assert len(read_checkpoint_log(tmp_path / "cp.jsonl")) == len(log)  # the head was already signed

    # -- API keys ------------------------------------------------------------------------------

    def test_api_keys(self, store, url):
        token, key = store.create_key(tenant="acme", name="ci", rate_limit_per_min=60, max_concurrency=4,
                                      actor="key:root")
        admin_token, admin = store.create_key(tenant="ops", name="root", admin=True)
        assert token.startswith(f"lk_{key.key_id}_") and admin.admin and not key.admin
        assert store.verify_key(token) == key and (key.rate_limit_per_min, key.max_concurrency) == (60, 4)
        assert store.verify_key(token[:-1] + ("A" if token[-1] != "A" else "B")) is None
        assert store.verify_key("lk_nonsense") is None and store.verify_key("") is None
        engine = raw_engine(url)
        with engine.connect() as conn:  # hashed at rest: the secret is nowhere in the database
            dump = " ".join(str(v) for table in ("api_keys", "audit_payloads")
                            for row in conn.execute(sa.text(f"SELECT * FROM {table}")) for v in row)
        engine.dispose()
        assert token.split("_", 2)[2] not in dump and admin_token.split("_", 2)[2] not in dump
        assert [k.key_id for k in store.list_keys(tenant="acme")] == [key.key_id]
        assert {k.key_id for k in store.list_keys()} == {key.key_id, admin.key_id}
        revoked = store.revoke_key(key.key_id, actor="key:root")
        assert revoked.revoked_us is not None and store.verify_key(token) is None
        assert store.revoke_key(key.key_id) == revoked  # idempotent
        assert store.list_keys(tenant="acme", include_revoked=False) == []
        with pytest.raises(NotFound):
            store.revoke_key(admin.key_id, tenant="acme")
        # Key management is itself in the audit chain.
        events = store.list_records(tenant=ALL_TENANTS, kind="key").records
        assert [(e["action"], e["key"]["key_id"], e["actor"]) for e in reversed(events)] == [
            ("create", key.key_id, "key:root"), ("create", admin.key_id, None), ("revoke", key.key_id, "key:root")]
        assert store.verify().ok
        # A configured bootstrap token imports once; importing it again is a no-op.
        boot = "lk_00112233445566ff_" + "s" * 40
        assert store.create_key(tenant="ops", name="boot", admin=True, token=boot)[1] == \
            store.create_key(tenant="ops", name="boot", admin=True, token=boot)[1]
        assert store.verify_key(boot).admin
        with pytest.raises(RecordError, match="max_concurrency"):
            store.create_key(tenant="acme", name="x", max_concurrency=0)
        with pytest.raises(RecordError, match="token"):
            store.create_key(tenant="acme", name="x", token="short")


class TestSqlite(StoreContract):
    @pytest.fixture
    def url(self, tmp_path):
        return f"sqlite:///{tmp_path / 'audit.db'}"

    def test_sqlite_runs_in_wal_mode(self, store, url):
        with raw_engine(url).connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"

    async def test_arecord_never_blocks_the_event_loop(self, store, url):
        """Another connection holds the database's write lock; while arecord waits for it the loop
        keeps running, and once it returns the record is visible to a fresh connection."""
        import sqlite3

        holder = sqlite3.connect(url.removeprefix("sqlite:///"), isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        task = asyncio.ensure_future(store.arecord(make_record(1)))
        ticks = 0
        for _ in range(20):
            await asyncio.sleep(0.01)
            ticks += 1
        assert ticks == 20 and not task.done()  # blocked on the lock, but not blocking the loop
        holder.execute("COMMIT")
        receipt = await asyncio.wait_for(task, 30)
        fresh = sqlite3.connect(url.removeprefix("sqlite:///"))
        assert fresh.execute("SELECT record_id FROM audit_records WHERE seq = ?", (receipt.seq,)).fetchone() == (
            "req-acme-1",)
        fresh.close()
        holder.close()

    async def test_cancelled_arecord_is_still_written(self, store, url):
        """A client that hangs up mid-request must not erase its audit record."""
        import sqlite3

        holder = sqlite3.connect(url.removeprefix("sqlite:///"), isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        task = asyncio.ensure_future(store.arecord(make_record(7)))
        await asyncio.sleep(0.05)
        task.cancel()
        holder.execute("COMMIT")
        holder.close()
        with pytest.raises(asyncio.CancelledError):
            await task
        receipt = await asyncio.wait_for(store.arecord(make_record(8)), 30)  # the writer survived
        assert receipt.seq == 2
        assert store.get_record("req-acme-7", tenant="acme")["seq"] == 1

    async def test_async_facade(self, store):
        receipts = await asyncio.gather(*[store.arecord(make_record(i)) for i in range(10)])
        assert sorted(r.seq for r in receipts) == list(range(1, 11))
        bad = await asyncio.gather(store.arecord(make_record(1)), store.arecord({"tenant": "acme"}),
                                   store.arecord(make_record(99)), return_exceptions=True)
        assert isinstance(bad[0], RecordError) and "already stored" in str(bad[0])
        assert isinstance(bad[1], RecordError) and "record.status" in str(bad[1])
        assert bad[2].seq == 11  # a bad neighbour in the same commit batch does not sink a good record
        assert (await store.aget_record("req-acme-99", tenant="acme"))["seq"] == 11
        assert len((await store.alist_records(tenant="acme", limit=100)).records) == 11
        token, key = await store.acreate_key(tenant="acme", name="a")
        assert (await store.averify_key(token)) == key
        assert (await store.averify()).ok


@pytest.mark.parametrize("mutate, field", [
    (lambda r: r.update(status="done"), "record.status"),
    (lambda r: r.update(tenant=""), "record.tenant"),
    (lambda r: r.update(colour="red"), "record.colour"),
    (lambda r: r.update(status="failed", error=None), "record.error"),
    (lambda r: r["request"].update(rho=1.5), "request.rho"),
    (lambda r: r["request"].update(rho=[0.1, "x"]), "request.rho[1]"),
    (lambda r: r["request"].update(rho=[]), "request.rho"),
    (lambda r: r["request"].pop("model"), "request.model"),
    (lambda r: r["request"].pop("weights_hash"), "request.weights_hash"),
    (lambda r: r["request"].update(blocks=[{"label": "a"}, {"start": 0}]), "request.blocks[1].label"),
    (lambda r: r["metrics"].update(fidelity=1.2), "metrics.fidelity"),
    (lambda r: r["metrics"].update(entropy_bits=float("nan")), "metrics.entropy_bits"),
    (lambda r: r["output"].update(token_ids=[1, object()]), "output.token_ids[1]"),
    (lambda r: r["timestamps"].update(finished="late"), "timestamps.finished"),
    (lambda r: r["request"]["params"].update(seed=2**70), "request.params.seed"),
    (lambda r: r["replay"].update(prompt_token_ids=[1, -2]), "replay.prompt_token_ids"),
    (lambda r: r["replay"].update(seed=1.5), "replay.seed"),
])
def test_bad_records_name_the_field(tmp_path, mutate, field):
    rec = make_record(1)
    mutate(rec)
    with AuditStore(f"sqlite:///{tmp_path / 'a.db'}") as store:
        with pytest.raises(RecordError) as err:
            store.record(rec)
        assert str(err.value).startswith(field + ":")
        assert store.verify().head_seq == 0


def test_unsupported_urls_are_refused(tmp_path):
    with pytest.raises(ValueError, match="url: an SQLite audit store needs a file"):
        AuditStore("sqlite://")
    with pytest.raises(ValueError, match="url: unsupported database 'mysql'"):
        AuditStore("mysql://x/y")
    with pytest.raises(ValueError, match="sign_interval_s: needs signing_key_path"):
        AuditStore(f"sqlite:///{tmp_path / 'a.db'}", sign_interval_s=1)


# -- any single edit, anywhere, is reported at exactly its record -------------------------------

HASHED_COLUMNS = ["record_id", "kind", "tenant", "created_us", "status", "model", "rho_min", "rho_max", "fidelity",
                  "payload_hash", "content_hash", "prev_hash", "chain_hash", "body", "label"]


@pytest.fixture(scope="module")
def template_db(tmp_path_factory):
    """Twelve signed records in an SQLite file that each example copies (the sqlite3 backup API)."""
    import sqlite3

    path = tmp_path_factory.mktemp("template") / "audit.db"
    with AuditStore(f"sqlite:///{path}", signing_key_path=path.with_suffix(".pem"), create_signing_key=True) as s:
        for i in range(12):
            s.record(make_record(i))
    src = sqlite3.connect(path)
    yield src, path.with_suffix(".pem")
    src.close()


def _forged_value(draw, column, old):
    from hypothesis import strategies as st

    if column in ("created_us",):
        return draw(st.integers(0, 2**62).filter(lambda v: v != old))
    if column in ("rho_min", "rho_max", "fidelity"):
        return draw(st.one_of(st.none(), st.floats(0, 1)).filter(lambda v: v != old))
    if column == "status":
        return draw(st.sampled_from([None, "completed", "aborted", "failed"]).filter(lambda v: v != old))
    return "forged-" + draw(st.text(min_size=0, max_size=12))


def test_any_single_edit_is_reported_at_its_seq(template_db, tmp_path_factory):
    """Property (hypothesis): change one hashed field, payload or block label of any record to any
    other value; verify names exactly that record as the first broken link."""
    import sqlite3

    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    src, key = template_db
    workdir = tmp_path_factory.mktemp("edits")

    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(seq=st.integers(1, 12), column=st.sampled_from(HASHED_COLUMNS), data=st.data())
    def check(seq, column, data):
        path = workdir / "copy.db"
        for suffix in ("", "-wal", "-shm"):
            (workdir / f"copy.db{suffix}").unlink(missing_ok=True)
        dst = sqlite3.connect(path)
        src.backup(dst)
        if column == "body":
            old = dst.execute("SELECT body FROM audit_payloads WHERE seq = ?", (seq,)).fetchone()[0]
            new = old.replace('"answer', '"' + _forged_value(data.draw, column, old))
            dst.execute("UPDATE audit_payloads SET body = ? WHERE seq = ?", (new, seq))
        elif column == "label":
            new = _forged_value(data.draw, column, None)
            dst.execute("UPDATE audit_record_blocks SET label = ? WHERE seq = ? AND label = 'sys'", (new, seq))
        else:
            old = dst.execute(f"SELECT {column} FROM audit_records WHERE seq = ?", (seq,)).fetchone()[0]
            new = _forged_value(data.draw, column, old)
            dst.execute(f"UPDATE audit_records SET {column} = ? WHERE seq = ?", (new, seq))
        dst.commit()
        dst.close()
        with AuditStore(f"sqlite:///{path}", signing_key_path=key) as store:
            report = store.verify()
        assert not report.ok and report.first_broken.seq == seq, (column, report.first_broken)

    check()
