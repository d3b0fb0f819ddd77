"""One failure never takes the service down (issue 15), against a real server of its own.

The server starts with ``LOCALIST_FAULT_LABEL`` set, so a localist request holding a block with that
label raises inside the worker's attention layer. (a) Such a request is answered 500 naming the cause
and stored as ``failed``; the requests after it are served. (b) Killing the engine core process: the
in-flight request is stored as ``failed``, new requests get 503 with Retry-After and never hang,
``/health`` and Prometheus show the outage, and the restarted engine serves again. (b) runs last: it
restarts this module's engine.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import httpx
import psutil
import pytest
from conftest import MODEL_NAME, STARTUP_TIMEOUT_S, LocalistServer, ports_in, serving

from localist.server.store import AuditStore

FAULT = "FAULT"
PORTS = range(18220, 18240)
RULES = [{"label": "R1", "kind": "rule", "text": "Rule R1: A loan above 50000 EUR requires a second approval."}]
FAULTY = [{"label": FAULT, "kind": "rule", "text": "Rule F: this block makes the worker raise."}]
MESSAGES = [{"role": "user", "content": "Is a loan of 60000 EUR allowed with one approval?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> LocalistServer:
    from localist.model.tiny import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("fault-isolation")
    model_dir = make_tiny_checkpoint(root / MODEL_NAME)
    db_url = f"sqlite:///{root / 'audit.db'}"
    with AuditStore(db_url) as store:
        admin_key, _ = store.create_key(tenant="admin", name="test admin", admin=True, actor="test")
    (port,) = ports_in(PORTS)
    log_path = root / "server.log"
    args = ["--model", str(model_dir), "--name", MODEL_NAME, "--db", db_url, "--no-signing", "--max-model-len", "1024"]
    with serving(args, port, log_path, root / "home", {"LOCALIST_FAULT_LABEL": FAULT}) as proc:
        yield LocalistServer(f"http://127.0.0.1:{port}", admin_key, admin_key, "admin", MODEL_NAME, model_dir, db_url,
                             root / "unused.pem", root / "home", log_path, proc)


@pytest.fixture
async def api(server):
    async with httpx.AsyncClient(base_url=server.base_url, headers=server.headers(), timeout=60) as client:
        yield client


def chat(server, **extra) -> dict:
    return {"model": server.model, "messages": MESSAGES, "max_tokens": 4, "temperature": 0, **extra}


def sse_events(text: str) -> list:
    return [b[len("data: "):] if b == "data: [DONE]" else json.loads(b[len("data: "):])
            for b in text.strip().split("\n\n")]


async def record(api, record_id: str) -> dict:
    r = await api.get(f"/v1/audit/{record_id}")
    assert r.status_code == 200, r.text
    return r.json()


def metric(text: str, name: str) -> float:
    values = [float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")]
    assert len(values) == 1, f"{name} not exposed once:\n{text}"
    return values[0]


def engine_core_pid(server) -> int:
    cores = [p for p in psutil.Process(server.process.pid).children(recursive=True) if "EngineCore" in p.name()]
    assert len(cores) == 1, [(p.pid, p.name()) for p in psutil.Process(server.process.pid).children(recursive=True)]
    return cores[0].pid


# --------------------------------------------------------------------------- (a) a failure in the worker


async def test_a_localist_failure_is_a_500_naming_the_cause_and_a_failed_record(server, api):
    r = await api.post("/v1/chat/completions", json=chat(server, locality=0.5, blocks=FAULTY))
    assert r.status_code == 500, r.text
    err = r.json()["error"]
    assert err["code"] == "generation_failed"
    assert "localist attention failed in layer" in err["message"] and "injected fault" in err["message"]
    record_id = err["message"].rsplit("audit record ", 1)[1].rstrip(")")
    rec = await record(api, record_id)
    assert rec["status"] == "failed" and "injected fault" in rec["error"]
    assert [b["label"] for b in rec["request"]["blocks"]].count(FAULT) == 1

    stock = await api.post("/v1/chat/completions", json=chat(server))
    assert stock.status_code == 200, stock.text
    localist = await api.post("/v1/chat/completions", json=chat(server, locality=0.5, blocks=RULES))
    assert localist.status_code == 200, localist.text
    assert (await record(api, localist.json()["id"]))["status"] == "completed"
    assert (await api.get("/health")).json()["engine_restarts"] == 0


async def test_a_streamed_localist_failure_is_an_in_band_error_without_done(server, api):
    r = await api.post("/v1/chat/completions", json=chat(server, locality=0.5, blocks=FAULTY, stream=True))
    assert r.status_code == 200  # the status line goes out before the first token
    events = sse_events(r.text)
    assert "[DONE]" not in events
    err = events[-1]["error"]
    assert err["code"] == "generation_failed" and "injected fault" in err["message"]
    rec = await record(api, events[0]["id"])
    assert rec["status"] == "failed" and "injected fault" in rec["error"]
    after = await api.post("/v1/chat/completions", json=chat(server, locality=0.5, blocks=RULES, stream=True))
    assert sse_events(after.text)[-1] == "[DONE]"


async def test_a_a_request_sharing_the_failing_step_is_ended_with_its_cause(server, api):
    """The worker ends every localist request of the step that failed: one still generating when the faulty
    request's prefill joins its step is answered with the cause and stored as failed; the engine serves on."""
    body = chat(server, locality=0.5, blocks=RULES, max_tokens=900, ignore_eos=True, stream=True)
    async with api.stream("POST", "/v1/chat/completions", json=body) as stream:
        lines = stream.aiter_lines()
        first = {"choices": [{}]}
        while not first["choices"][0].get("localist"):  # a generated token: it is in the engine's batch
            line = await anext(lines)
            first = json.loads(line[len("data: "):]) if line else first
        faulty = await api.post("/v1/chat/completions", json=chat(server, locality=0.5, blocks=FAULTY))
        rest = [line[len("data: "):] async for line in lines if line]
    assert faulty.status_code == 500 and "injected fault" in faulty.json()["error"]["message"]
    assert "[DONE]" not in rest
    err = json.loads(rest[-1])["error"]
    assert err["code"] == "generation_failed" and "injected fault" in err["message"]
    rec = await record(api, first["id"])
    assert rec["status"] == "failed" and "injected fault" in rec["error"]
    assert 0 < len(rec["output"]["choices"][0]["token_ids"]) < 900
    again = await api.post("/v1/chat/completions", json=chat(server, locality=0.5, blocks=RULES))
    assert again.status_code == 200, again.text


# --------------------------------------------------------------------------- (b) the engine dies


async def test_b_a_killed_engine_core_is_restarted_and_serves_again(server, api):
    assert metric((await api.get("/metrics")).text, "localist_engine_up") == 1.0
    body = chat(server, locality=0.5, blocks=RULES, max_tokens=900, ignore_eos=True, stream=True)
    async with api.stream("POST", "/v1/chat/completions", json=body) as stream:
        lines = stream.aiter_lines()
        first = {"choices": [{}]}
        while not first["choices"][0].get("localist"):  # a generated token: the request is in the engine
            line = await anext(lines)
            first = json.loads(line[len("data: "):]) if line else first
        os.kill(engine_core_pid(server), signal.SIGKILL)
        rest = [json.loads(line[len("data: "):]) if line != "data: [DONE]" else "[DONE]"
                async for line in lines if line]
    assert "[DONE]" not in rest
    err = rest[-1]["error"]
    assert err["code"] == "engine_unavailable" and "the engine died during" in err["message"]
    assert "SIGKILL" in err["message"]
    rec = await record(api, first["id"])
    assert rec["status"] == "failed" and "SIGKILL" in rec["error"]

    # while the new engine starts: 503 with Retry-After, at once, for every caller
    refused = await asyncio.wait_for(asyncio.gather(
        *(api.post("/v1/chat/completions", json=chat(server, locality=rho)) for rho in (0.0, 0.5, 0.9))), 10)
    for r in refused:
        assert r.status_code == 503, r.text
        assert int(r.headers["retry-after"]) >= 1
        assert r.json()["error"]["code"] == "engine_unavailable" and "SIGKILL" in r.json()["error"]["message"]
    health = await api.get("/health")
    assert health.status_code == 503 and int(health.headers["retry-after"]) >= 1
    h = health.json()
    assert h["status"] == "degraded" and h["engine"] == "restarting" and h["engine_down_since"] <= time.time()
    assert "SIGKILL" in h["engine_last_failure"] and h["engine_restarts"] == 0
    assert metric((await api.get("/metrics")).text, "localist_engine_up") == 0.0

    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while (await api.get("/health")).status_code != 200:
        assert time.monotonic() < deadline, server.log_tail()
        await asyncio.sleep(1)
    h = (await api.get("/health")).json()
    assert h["engine"] == "running" and h["engine_restarts"] == 1 and h["engine_down_since"] is None
    assert "SIGKILL" in h["engine_last_failure"]
    r = await api.post("/v1/chat/completions", json=chat(server, locality=0.5, blocks=RULES))
    assert r.status_code == 200, r.text
    assert (await record(api, r.json()["id"]))["status"] == "completed"
    text = (await api.get("/metrics")).text
    assert metric(text, "localist_engine_up") == 1.0 and metric(text, "localist_engine_restarts_total") == 1.0
    assert 'localist_requests_total{endpoint="chat",status="failed"}' in text
    verify = (await api.post("/v1/audit/verify")).json()
    assert verify["ok"], verify
