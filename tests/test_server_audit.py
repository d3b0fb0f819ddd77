"""Audit endpoints, tenants, keys (CLI), limits and operations against the real server."""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import httpx
import pytest

from conftest import server_env

MSG = [{"role": "user", "content": "Does rule R1 apply to a loan of 60000 EUR?"}]
RULES = [{"label": "R1", "kind": "rule", "text": "Rule R1: A loan above 50000 EUR needs a second approval."},
         {"label": "D1", "kind": "document", "text": "Document D1: the applicant requests 60000 EUR."}]


async def chat(client, server, **extra) -> dict:
    r = await client.post("/v1/chat/completions", json={"model": server.model, "messages": MSG, "max_tokens": 3,
                                                          **extra})
    assert r.status_code == 200, r.text
    return r.json()


def keys_cli(server, *args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "localist.clients.cli", "keys", *args, "--db", server.db_url],
                         capture_output=True, text=True, env=server_env(server.home), timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


async def test_record_holds_request_output_metrics_and_replay(localist_server, api):
    body = await chat(api, localist_server, locality=0.7, blocks=RULES, target_block="D1", seed=5, audit="per_token")
    r = await api.get(f"/v1/audit/{body['id']}")
    assert r.status_code == 200
    rec = r.json()
    models = (await api.get("/v1/models")).json()["data"][0]
    assert rec["status"] == "completed" and rec["kind"] == "request" and rec["tenant"] == "admin"
    assert rec["model"] == localist_server.model and rec["rho_min"] == rec["rho_max"] == 0.7
    assert sorted(rec["blocks"]) == sorted(b["label"] for b in body["localist"]["blocks"])
    assert rec["fidelity"] == pytest.approx(body["localist"]["choices"][0]["pointer_fidelity"])
    assert rec["request"]["weights_hash"] == models["weights_sha256"]
    assert rec["request"]["params"]["seed"] == 5 and rec["request"]["target_block"] == 3
    assert rec["output"]["choices"][0]["text"] == body["choices"][0]["message"]["content"]
    assert rec["metrics"]["localist"] == body["localist"]
    replay = rec["replay"]
    assert len(replay["prompt_token_ids"]) == body["usage"]["prompt_tokens"]
    assert [s[:2] for s in replay["block_spans"]] == [[b["start"], b["end"]] for b in body["localist"]["blocks"]]
    assert replay["seed"] == 5 and len(replay["tokenizer_hash"]) == 64 and len(replay["chat_template_hash"]) == 64
    assert {"vllm", "torch", "transformers", "localist"} <= set(replay["versions"])
    ts = rec["timestamps"]
    assert ts["received"] <= ts["first_token"] <= ts["finished"]
    assert len(rec["hashes"]["chain"]) == 64


async def test_replay_reproduces_the_output_and_metrics(localist_server, api, tenant_api):
    """An auditor re-runs a stored request (token ids, block table, per-layer dial, seeds): same tokens and
    the same attribution; the replay is audited too."""
    body = await chat(tenant_api, localist_server, locality=[0.3, 0.8], blocks=RULES, target_block="R1",
                      temperature=1.0, seed=21, n=2, max_tokens=6)
    r = await tenant_api.post(f"/v1/audit/{body['id']}/replay")
    assert r.status_code == 200, r.text
    rep = r.json()
    assert rep["matches"] and [c["matches"] for c in rep["choices"]] == [True, True]
    assert [c["replay_token_ids"] for c in rep["choices"]] == \
        [(await tenant_api.get(f"/v1/audit/{body['id']}")).json()["output"]["choices"][i]["token_ids"] for i in (0, 1)]
    for a, b in zip(rep["localist"]["choices"], body["localist"]["choices"]):
        assert a["attribution"] == pytest.approx(b["attribution"], abs=1e-5)
        assert a["pointer_fidelity"] == pytest.approx(b["pointer_fidelity"], abs=1e-5)
    assert rep["localist"]["locality"]["rho"] == [0.3, 0.8]
    again = (await tenant_api.get(f"/v1/audit/{rep['replay_id']}")).json()
    assert again["request"]["replay_of"] == body["id"] and again["tenant"] == "acme"
    assert (await api.post("/v1/audit/no-such-id/replay")).status_code == 404
    other = (await chat(api, localist_server))["id"]
    assert (await tenant_api.post(f"/v1/audit/{other}/replay")).status_code == 404  # another tenant's


async def test_list_filters_and_pagination(localist_server, api):
    t0 = time.time()
    await asyncio.sleep(0.01)
    ids = []
    for rho in (0.1, 0.4, 0.8):
        ids.append((await chat(api, localist_server, locality=rho, blocks=RULES, target_block="R1"))["id"])
    t1 = time.time()

    async def listed(**params):
        r = await api.get("/v1/audit", params=params)
        assert r.status_code == 200, r.text
        return [x["id"] for x in r.json()["data"]]

    assert await listed(since=t0, until=t1) == ids[::-1]
    assert await listed(since=t0, rho_min=0.3, rho_max=0.5) == [ids[1]]
    assert set(await listed(since=t0, block="R1")) == set(ids)
    assert await listed(since=t0, block="no-such-block") == []
    assert set(await listed(since=t0, model=localist_server.model)) == set(ids)
    assert await listed(since=t0, model="other") == []
    iso = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(t1 + 5))
    assert await listed(since=iso) == []
    fids = {x["id"]: x["fidelity"] for x in (await api.get("/v1/audit", params={"since": t0})).json()["data"]}
    lo = min(fids.values())
    assert set(await listed(since=t0, fidelity_min=lo)) == set(ids)
    assert await listed(since=t0, fidelity_max=lo - 1e-9) == [] if lo > 0 else True
    page1 = (await api.get("/v1/audit", params={"since": t0, "limit": 2})).json()
    assert page1["has_more"] and len(page1["data"]) == 2
    page2 = (await api.get("/v1/audit", params={"since": t0, "limit": 2, "cursor": page1["next_cursor"]})).json()
    assert [x["id"] for x in page1["data"] + page2["data"]] == ids[::-1] and not page2["has_more"]
    bad = await api.get("/v1/audit", params={"rho_min": 2})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "rho_min"
    bad = await api.get("/v1/audit", params={"since": "yesterday"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "since"
    bad = await api.get("/v1/audit", params={"cursor": "garbage"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "cursor"


async def test_tenant_sees_only_its_own_records(localist_server, api, tenant_api):
    mine = (await chat(tenant_api, localist_server))["id"]
    admins = (await chat(api, localist_server))["id"]
    assert (await tenant_api.get(f"/v1/audit/{mine}")).json()["tenant"] == "acme"
    r = await tenant_api.get(f"/v1/audit/{admins}")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    assert (await tenant_api.get(f"/v1/audit/{admins}/report")).status_code == 404
    listed = (await tenant_api.get("/v1/audit", params={"limit": 1000})).json()["data"]
    assert mine in [x["id"] for x in listed] and {x["tenant"] for x in listed} == {"acme"}
    assert (await api.get(f"/v1/audit/{mine}")).status_code == 200  # the admin sees every tenant
    assert (await tenant_api.get("/v1/audit", params={"kind": "key"})).status_code == 403


async def test_verify_signatures_tamper_and_restore(localist_server, api):
    body = await chat(api, localist_server)
    seq = (await api.get(f"/v1/audit/{body['id']}")).json()["seq"]
    for _ in range(50):  # the server signs the head every second
        v = (await api.post("/v1/audit/verify")).json()
        if v["signed_seq"] is not None and v["signed_seq"] >= seq:
            break
        await asyncio.sleep(0.2)
    assert v["ok"] and v["first_broken"] is None and v["signed_seq"] >= seq and v["signatures_valid"] >= 1
    assert v["checked"] == v["head_seq"] >= seq
    (original,) = localist_server.sql("SELECT body FROM audit_payloads WHERE seq = :seq", seq=seq)[0]
    forged = json.loads(original)
    forged["output"]["choices"][0]["text"] = "APPROVED"
    localist_server.sql("UPDATE audit_payloads SET body = :body WHERE seq = :seq", body=json.dumps(forged), seq=seq)
    try:
        broken = (await api.post("/v1/audit/verify")).json()
        assert not broken["ok"] and broken["first_broken"]["seq"] == seq
        assert broken["first_broken"]["record_id"] == body["id"] and "payload" in broken["first_broken"]["reason"]
        report = (await api.get(f"/v1/audit/{body['id']}/report", params={"format": "html"})).text
        assert "verification failed" in report and "payload altered" in report
    finally:
        localist_server.sql("UPDATE audit_payloads SET body = :body WHERE seq = :seq", body=original, seq=seq)
    assert (await api.post("/v1/audit/verify")).json()["ok"]


async def test_redaction_keeps_the_chain_valid(localist_server, tenant_api, api):
    rid = (await chat(tenant_api, localist_server))["id"]
    r = await tenant_api.post(f"/v1/audit/{rid}/redact", json={"reason": "data subject request #12"})
    assert r.status_code == 200, r.text
    rec = (await tenant_api.get(f"/v1/audit/{rid}")).json()
    assert rec["redacted"] and rec["request"] is None and rec["output"] is None and rec["replay"] is None
    assert (await tenant_api.post(f"/v1/audit/{rid}/redact", json={"reason": "again"})).status_code == 409
    v = (await api.post("/v1/audit/verify")).json()
    assert v["ok"] and v["redacted"] >= 1
    redactions = (await api.get("/v1/audit", params={"kind": "redaction", "limit": 1000})).json()["data"]
    assert any(x["tenant"] == "acme" for x in redactions)
    html = (await tenant_api.get(f"/v1/audit/{rid}/report", params={"format": "html"})).text
    assert "erased" in html
    r = await tenant_api.post(f"/v1/audit/{rid}/replay")
    assert r.status_code == 409 and r.json()["error"]["code"] == "not_replayable"


async def test_keys_cli_rate_and_concurrency_limits(localist_server, api):
    created = json.loads(keys_cli(localist_server, "create", "--tenant", "limited", "--rate-limit", "2", "--json"))
    token, kid = created["token"], created["key_id"]
    assert created["rate_limit_per_min"] == 2 and not created["admin"]
    assert kid in keys_cli(localist_server, "list")
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=localist_server.base_url, headers=headers, timeout=60) as client:
        assert (await client.get("/v1/models")).status_code == 200
        assert (await client.get("/v1/models")).status_code == 200
        r = await client.get("/v1/models")
        assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
        assert 1 <= int(r.headers["retry-after"]) <= 60
    # key management is audited
    key_events = (await api.get("/v1/audit", params={"kind": "key", "limit": 1000})).json()["data"]
    assert any(e["id"] == f"key-create-{kid}" for e in key_events)
    keys_cli(localist_server, "revoke", kid)
    async with httpx.AsyncClient(base_url=localist_server.base_url, headers=headers) as client:
        assert (await client.get("/v1/models")).status_code == 401
    assert "revoked" in keys_cli(localist_server, "list", "--all")
    key_events = (await api.get("/v1/audit", params={"kind": "key", "limit": 1000})).json()["data"]
    assert any(e["id"] == f"key-revoke-{kid}" for e in key_events)

    one = json.loads(keys_cli(localist_server, "create", "--tenant", "solo", "--max-concurrency", "1", "--json"))
    headers = {"Authorization": f"Bearer {one['token']}"}
    body = {"model": localist_server.model, "messages": MSG, "max_tokens": 200, "ignore_eos": True, "stream": True}
    async with httpx.AsyncClient(base_url=localist_server.base_url, headers=headers, timeout=120) as client:
        async with client.stream("POST", "/v1/chat/completions", json=body) as first:
            assert first.status_code == 200
            second = await client.post("/v1/chat/completions", json={**body, "stream": False, "max_tokens": 2})
            assert second.status_code == 429 and second.headers["retry-after"] == "1"
            async for _ in first.aiter_lines():
                pass
        again = await client.post("/v1/chat/completions", json={**body, "stream": False, "max_tokens": 2})
        assert again.status_code == 200  # the slot was released when the stream ended


async def test_health_metrics_and_request_ids(localist_server, api):
    h = (await api.get("/health")).json()
    assert h == {"status": "ok", "model": localist_server.model, "engine": "running", "engine_requests": 0,
                 "engine_stats_held": 0, "engine_restarts": 0, "engine_down_since": None, "engine_last_failure": None,
                 "audit_store": "ok", "audit_store_down_since": None, "audit_store_last_failure": None,
                 "dev_mode": False}
    await chat(api, localist_server, locality=0.5, blocks=RULES, target_block="R1")
    r = await api.post("/v1/chat/completions", headers={"x-request-id": "trace-42"},
                       json={"model": localist_server.model, "messages": MSG, "max_tokens": 1})
    assert r.headers["x-request-id"] == "trace-42"
    rec = (await api.get(f"/v1/audit/{r.json()['id']}")).json()
    assert rec["request"]["http_request_id"] == "trace-42"
    assert (await api.get("/v1/models", headers={"x-request-id": "bad id with spaces"})).headers["x-request-id"] \
        .startswith("req-")
    text = (await api.get("/metrics")).text
    for name in ("localist_requests_total", "localist_tokens_total", "localist_request_latency_seconds_bucket",
                 "localist_dial_rho_bucket", "localist_pointer_fidelity_bucket", "localist_http_responses_total"):
        assert name in text, name
    completed = [line for line in text.splitlines()
                 if line.startswith('localist_requests_total{endpoint="chat",status="completed"}')]
    assert completed and float(completed[0].split()[-1]) >= 2
    log = localist_server.log_tail(400000)
    assert "trace-42" in log
    assert f"localist: serving '{localist_server.model}' on {localist_server.base_url}" in log  # how to call it
    assert "LOCAL DEV MODE" not in log


async def test_concurrent_requests_each_stored_once_and_chain_valid(localist_server, api, tenant_api):
    async def one(i: int):
        client = api if i % 2 else tenant_api
        body = {"model": localist_server.model, "messages": MSG, "max_tokens": 2 + i % 3, "locality": (i % 5) / 4,
                "blocks": RULES, "stream": i % 3 == 0}
        r = await client.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        if body["stream"]:
            return json.loads(r.text.strip().split("\n\n")[-2][len("data: "):])["id"]
        return r.json()["id"]

    ids = await asyncio.gather(*(one(i) for i in range(12)))
    assert len(set(ids)) == 12
    for rid in ids:
        rec = (await api.get(f"/v1/audit/{rid}")).json()
        assert rec["status"] == "completed" and rec["output"]["usage"]["completion_tokens"] >= 2
    v = (await api.post("/v1/audit/verify")).json()
    assert v["ok"] and v["first_broken"] is None


async def test_admin_key_manages_keys_over_http(localist_server, api, tenant_api):
    r = await api.post("/v1/keys", json={"tenant": "beta", "name": "beta app", "max_concurrency": 2})
    assert r.status_code == 200, r.text
    created = r.json()
    token, kid = created["token"], created["key"]["key_id"]
    assert created["key"]["tenant"] == "beta" and created["key"]["active"] and token.startswith("lk_")
    listed = (await api.get("/v1/keys")).json()["data"]
    assert kid in [k["key_id"] for k in listed] and all("token" not in k for k in listed)
    async with httpx.AsyncClient(base_url=localist_server.base_url,
                                 headers={"Authorization": f"Bearer {token}"}) as beta:
        assert (await beta.get("/v1/models")).status_code == 200
        assert (await api.delete(f"/v1/keys/{kid}")).json()["active"] is False
        assert (await beta.get("/v1/models")).status_code == 401
    assert kid not in [k["key_id"] for k in (await api.get("/v1/keys")).json()["data"]]
    assert kid in [k["key_id"] for k in (await api.get("/v1/keys", params={"include_revoked": True})).json()["data"]]
    assert (await tenant_api.get("/v1/keys")).status_code == 403
    assert (await tenant_api.post("/v1/keys", json={"tenant": "acme", "admin": True})).status_code == 403
    bad = await api.post("/v1/keys", json={"tenant": "", "rate_limit_per_min": 0})
    assert bad.status_code == 400 and bad.json()["error"]["param"] in ("tenant", "rate_limit_per_min")
    assert (await api.delete("/v1/keys/0000000000000000")).status_code == 404
    # the CLI through the server with an admin key
    out = json.loads(subprocess.run(
        [sys.executable, "-m", "localist.clients.cli", "keys", "create", "--tenant", "gamma", "--json",
         "--url", localist_server.base_url, "--api-key", localist_server.admin_key],
        capture_output=True, text=True, env=server_env(localist_server.home), timeout=120, check=True).stdout)
    assert out["tenant"] == "gamma"
    events = (await api.get("/v1/audit", params={"kind": "key", "limit": 1000})).json()["data"]
    assert {f"key-create-{kid}", f"key-revoke-{kid}", f"key-create-{out['key_id']}"} <= {e["id"] for e in events}
    denied = subprocess.run(
        [sys.executable, "-m", "localist.clients.cli", "keys", "list", "--url", localist_server.base_url,
         "--api-key", localist_server.tenant_key], capture_output=True, text=True,
        env=server_env(localist_server.home), timeout=120)
    assert denied.returncode != 0 and "403" in denied.stderr


async def test_retention_purge_and_public_key(localist_server, api, tenant_api):
    from localist.server.store import AuditStore

    created = (await api.post("/v1/keys", json={"tenant": "retention"})).json()
    async with httpx.AsyncClient(base_url=localist_server.base_url, timeout=60,
                                 headers={"Authorization": f"Bearer {created['token']}"}) as client:
        old = (await chat(client, localist_server))["id"]
        cutoff = time.time()
        await asyncio.sleep(0.05)
        new = (await chat(client, localist_server))["id"]
        assert (await client.post("/v1/audit/purge", json={"before": cutoff})).status_code == 403
    assert (await tenant_api.post("/v1/audit/purge", json={"before": cutoff})).status_code == 403
    r = await api.post("/v1/audit/purge", json={"before": cutoff, "tenant": "retention"})
    assert r.status_code == 200 and r.json() == {"erased": 1}
    assert (await api.get(f"/v1/audit/{old}")).json()["redacted"] is True
    assert (await api.get(f"/v1/audit/{new}")).json()["output"] is not None
    assert (await api.post("/v1/audit/verify")).json()["ok"]
    bad = await api.post("/v1/audit/purge", json={"before": "soon"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "before"
    # the published key verifies the stored checkpoints outside the server
    pem = (await tenant_api.get("/v1/audit/public-key"))
    assert pem.status_code == 200 and pem.text.startswith("-----BEGIN PUBLIC KEY-----")
    for _ in range(50):
        with AuditStore(localist_server.db_url) as store:
            report = store.verify(public_keys=[pem.text.encode()])
        if report.signed_seq is not None:
            break
        await asyncio.sleep(0.2)
    assert report.ok and report.signed_seq is not None and report.signatures_valid >= 1
    with AuditStore(localist_server.db_url) as store:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
        stranger = store.verify(public_keys=[Ed25519PrivateKey.generate()])
    assert stranger.signed_seq is None and stranger.signatures_untrusted >= 1
