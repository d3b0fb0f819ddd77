"""Isolation under load: 64 concurrent requests (streaming and not, mixed dial values and block layouts)
against the session server, whose tiny model runs in float32. Every response's tokens equal those of the
same request served alone, and its block metrics agree within 1e-4.
"""
from __future__ import annotations

import asyncio
import json
import math

import httpx
from reliability_figures import FULL, record

CONCURRENT = 128 if FULL else 64
QUESTIONS = ["Does rule R1 apply to a loan of 60000 EUR?", "Which document names the applicant?",
             "Is a second approval needed?", "Summarise the rules."]
RULES = [{"label": "R1", "kind": "rule", "text": "Rule R1: A loan above 50000 EUR needs a second approval."},
         {"label": "R2", "kind": "rule", "text": "Rule R2: Loans to staff need the board's consent."},
         {"label": "D1", "kind": "document", "text": "Document D1: the applicant asks for 60000 EUR."}]
DIALS = [0.0, 0.3, 0.9, [0.2, 0.8], "balanced", "localist"]


def _layout(i: int) -> dict:
    question = QUESTIONS[i % len(QUESTIONS)]
    layouts = [
        {},
        {"blocks": RULES, "target_block": "R1"},
        {"blocks": RULES[::-1], "target_block": "D1"},
        {"blocks": RULES[:1]},
        {"blocks": [{"label": "Q", "message": 0, "start": 0, "end": 4}]},
    ]
    return {"messages": [{"role": "user", "content": question}], **layouts[i % len(layouts)]}


def _body(model: str, i: int) -> dict:
    return {"model": model, "max_tokens": 4 + i % 5, "temperature": 0, "locality": DIALS[i % len(DIALS)],
            "stream": i % 2 == 1, **_layout(i)}


async def _send(client: httpx.AsyncClient, body: dict) -> str:
    r = await client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    if body["stream"]:
        events = [e[len("data: "):] for e in r.text.strip().split("\n\n")]
        assert events[-1] == "[DONE]"
        return json.loads(events[-2])["id"]
    return r.json()["id"]


def _close(a, b, path="") -> list[str]:
    """Paths where two metric trees differ (numbers by more than 1e-4)."""
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{path}: keys {sorted(a)} != {sorted(b)}"]
        return [d for k in a for d in _close(a[k], b[k], f"{path}.{k}")]
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{path}: length {len(a)} != {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _close(x, y, f"{path}[{i}]")]
    if isinstance(a, float) or isinstance(b, float):
        ok = (a is None and b is None) or (math.isnan(a) and math.isnan(b)) or abs(a - b) <= 1e-4
        return [] if ok else [f"{path}: {a} != {b}"]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


async def _outcome(client: httpx.AsyncClient, rid: str) -> tuple[list, dict]:
    rec = (await client.get(f"/v1/audit/{rid}")).json()
    return [c["token_ids"] for c in rec["output"]["choices"]], rec["metrics"]["localist"]["choices"]


async def test_concurrent_requests_equal_the_same_requests_served_alone(localist_server):
    bodies = [_body(localist_server.model, i) for i in range(CONCURRENT)]
    async with httpx.AsyncClient(base_url=localist_server.base_url, headers=localist_server.headers(),
                                 timeout=300) as client:
        together = await asyncio.gather(*(_send(client, b) for b in bodies))
        alone = [await _send(client, b) for b in bodies]
        differences = []
        for i, (a, b) in enumerate(zip(together, alone)):
            (tokens_a, metrics_a), (tokens_b, metrics_b) = await _outcome(client, a), await _outcome(client, b)
            if tokens_a != tokens_b:
                differences.append(f"request {i}: tokens {tokens_a} != {tokens_b} ({bodies[i]})")
            differences += [f"request {i}{d}" for d in _close(metrics_a, metrics_b)]
    record("isolation under load", concurrent=CONCURRENT, streaming=sum(b["stream"] for b in bodies),
           token_mismatches=sum("tokens" in d for d in differences), metric_mismatches=len(differences))
    assert differences == [], differences[:10]
