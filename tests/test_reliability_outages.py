"""Outages, fail closed, against a real server of its own: the audit database goes away under load and
comes back, and the server recovers without a restart.

PostgreSQL (tests/pg.py) is stopped with ``pg_ctl stop -m fast`` mid-traffic and started again; SQLite
sits on a small tmpfs mounted by the test, which a filler file fills to the last byte and then frees.
While the store is unusable every new generation is answered 503 with Retry-After and `/health` says
why; a request in flight gets no answer that is not recorded (a non-streaming one a 503, a stream an
in-band `store_unavailable` error and no `[DONE]`). Once the database is back the same server process
answers 200 again, every acknowledged response (a 200 body, a stream through its final `localist`
event and `[DONE]`) has its completed record, and the chain verifies.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from conftest import MODEL_NAME, free_port, serving
from reliability_figures import FULL, record

from localist.server.store import AuditStore

CLIENTS = 8
ACKED_BEFORE = 40 if FULL else 16  # acknowledged responses before the outage, and again after it
OUTAGE_MIN_S = 4.0  # the database stays away at least this long, and until /health has said so
TMPFS_SIZE = "24m"
RULES = [{"label": "R1", "kind": "rule", "text": "Rule R1: a loan above 50000 EUR needs a second approval."},
         {"label": "D1", "kind": "document", "text": "Document D1: the applicant asks for 60000 EUR."}]


class Traffic:
    """CLIENTS clients sending mixed requests (half streaming) until stopped; what each got, with when it
    was sent."""

    def __init__(self, base_url: str, key: str):
        self.base_url, self.key = base_url, key
        self.acked: list[str] = []  # ids of acknowledged responses
        self.refused: list[tuple[float, float]] = []  # (sent at, Retry-After) of each 503
        self.in_band: list[tuple[float, dict]] = []  # (sent at, error) of streams ended by an error event
        self.unexpected: list[tuple[int, str]] = []  # anything else
        self.answered: list[tuple[float, str]] = []  # (sent at, outcome): "ack", "503", "in-band"
        self.stop = asyncio.Event()

    async def one(self, client: httpx.AsyncClient, i: int) -> None:
        body = {"model": MODEL_NAME, "max_tokens": 2 + i % 6, "locality": (i % 5) / 4, "blocks": RULES,
                "messages": [{"role": "user", "content": f"Request {i}: is the loan allowed?"}],
                "stream": i % 2 == 0}
        sent = time.monotonic()
        if body["stream"]:
            async with client.stream("POST", "/v1/chat/completions", json=body) as r:
                if r.status_code != 200:
                    await r.aread()
                    return self._refused(sent, r)
                rid, final, done, error = None, False, False, None
                async for line in r.aiter_lines():
                    if line == "data: [DONE]":
                        done = True
                    elif line.startswith("data: "):
                        event = json.loads(line[6:])
                        if "error" in event:
                            error = event["error"]
                        else:
                            rid = event.get("id", rid)
                            final = final or event.get("localist") is not None
            if done and final and error is None:
                self.acked.append(rid)
                self.answered.append((sent, "ack"))
            elif error is not None and not done and error.get("code") == "store_unavailable":
                self.in_band.append((sent, error))
                self.answered.append((sent, "in-band"))
            else:
                self.unexpected.append((200, f"stream ended: done={done} final={final} error={error}"))
        else:
            r = await client.post("/v1/chat/completions", json=body)
            if r.status_code == 200:
                self.acked.append(r.json()["id"])
                self.answered.append((sent, "ack"))
            else:
                self._refused(sent, r)

    def _refused(self, sent: float, r: httpx.Response) -> None:
        if r.status_code == 503 and r.json()["error"]["code"] == "store_unavailable" and "retry-after" in r.headers:
            self.refused.append((sent, float(r.headers["retry-after"])))
            self.answered.append((sent, "503"))
        else:
            self.unexpected.append((r.status_code, r.text[:300]))

    async def worker(self, w: int) -> None:
        async with httpx.AsyncClient(base_url=self.base_url, timeout=120,
                                     headers={"Authorization": f"Bearer {self.key}"}) as client:
            i = w
            while not self.stop.is_set():
                n = len(self.answered)
                await self.one(client, i)
                if len(self.answered) == n or self.answered[-1][1] != "ack":
                    await asyncio.sleep(0.25)  # a polite client waits before it tries again
                i += CLIENTS


async def _health(base_url: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
        return await client.get("/health")


async def _outage(base_url: str, key: str, break_db, restore_db) -> dict:
    """Traffic; after ACKED_BEFORE acknowledged responses ``break_db()``; once /health has said so and
    OUTAGE_MIN_S passed, ``restore_db()``; then traffic until ACKED_BEFORE more are acknowledged."""
    traffic = Traffic(base_url, key)
    workers = [asyncio.create_task(traffic.worker(w)) for w in range(CLIENTS)]
    figures: dict = {}
    try:
        while len(traffic.acked) < ACKED_BEFORE:
            await asyncio.sleep(0.05)
        acked_before = len(traffic.acked)
        broken_at = time.monotonic()
        await asyncio.to_thread(break_db)
        health = None
        while True:  # the store notices at the first write or read that fails
            r = await _health(base_url)
            if r.status_code == 503 and health is None:
                health = (r, time.monotonic())
            if health is not None and time.monotonic() - broken_at >= OUTAGE_MIN_S:
                break
            await asyncio.sleep(0.2)
        figures["health_during"] = health[0].json()
        figures["health_retry_after"] = health[0].headers.get("retry-after")
        figures["detected_s"] = health[1] - broken_at
        figures["down_from"] = health[1]  # from here until the restore every new request must be refused
        await asyncio.to_thread(restore_db)
        restored_at = time.monotonic()
        figures["down_until"] = restored_at
        while (await _health(base_url)).status_code != 200:
            await asyncio.sleep(0.1)
        figures["recovery_s"] = time.monotonic() - restored_at
        while len(traffic.acked) < acked_before + ACKED_BEFORE:
            await asyncio.sleep(0.05)
        figures["first_ack_after_restore_s"] = min(t for t, outcome in traffic.answered
                                                   if outcome == "ack" and t >= restored_at) - restored_at
        figures["outage_s"] = restored_at - broken_at
    finally:
        traffic.stop.set()
        await asyncio.wait_for(asyncio.gather(*workers), timeout=300)
    figures["traffic"] = traffic
    return figures


class Deployment:
    def __init__(self, root: Path, db_url: str):
        from localist.model.tiny import make_tiny_checkpoint

        self.root, self.db_url = root, db_url
        self.model_dir = make_tiny_checkpoint(root / MODEL_NAME)
        with AuditStore(db_url) as store:
            self.key, _ = store.create_key(tenant="admin", name="outage admin", admin=True, actor="test")

    def run(self, backend: str, break_db, restore_db) -> None:
        port = free_port()
        base_url = f"http://127.0.0.1:{port}"
        args = ["--model", str(self.model_dir), "--name", MODEL_NAME, "--db", self.db_url,
                "--signing-key", str(self.root / "keys" / "signing.pem"), "--sign-interval", "1",
                "--max-model-len", "512"]
        with serving(args, port, self.root / "server.log", self.root / "home") as proc:
            figures = asyncio.run(_outage(base_url, self.key, break_db, restore_db))
            assert proc.poll() is None, "the server exited"  # recovered without a restart
            missing, verify = asyncio.run(_check_records(base_url, self.key, figures["traffic"].acked))
        traffic: Traffic = figures["traffic"]
        during = [outcome for t, outcome in traffic.answered if figures["down_from"] <= t < figures["down_until"]]
        record("outages", backend=backend, outage=("PostgreSQL stopped (pg_ctl stop -m fast)" if backend == "postgresql"
                                                   else f"disk full (tmpfs {TMPFS_SIZE})"),
               acknowledged=len(traffic.acked), refused_503=len(traffic.refused), in_band_errors=len(traffic.in_band),
               other_answers=len(traffic.unexpected), records_lost=len(missing), chain_ok=verify["ok"],
               detected_s=round(figures["detected_s"], 2), outage_s=round(figures["outage_s"], 1),
               recovery_s=round(figures["recovery_s"], 2),
               first_200_after_s=round(figures["first_ack_after_restore_s"], 2))
        health = figures["health_during"]
        assert health["status"] == "degraded" and health["audit_store"] == "unavailable", health
        assert health["audit_store_down_since"] is not None and health["audit_store_last_failure"], health
        assert figures["health_retry_after"] is not None
        assert traffic.unexpected == [], traffic.unexpected[:5]
        assert traffic.refused and all(retry >= 1 for _, retry in traffic.refused)
        # fail closed: every request sent while /health said the store was down got a 503, nothing else
        assert during and set(during) == {"503"}, during
        assert missing == [], missing[:5]
        assert verify["ok"] and verify["first_broken"] is None, verify


async def _check_records(base_url: str, key: str, acked: list[str]) -> tuple[list, dict]:
    async with httpx.AsyncClient(base_url=base_url, timeout=120, headers={"Authorization": f"Bearer {key}"}) as client:
        missing = []
        for rid in acked:
            r = await client.get(f"/v1/audit/{rid}")
            if r.status_code != 200 or r.json()["status"] != "completed":
                missing.append((rid, r.status_code))
        return missing, (await client.post("/v1/audit/verify")).json()


def test_postgresql_stopped_under_load(tmp_path):
    from pg import fresh_database, postgres_instance

    with postgres_instance() as pg:
        deployment = Deployment(tmp_path, fresh_database(pg.url))
        deployment.run("postgresql", pg.stop, pg.start)


@contextlib.contextmanager
def _tmpfs(path: Path, size: str):
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True,
                   capture_output=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "--lazy", str(path)], check=True, capture_output=True)


def _fill(disk: Path) -> None:
    """Write a filler file until the disk is full (ENOSPC), unbuffered: every byte that fits is written."""
    fd = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        chunk = b"\0" * (1 << 16)
        while True:
            try:
                if os.write(fd, chunk) == 0:
                    break
            except OSError as e:
                if e.errno != 28:  # ENOSPC
                    raise
                if len(chunk) == 1:
                    break
                chunk = chunk[:len(chunk) // 2]  # fill the last pages too
    finally:
        os.close(fd)


def test_sqlite_disk_full_under_load(tmp_path):
    if os.geteuid() != 0:
        pytest.fail("mounting the test's tmpfs needs root (this machine kind runs the tests as root)")
    with _tmpfs(tmp_path / "disk", TMPFS_SIZE) as disk:
        deployment = Deployment(tmp_path, f"sqlite:///{disk / 'audit.db'}")
        deployment.run("sqlite", lambda: _fill(disk), lambda: (disk / "filler").unlink())


def test_store_outage_ends_by_itself(tmp_path):
    """The store alone: a write on a full disk raises StoreUnavailable and starts an outage (refused
    before any work, said in `availability`); freeing the disk ends it within a few probes; the chain
    holds exactly the records that were committed."""
    from test_store import make_record

    from localist.server.store import StoreUnavailable

    if os.geteuid() != 0:
        pytest.fail("mounting the test's tmpfs needs root (this machine kind runs the tests as root)")
    with _tmpfs(tmp_path / "disk", "4m") as disk, AuditStore(f"sqlite:///{disk / 'audit.db'}") as store:
        store.record(make_record(0))
        _fill(disk)
        committed = 1
        with pytest.raises(StoreUnavailable, match="database or disk is full"):
            for i in range(1, 10_000):  # pages left in the database file take a few records
                store.record({**make_record(i), "output": {"text": "x" * 4000}})
                committed += 1
        outage = store.availability.outage
        assert outage is not None and "full" in outage.reason
        with pytest.raises(StoreUnavailable):
            store.ensure_available()
        time.sleep(2.5)  # probes meanwhile fail: still out
        assert store.availability.outage is not None
        (disk / "filler").unlink()
        deadline = time.monotonic() + 10
        while store.availability.outage is not None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert store.availability.outage is None and store.availability.last_outage_s >= 2.5
        store.ensure_available()
        store.record(make_record(10_000))
        report = store.verify()
        assert report.ok and report.checked == committed + 1
