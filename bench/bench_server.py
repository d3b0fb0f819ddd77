"""End-to-end server cost: what the front door adds on top of the engine (HTTP, metrics, audit write).

Starts ``localist serve`` on a tiny model (or --model DIR) with a fresh audit store, then measures for
concurrent chat requests: latency, output tokens/s, time to first token when streaming, and how long
the audit write of each request took (received → stored, minus generation). Writes JSON and a line
of Markdown to bench/results/.

    .venv/bin/python bench/bench_server.py --concurrency 8 --tokens 64 --requests 32
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def start(model_dir: Path, port: int, home: Path) -> subprocess.Popen:
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "LOCALIST_HOME": str(home)}
    cmd = [sys.executable, "-m", "localist.clients.cli", "serve", "--model", str(model_dir), "--name", "bench",
           "--port", str(port), "--db", f"sqlite:///{home / 'audit.db'}", "--no-signing", "--max-model-len", "1024"]
    proc = subprocess.Popen(cmd, stdout=(home / "server.log").open("wb"), stderr=subprocess.STDOUT, env=env)
    for _ in range(600):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise SystemExit((home / "server.log").read_text()[-4000:])
        time.sleep(1)
    raise SystemExit("server did not start")


async def one(client: httpx.AsyncClient, body: dict) -> dict:
    t0 = time.perf_counter()
    if not body.get("stream"):
        r = await client.post("/v1/chat/completions", json=body)
        r.raise_for_status()
        return {"latency": time.perf_counter() - t0, "tokens": r.json()["usage"]["completion_tokens"],
                "id": r.json()["id"], "ttft": None}
    ttft, tokens, rid = None, 0, None
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                event = json.loads(line[6:])
                rid = event["id"]
                for c in event["choices"]:
                    n = len((c.get("localist") or {}).get("tokens", []))
                    if n and ttft is None:
                        ttft = time.perf_counter() - t0
                    tokens += n
    return {"latency": time.perf_counter() - t0, "tokens": tokens, "id": rid, "ttft": ttft}


async def run(base: str, args, stream: bool) -> dict:
    body = {"model": "bench", "max_tokens": args.tokens, "ignore_eos": True, "temperature": 1.0, "stream": stream,
            "locality": args.rho, "audit": args.audit,
            "messages": [{"role": "user", "content": "Which rule applies to a loan of 60000 EUR? " * 4}],
            "blocks": [{"label": f"R{i}", "kind": "rule", "text": f"Rule R{i}: a rule about case {i}."}
                       for i in range(6)]}
    sem = asyncio.Semaphore(args.concurrency)
    async with httpx.AsyncClient(base_url=base, timeout=600) as client:
        async def limited():
            async with sem:
                return await one(client, body)
        t0 = time.perf_counter()
        results = await asyncio.gather(*(limited() for _ in range(args.requests)))
        wall = time.perf_counter() - t0
        store_ms = []
        for r in results:
            ts = (await client.get(f"/v1/audit/{r['id']}")).json()
            created = ts["created_us"] / 1e6
            store_ms.append((created - ts["timestamps"]["finished"]) * 1000)
    lat = [r["latency"] for r in results]
    out = {"stream": stream, "requests": args.requests, "concurrency": args.concurrency, "tokens": args.tokens,
           "rho": args.rho, "audit": args.audit, "wall_s": wall,
           "output_tok_per_s": sum(r["tokens"] for r in results) / wall,
           "latency_p50_s": statistics.median(lat), "latency_max_s": max(lat),
           "record_committed_after_finish_ms_p50": statistics.median(store_ms)}
    if stream:
        out["ttft_p50_s"] = statistics.median(r["ttft"] for r in results if r["ttft"] is not None)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path)
    ap.add_argument("--port", type=int, default=8471)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rho", type=float, default=0.5)
    ap.add_argument("--audit", default="summary")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        model_dir = args.model
        if model_dir is None:
            from localist.model.tiny import make_tiny_checkpoint
            model_dir = make_tiny_checkpoint(home / "tiny")
        proc = start(model_dir, args.port, home)
        try:
            base = f"http://127.0.0.1:{args.port}"
            results = [asyncio.run(run(base, args, False)), asyncio.run(run(base, args, True))]
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    results_dir = ROOT / "bench" / "results"
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / "server_quick.json").write_text(json.dumps(
        {"load_average": os.getloadavg(), "model": str(args.model or "tiny random (2 layers, d=128)"),
         "results": results}, indent=2))
    for r in results:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
