"""Soak (only under `make reliability`): about 10 minutes of mixed traffic (streams, streams the client
aborts, plain requests, completions, refused requests) against a server of its own. After a 2-minute
warm-up the resident memory of the server and its engine processes grows by ≤ 50 MB in total and
≤ 2 MB/min; no request is lost (every answered or aborted request has its record); the engine ends idle
and its workers' statistics store empty.
``LOCALIST_SOAK_S`` and ``LOCALIST_SOAK_WARMUP_S`` shorten it for a trial run.
"""
from __future__ import annotations

import asyncio
import json
import os
import time

import httpx
import psutil
import pytest
import sqlalchemy as sa
from conftest import MODEL_NAME, ports_in, serving
from reliability_figures import FULL, record

from localist.server.store import AuditStore

pytestmark = pytest.mark.skipif(not FULL, reason="the soak runs under `make reliability` (LOCALIST_RELIABILITY_FULL=1)")

DURATION_S = float(os.environ.get("LOCALIST_SOAK_S", "600"))
WARMUP_S = float(os.environ.get("LOCALIST_SOAK_WARMUP_S", "120"))
WORKERS = 8
PORTS = range(18340, 18360)
RULES = [{"label": "R1", "kind": "rule", "text": "Rule R1: A loan above 50000 EUR needs a second approval."}]


def _rss_mb(procs: list[psutil.Process]) -> float:
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 2**20


def _slope_per_min(samples: list[tuple[float, float]]) -> float:
    n = len(samples)
    mt = sum(t for t, _ in samples) / n
    mm = sum(m for _, m in samples) / n
    var = sum((t - mt) ** 2 for t, _ in samples)
    return 60 * sum((t - mt) * (m - mm) for t, m in samples) / var if var else 0.0


async def _traffic(base: str, key: str, deadline: float) -> dict:
    answered: list[str] = []
    aborted: list[str] = []
    counts = {"sent": 0, "2xx": 0, "4xx": 0, "5xx": 0, "aborted": 0, "in_band_errors": 0}

    async def one(client: httpx.AsyncClient, i: int) -> None:
        kind = i % 5
        counts["sent"] += 1
        body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": f"Request {i}: allowed?"}],
                "max_tokens": 4 + i % 12, "locality": (i % 4) / 3, "blocks": RULES}
        if kind in (0, 1):  # a stream, read to the end or dropped after its first event
            async with client.stream("POST", "/v1/chat/completions",
                                     json={**body, "stream": True, "max_tokens": 40, "ignore_eos": True}) as r:
                counts[f"{r.status_code // 100}xx"] += 1
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        event = json.loads(line[6:])
                        if "error" in event:  # a failure after the status line: a 5xx in-band
                            counts["in_band_errors"] += 1
                            return
                        rid = event["id"]
                        if kind == 1:
                            aborted.append(rid)
                            counts["aborted"] += 1
                            return
                    if line == "data: [DONE]":
                        answered.append(rid)
        elif kind == 2:
            r = await client.post("/v1/completions", json={"model": MODEL_NAME, "prompt": "Rule R1 says",
                                                           "max_tokens": 6})
            counts[f"{r.status_code // 100}xx"] += 1
            answered.append(r.json()["id"])
        elif kind == 3:
            r = await client.post("/v1/chat/completions", json=body)
            counts[f"{r.status_code // 100}xx"] += 1
            answered.append(r.json()["id"])
        else:
            r = await client.post("/v1/chat/completions", json={**body, "locality": 7})
            counts[f"{r.status_code // 100}xx"] += 1

    async def worker(w: int) -> None:
        async with httpx.AsyncClient(base_url=base, timeout=120, headers={"Authorization": f"Bearer {key}"}) as client:
            i = w
            while time.monotonic() < deadline:
                await one(client, i)
                i += WORKERS

    await asyncio.gather(*(worker(w) for w in range(WORKERS)))
    return {"answered": answered, "aborted": aborted, "counts": counts}


def test_soak(tmp_path):
    from localist.model.tiny import make_tiny_checkpoint

    model_dir = make_tiny_checkpoint(tmp_path / MODEL_NAME)
    db_url = f"sqlite:///{tmp_path / 'audit.db'}"
    with AuditStore(db_url) as store:
        key, _ = store.create_key(tenant="soak", name="soak", actor="test")
    (port,) = ports_in(PORTS)
    base = f"http://127.0.0.1:{port}"
    args = ["--model", str(model_dir), "--name", MODEL_NAME, "--db", db_url, "--signing-key",
            str(tmp_path / "signing.pem"), "--sign-interval", "5", "--max-model-len", "512"]
    with serving(args, port, tmp_path / "server.log", tmp_path / "home") as proc:
        tree = psutil.Process(proc.pid)
        start = time.monotonic()
        samples: list[tuple[float, float]] = []  # server and engine processes together
        parts: dict[str, list[tuple[float, float]]] = {"server": [], "engine": []}  # to tell where it grows

        async def run() -> dict:
            traffic = asyncio.create_task(_traffic(base, key, start + DURATION_S))
            while not traffic.done():
                t, engine = time.monotonic() - start, tree.children(recursive=True)
                parts["server"].append((t, _rss_mb([tree])))
                parts["engine"].append((t, _rss_mb(engine)))
                samples.append((t, parts["server"][-1][1] + parts["engine"][-1][1]))
                await asyncio.sleep(10)
            return await traffic

        result = asyncio.run(run())
        time.sleep(3)  # aborted requests are stored once the engine lets go of them
        health = httpx.get(base + "/health", timeout=30).json()
    after = [s for s in samples if s[0] >= WARMUP_S]
    growth = after[-1][1] - after[0][1]
    slope = _slope_per_min(after)
    engine = sa.create_engine(db_url)
    with engine.connect() as conn:
        stored = {r: s for r, s in conn.execute(sa.text("SELECT record_id, status FROM audit_records"))}
    engine.dispose()
    lost = [rid for rid in result["answered"] + result["aborted"] if rid not in stored]
    counts = result["counts"]
    record("soak", minutes=round(DURATION_S / 60, 1), **counts, records_lost=len(lost),
           rss_start_mb=round(after[0][1]), rss_end_mb=round(after[-1][1]), growth_mb=round(growth, 1),
           drift_mb_per_min=round(slope, 2),
           **{f"{part}_drift_mb_per_min": round(_slope_per_min([x for x in xs if x[0] >= WARMUP_S]), 2)
              for part, xs in parts.items()},
           stats_held_at_end=health["engine_stats_held"])
    assert counts["5xx"] == 0 and counts["in_band_errors"] == 0 and lost == []
    assert health["engine_requests"] == 0
    assert health["engine_stats_held"] == 0  # every request, aborted ones too, freed its worker statistics
    assert growth <= 50 and slope <= 2, (growth, slope, samples)
