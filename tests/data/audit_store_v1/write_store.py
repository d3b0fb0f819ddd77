"""How ``audit.sqlite`` beside this file was written: ``python tests/data/audit_store_v1/write_store.py OUT``.

It was run once at commit b99e3b7, before the wire contract and the request service were redesigned,
so the store holds records in the shape that code wrote; ``tests/test_store_compat.py`` checks that
the code at hand still verifies, lists and renders them. Running it again writes a store of the code
at hand, which is not what the committed one is for.

A real ``localist serve`` (random tiny model, LOCALIST_FAULT_LABEL=FAULT, signing on) on port 18280
answers: a key create, chat at each audit level (summary with a target, per_token with n = 2, top
candidate as target), a completion with a span block and a per-layer dial at per_layer, a streamed
chat, a stream the client leaves (aborted), a request the worker fails (failed), a tenant's request,
a replay, a redaction, a retention purge of the tenant, and a key revoke.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from conftest import server_env  # noqa: E402

from localist.model.tiny import make_tiny_checkpoint  # noqa: E402
from localist.server.store import AuditStore, load_signing_key, public_key_pem  # noqa: E402

MODEL = "localist-test-tiny"
PORT = 18280
RULES = [{"label": "R1", "kind": "rule", "text": "Rule R1: A loan above 50000 EUR requires a second approval."},
         {"label": "R2", "kind": "rule", "text": "Rule R2: Claims filed more than 30 days late are not eligible."},
         {"label": "D1", "kind": "document", "text": "Document D1: requested loan 60000 EUR."}]
MESSAGES = [{"role": "user", "content": "Is a loan of 60000 EUR allowed with one approval?"}]


def fill(api: httpx.Client) -> None:
    def post(path: str, body: dict, key: str | None = None) -> dict:
        r = api.post(path, json=body, headers={"Authorization": f"Bearer {key}"} if key else None)
        assert r.status_code == 200, r.text
        return r.json()

    def chat(**fields) -> dict:
        return {"model": MODEL, "messages": MESSAGES, "temperature": 0, **fields}

    created = post("/v1/keys", {"tenant": "acme", "name": "acme app"})
    first = post("/v1/chat/completions", chat(max_tokens=6, locality="localist", blocks=RULES, target_block="R1"))
    post("/v1/chat/completions", chat(max_tokens=5, temperature=0.8, seed=3, n=2, locality=0.5, blocks=RULES,
                                      audit="per_token", ignore_eos=True))
    post("/v1/completions", {"model": MODEL, "prompt": "Rule R1 says: loans above", "max_tokens": 3, "temperature": 0,
                             "locality": [0.3, 0.9], "audit": "per_layer", "ignore_eos": True,
                             "blocks": [{"label": "P1", "kind": "rule", "start": 0, "end": 7}]})
    post("/v1/chat/completions", chat(max_tokens=4, locality="balanced", blocks=RULES, audit="per_token"))
    with api.stream("POST", "/v1/chat/completions", json=chat(max_tokens=4, stream=True, locality=0.9, blocks=RULES,
                                                               target_block="D1")) as r:
        r.read()
    with api.stream("POST", "/v1/chat/completions", json=chat(max_tokens=200, stream=True, ignore_eos=True,
                                                               locality=0.5, blocks=RULES)) as r:
        next(line for line in r.iter_lines() if line.startswith("data: ") and '"localist"' in line)
    faulty = [{"label": "FAULT", "kind": "rule", "text": "Rule F: this block makes the worker raise."}]
    assert api.post("/v1/chat/completions", json=chat(max_tokens=4, locality=0.5, blocks=faulty)).status_code == 500
    post("/v1/chat/completions", chat(max_tokens=3, locality="distributed"), key=created["token"])
    post(f"/v1/audit/{first['id']}/replay", {})
    personal = post("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "My name is Jane Roe."}],
                                             "max_tokens": 3, "temperature": 0})
    time.sleep(1.5)
    post(f"/v1/audit/{personal['id']}/redact", {"reason": "data subject request (fixture)"})
    post("/v1/audit/purge", {"before": time.time(), "tenant": "acme"})
    assert api.delete(f"/v1/keys/{created['key']['key_id']}").status_code == 200
    while not api.get("/v1/audit", params={"status": "aborted"}).json()["data"]:
        time.sleep(0.2)
    time.sleep(2.5)  # the signer signs the head every second


def main(out: Path) -> None:
    work = out / "work"
    model_dir = make_tiny_checkpoint(work / MODEL)
    db_url = f"sqlite:///{out / 'audit.sqlite'}"
    with AuditStore(db_url) as store:
        admin, _ = store.create_key(tenant="admin", name="fixture admin", admin=True, actor="fixture")
    signing_key = work / "signing.pem"
    cmd = [sys.executable, "-m", "localist.clients.cli", "serve", "--model", str(model_dir), "--name", MODEL,
           "--port", str(PORT), "--db", db_url, "--signing-key", str(signing_key), "--sign-interval", "1",
           "--max-model-len", "512"]
    env = server_env(work / "home") | {"LOCALIST_FAULT_LABEL": "FAULT"}
    with (work / "server.log").open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{PORT}"
    try:
        while True:
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                assert proc.poll() is None, "the server died during start-up"
            time.sleep(1)
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {admin}"}, timeout=120) as api:
            fill(api)
            print(json.dumps(api.post("/v1/audit/verify").json()))
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    (out / "signing-public-key.pem").write_bytes(public_key_pem(load_signing_key(signing_key)))
    shutil.copy(signing_key.with_suffix(".checkpoints.jsonl"), out / "checkpoints.jsonl")
    shutil.rmtree(work)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
