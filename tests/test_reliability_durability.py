"""Durability against a real server of its own, on SQLite and PostgreSQL (tests/pg.py):
``kill -9`` under load, restart, and every acknowledged response has its audit record and the chain
verifies; records edited, reordered or deleted in the database are named by `verify`; a backup restores
and verifies; after a signing-key rotation the old checkpoints still verify with the old public key.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import httpx
import psutil
import pytest
from conftest import MODEL_NAME, ports_in, run_sql, serving
from reliability_figures import FULL, record

from localist.server.store import AuditStore

PORTS = range(18320, 18340)
CLIENTS = 32
ACKNOWLEDGED_BEFORE_KILL = 120 if FULL else 40
RULES = [{"label": "R1", "kind": "rule", "text": "Rule R1: a loan above 50000 EUR needs a second approval."},
         {"label": "D1", "kind": "document", "text": "Document D1: the applicant asks for 60000 EUR."}]


class Deployment:
    """One audit database and the server runs over it (a new signing key per run: a key rotation)."""

    def __init__(self, root, db_url: str):
        from localist.model.tiny import make_tiny_checkpoint

        self.root, self.db_url = root, db_url
        self.model_dir = make_tiny_checkpoint(root / MODEL_NAME)
        with AuditStore(db_url) as store:
            self.admin_key, _ = store.create_key(tenant="admin", name="durability admin", admin=True, actor="test")
        self.runs = 0

    def signing_key(self, run: int):
        return self.root / f"keys-{run}" / "signing.pem"

    @contextlib.contextmanager
    def server(self):
        self.runs += 1
        (port,) = ports_in(PORTS)
        args = ["--model", str(self.model_dir), "--name", MODEL_NAME, "--db", self.db_url,
                "--signing-key", str(self.signing_key(self.runs)), "--sign-interval", "1", "--max-model-len", "512"]
        started = time.monotonic()
        with serving(args, port, self.root / f"server-{self.runs}.log", self.root / "home") as proc:
            self.ready_s = time.monotonic() - started
            self.base_url = f"http://127.0.0.1:{port}"
            yield proc

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.base_url, timeout=120,
                                 headers={"Authorization": f"Bearer {self.admin_key}"})


async def _load_until_killed(dep: Deployment, proc) -> tuple[list[str], int]:
    """CLIENTS clients send mixed requests; once enough are acknowledged the server gets SIGKILL.
    Returns the acknowledged ids (a 200 with the whole body, or a stream through `[DONE]`) and the count sent."""
    acked: list[str] = []
    sent = 0
    killed = asyncio.Event()

    async def one(client: httpx.AsyncClient, i: int) -> None:
        nonlocal sent
        body = {"model": MODEL_NAME, "max_tokens": 2 + i % 7, "locality": (i % 5) / 4, "blocks": RULES,
                "messages": [{"role": "user", "content": f"Request {i}: is the loan allowed?"}],
                "stream": i % 2 == 0}
        sent += 1
        if body["stream"]:
            rid, done = None, False
            async with client.stream("POST", "/v1/chat/completions", json=body) as r:
                assert r.status_code == 200, await r.aread()
                async for line in r.aiter_lines():
                    if line == "data: [DONE]":
                        done = True
                    elif line.startswith("data: "):
                        rid = json.loads(line[6:]).get("id", rid)
            if done:
                acked.append(rid)
        else:
            r = await client.post("/v1/chat/completions", json=body)
            assert r.status_code == 200, r.text
            acked.append(r.json()["id"])

    async def worker(w: int) -> None:
        async with dep.client() as client:
            i = w
            while not killed.is_set():
                try:
                    await one(client, i)
                except httpx.TransportError:
                    return  # the server is gone: whatever was in flight was never acknowledged
                i += CLIENTS

    async def killer() -> None:
        while len(acked) < ACKNOWLEDGED_BEFORE_KILL:
            await asyncio.sleep(0.05)
        children = psutil.Process(proc.pid).children(recursive=True)
        os.kill(proc.pid, signal.SIGKILL)
        killed.set()
        proc.wait()
        for child in children:  # the engine processes this server started
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()

    await asyncio.wait_for(asyncio.gather(killer(), *(worker(w) for w in range(CLIENTS))), timeout=300)
    return acked, sent


# PostgreSQL runs under `make reliability` (or with LOCALIST_TEST_DB=postgresql); SQLite always.
BACKENDS = ["sqlite", "postgresql"] if FULL or os.environ.get("LOCALIST_TEST_DB") == "postgresql" else ["sqlite"]


@pytest.fixture(scope="module", params=BACKENDS)
def deployment(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"durability-{request.param}")
    with contextlib.ExitStack() as stack:
        if request.param == "postgresql":
            from pg import fresh_database, postgres_server

            db_url = fresh_database(stack.enter_context(postgres_server()))
        else:
            db_url = f"sqlite:///{root / 'audit.db'}"
        yield Deployment(root, db_url)


@pytest.fixture(scope="module")
def after_kill(deployment):
    """Load, kill -9, restart: the acknowledged ids, with the server up again on the same database."""
    with deployment.server() as proc:
        acked, sent = asyncio.run(_load_until_killed(deployment, proc))
    with deployment.server():
        yield acked, sent


async def _get(dep, path, **kwargs):
    async with dep.client() as client:
        return await client.request(kwargs.pop("method", "GET"), path, **kwargs)


def test_every_acknowledged_response_survives_kill_9(deployment, after_kill):
    acked, sent = after_kill

    async def check():
        async with deployment.client() as client:
            missing = []
            for rid in acked:
                r = await client.get(f"/v1/audit/{rid}")
                if r.status_code != 200 or r.json()["status"] != "completed":
                    missing.append((rid, r.status_code))
            verify = (await client.post("/v1/audit/verify")).json()
            # the server answers requests again after the restart
            r = await client.post("/v1/chat/completions", json={"model": MODEL_NAME, "max_tokens": 1,
                                                                "messages": [{"role": "user", "content": "x"}]})
            return missing, verify, r.status_code

    missing, verify, status = asyncio.run(check())
    record("durability", backend=deployment.db_url.split(":")[0], clients=CLIENTS, requests_sent=sent,
           acknowledged=len(acked), records_lost=len(missing), chain_ok=verify["ok"],
           restart_s=round(deployment.ready_s, 1))
    assert len(set(acked)) == len(acked) >= ACKNOWLEDGED_BEFORE_KILL
    assert missing == []
    assert verify["ok"] and verify["first_broken"] is None, verify
    assert status == 200


def _snapshot(dep, seq: int) -> dict:
    tables = ("audit_record_blocks", "audit_payloads", "audit_records")
    return {t: [dict(row._mapping) for row in _sql(dep, f"SELECT * FROM {t} WHERE seq = :seq", seq=seq)]
            for t in tables}


def _sql(dep, statement: str, **params):
    return run_sql(dep.db_url, statement, **params)


def _restore(dep, snapshot: dict) -> None:
    for table in ("audit_records", "audit_payloads", "audit_record_blocks"):
        for row in snapshot[table]:
            cols = ", ".join(row)
            _sql(dep, f"INSERT INTO {table} ({cols}) VALUES ({', '.join(':' + c for c in row)})", **row)


def _request_seqs(dep) -> list[int]:
    return [s for (s,) in _sql(dep, "SELECT seq FROM audit_records WHERE kind = 'request' ORDER BY seq")]


def _verify(dep) -> dict:
    return asyncio.run(_get(dep, "/v1/audit/verify", method="POST")).json()


def test_verify_names_the_first_edited_reordered_or_deleted_record(deployment, after_kill):
    seqs = _request_seqs(deployment)
    a, b = seqs[len(seqs) // 3], seqs[len(seqs) // 3 + 1]
    detected = 0
    # an edit: one payload rewritten
    (body,) = _sql(deployment, "SELECT body FROM audit_payloads WHERE seq = :seq", seq=a)[0]
    forged = json.loads(body)
    forged["output"]["choices"][0]["text"] = "APPROVED"
    _sql(deployment, "UPDATE audit_payloads SET body = :body WHERE seq = :seq", body=json.dumps(forged), seq=a)
    try:
        broken = _verify(deployment)
        assert not broken["ok"] and broken["first_broken"]["seq"] == a, broken
        detected += 1
    finally:
        _sql(deployment, "UPDATE audit_payloads SET body = :body WHERE seq = :seq", body=body, seq=a)
    assert _verify(deployment)["ok"]
    # a reordering: two records' payloads swapped
    (body_b,) = _sql(deployment, "SELECT body FROM audit_payloads WHERE seq = :seq", seq=b)[0]
    _sql(deployment, "UPDATE audit_payloads SET body = :body WHERE seq = :seq", body=body_b, seq=a)
    _sql(deployment, "UPDATE audit_payloads SET body = :body WHERE seq = :seq", body=body, seq=b)
    try:
        broken = _verify(deployment)
        assert not broken["ok"] and broken["first_broken"]["seq"] == a, broken
        detected += 1
    finally:
        _sql(deployment, "UPDATE audit_payloads SET body = :body WHERE seq = :seq", body=body, seq=a)
        _sql(deployment, "UPDATE audit_payloads SET body = :body WHERE seq = :seq", body=body_b, seq=b)
    assert _verify(deployment)["ok"]
    # a deletion: one record gone with its payload and blocks
    snapshot = _snapshot(deployment, b)
    for table in ("audit_record_blocks", "audit_payloads", "audit_records"):
        _sql(deployment, f"DELETE FROM {table} WHERE seq = :seq", seq=b)
    try:
        broken = _verify(deployment)
        assert not broken["ok"] and broken["first_broken"]["seq"] in (b, b + 1), broken
        detected += 1
    finally:
        _restore(deployment, snapshot)
    assert _verify(deployment)["ok"]
    record("durability", tampering="edit, reorder, delete", chain_breaks_detected=detected, of=3)


def _localist(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "localist.clients.cli", *args], capture_output=True, text=True,
                          timeout=300)


def test_backup_restores_and_verifies(deployment, after_kill, tmp_path):
    """The commands of docs/server.md ("Backup and restore"), taken while the restarted server runs:
    SQLite with `localist store backup` (the online backup API), PostgreSQL with pg_dump / pg_restore
    into a new database; then `localist store verify` on the restored copy, with the signing keys."""
    if deployment.db_url.startswith("sqlite"):
        backup = tmp_path / "backup.db"
        done = _localist("store", "backup", "--db", deployment.db_url, str(backup))
        assert done.returncode == 0, done.stderr
        restored = tmp_path / "restored.db"
        shutil.copyfile(backup, restored)  # restore: the backup file put where the server's --db points
        restored_url = f"sqlite:///{restored}"
    else:
        from pg import PG_BIN, fresh_database

        libpq = deployment.db_url.replace("postgresql+psycopg://", "postgresql://")
        dump = tmp_path / "audit.dump"
        subprocess.run([str(PG_BIN / "pg_dump"), "--format=custom", f"--file={dump}", libpq], check=True,
                       capture_output=True)
        restored_url = fresh_database(deployment.db_url.rsplit("/", 1)[0] + "/postgres")
        subprocess.run([str(PG_BIN / "pg_restore"), "--no-owner", "--exit-on-error",
                        f"--dbname={restored_url.replace('postgresql+psycopg://', 'postgresql://')}", str(dump)],
                       check=True, capture_output=True)
    keys = [arg for run in (1, 2) for arg in ("--public-key", str(deployment.signing_key(run)))]
    done = _localist("store", "verify", "--db", restored_url, *keys)
    report = json.loads(done.stdout)
    assert done.returncode == 0 and report["ok"] and report["first_broken"] is None, (done.stdout, done.stderr)
    assert report["checked"] >= len(after_kill[0]) and report["signatures_valid"] >= 1, report
    # a restored copy that was changed is caught by the same command
    run_sql(restored_url, "UPDATE audit_payloads SET body = replace(body, 'Request', 'Reqvest') "
            "WHERE seq = (SELECT min(seq) FROM audit_records WHERE kind = 'request')")
    broken = _localist("store", "verify", "--db", restored_url, *keys)
    assert broken.returncode == 1 and not json.loads(broken.stdout)["ok"], broken.stdout
    record("durability", backup=deployment.db_url.split(":")[0],
           commands="localist store backup" if deployment.db_url.startswith("sqlite") else "pg_dump / pg_restore",
           records_restored=report["checked"], restored_chain_ok=report["ok"],
           signatures_valid=report["signatures_valid"])


def test_old_checkpoints_verify_with_the_old_key_after_rotation(deployment, after_kill):
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    old, new = (load_pem_private_key(deployment.signing_key(run).read_bytes(), None).public_key()
                for run in (1, 2))
    deadline = time.monotonic() + 30
    while True:  # the restarted server signs its head within a second or two
        with AuditStore(deployment.db_url) as store:
            both = store.verify(public_keys=[old, new])
            old_only = store.verify(public_keys=[old])
        if both.signatures_valid > old_only.signatures_valid or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert both.ok and both.signatures_untrusted == 0
    assert old_only.ok and old_only.signatures_valid >= 1  # the checkpoints signed before the rotation
    assert old_only.signatures_untrusted >= 1  # the new key's checkpoints are not trusted by the old key alone
