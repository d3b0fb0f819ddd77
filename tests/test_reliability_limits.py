"""Limits and shutdown against the real server: per-key rate and concurrency limits under a burst, the
request size limit, and SIGTERM draining in-flight requests with their audit records written.
"""
from __future__ import annotations

import asyncio
import json
import signal
import socket
import time

import httpx
import psutil
import pytest
from conftest import MODEL_NAME, ports_in, serving
from reliability_figures import record

from localist.server.store import ALL_TENANTS, AuditStore
from localist.server.transport import MAX_BODY_BYTES, MAX_HEADER_BYTES

PORTS = range(18340, 18360)
MSG = [{"role": "user", "content": "Is a loan of 60000 EUR allowed?"}]
CHAT, JSON = "/v1/chat/completions", {"content-type": "application/json"}


async def _key(server, **limits) -> str:
    async with httpx.AsyncClient(base_url=server.base_url, headers=server.headers(), timeout=60) as admin:
        r = await admin.post("/v1/keys", json={"tenant": "limits", **limits})
        assert r.status_code == 200, r.text
        return r.json()["token"]


async def test_rate_limit_under_a_burst(localist_server):
    token = await _key(localist_server, rate_limit_per_min=5)
    async with httpx.AsyncClient(base_url=localist_server.base_url, timeout=120,
                                 headers={"Authorization": f"Bearer {token}"}) as client:
        body = {"model": localist_server.model, "messages": MSG, "max_tokens": 2}
        answers = await asyncio.gather(*(client.post("/v1/chat/completions", json=body) for _ in range(12)))
    statuses = sorted(r.status_code for r in answers)
    assert statuses == [200] * 5 + [429] * 7, statuses
    for r in answers:
        if r.status_code == 429:
            assert r.json()["error"]["type"] == "rate_limit_error" and 1 <= int(r.headers["retry-after"]) <= 60
    record("limits", limit="rate 5/min, burst of 12", **{"2xx": 5, "429": 7, "5xx": 0})


async def test_concurrency_limit_under_a_burst(localist_server):
    token = await _key(localist_server, max_concurrency=3)
    body = {"model": localist_server.model, "messages": MSG, "max_tokens": 64, "ignore_eos": True, "stream": True}
    async with httpx.AsyncClient(base_url=localist_server.base_url, timeout=120,
                                 headers={"Authorization": f"Bearer {token}"}) as client:
        async def one() -> int:
            async with client.stream("POST", "/v1/chat/completions", json=body) as r:
                await r.aread()
                return r.status_code

        statuses = sorted(await asyncio.gather(*(one() for _ in range(10))))
        assert statuses.count(200) >= 3 and set(statuses) <= {200, 429}, statuses
        after = await client.post("/v1/chat/completions", json={**body, "stream": False, "max_tokens": 1})
        assert after.status_code == 200  # every slot was given back
    record("limits", limit="3 concurrent, burst of 10 streams", **{"2xx": statuses.count(200),
                                                                  "429": statuses.count(429), "5xx": 0})


def _padded_chat(server, size: int) -> bytes:
    """A valid chat request, padded with JSON white space to ``size`` bytes."""
    body = json.dumps({"model": server.model, "messages": MSG, "max_tokens": 1}).encode()
    return body + b" " * (size - len(body))


def _refused(r: httpx.Response, status: int, code: str, limit: int) -> None:
    assert r.status_code == status, r.text[:500]
    err = r.json()["error"]
    assert err["code"] == code and f"limit of {limit} bytes" in err["message"], err


def _answer_to_a_part(server, part: bytes) -> httpx.Response:
    """The server's answer to the start of a request whose rest is never sent (a server that waited for
    it would time out here)."""
    with socket.create_connection(("127.0.0.1", httpx.URL(server.base_url).port), timeout=30) as s:
        s.sendall(part)
        data = b""
        while b"\r\n\r\n" not in data:
            data += s.recv(65536) or pytest.fail(f"closed without an answer: {data!r}")
        head, _, body = data.partition(b"\r\n\r\n")
        status, *lines = head.decode("latin-1").split("\r\n")
        headers = httpx.Headers([line.split(": ", 1) for line in lines])
        while len(body) < int(headers["content-length"]):
            body += s.recv(65536) or pytest.fail(f"closed in the answer: {data!r}")
    return httpx.Response(int(status.split()[1]), headers=headers, content=body)


def _head(server, method: str, *headers: str) -> bytes:
    return "\r\n".join([f"{method} {CHAT} HTTP/1.1", "host: localhost", f"authorization: Bearer {server.admin_key}",
                         "content-type: application/json", *headers]).encode() + b"\r\n\r\n"


async def test_request_body_limit(localist_server, api):
    """A body over the limit is refused 413 naming it: at once when Content-Length declares it, and as soon
    as a chunked body passes it, before the rest arrives; a client that sends it all reads the same answer.
    A body of exactly the limit is served."""
    over = _padded_chat(localist_server, MAX_BODY_BYTES + 1)
    declared = _head(localist_server, "POST", f"content-length: {10**12}")
    _refused(_answer_to_a_part(localist_server, declared), 413, "body_too_large", MAX_BODY_BYTES)
    chunk = 1 << 16
    chunked = _head(localist_server, "POST", "transfer-encoding: chunked") + b"".join(
        b"%x\r\n%s\r\n" % (len(over[i:i + chunk]), over[i:i + chunk]) for i in range(0, len(over), chunk))
    _refused(_answer_to_a_part(localist_server, chunked), 413, "body_too_large", MAX_BODY_BYTES)

    async def in_pieces():  # httpx sends a body of unknown length chunked
        for i in range(0, len(over), chunk):
            yield over[i:i + chunk]

    for content in (over, in_pieces()):
        _refused(await api.post(CHAT, content=content, headers=JSON), 413, "body_too_large", MAX_BODY_BYTES)
    r = await api.post(CHAT, content=_padded_chat(localist_server, MAX_BODY_BYTES), headers=JSON)
    assert r.status_code == 200, r.text[:500]
    record("limits", limit=f"body of {MAX_BODY_BYTES} bytes", **{"2xx": 1, "413": 4, "5xx": 0})


async def test_header_section_limit(localist_server, api):
    """A header section over the limit is refused 431 naming it, whether it arrives whole or never ends
    (then as soon as it passes the limit, and the connection is closed); one under it is served."""
    _refused(await api.get("/v1/models", headers={"x-big": "h" * MAX_HEADER_BYTES}), 431, "headers_too_large",
             MAX_HEADER_BYTES)
    unfinished = b"GET /v1/models HTTP/1.1\r\nhost: localhost\r\nx-big: " + b"h" * (MAX_HEADER_BYTES + 1024)
    r = _answer_to_a_part(localist_server, unfinished)
    _refused(r, 431, "headers_too_large", MAX_HEADER_BYTES)
    assert r.headers["connection"] == "close"
    assert (await api.get("/v1/models", headers={"x-big": "h" * (MAX_HEADER_BYTES // 2)})).status_code == 200
    record("limits", limit=f"header section of {MAX_HEADER_BYTES} bytes", **{"2xx": 1, "431": 2, "5xx": 0})


def test_sigterm_drains_in_flight_requests_and_flushes_their_records(tmp_path):
    from localist.model.tiny import make_tiny_checkpoint

    model_dir = make_tiny_checkpoint(tmp_path / MODEL_NAME)
    db_url = f"sqlite:///{tmp_path / 'audit.db'}"
    with AuditStore(db_url) as store:
        admin_key, _ = store.create_key(tenant="admin", name="drain", admin=True, actor="test")
    (port,) = ports_in(PORTS)
    base = f"http://127.0.0.1:{port}"
    args = ["--model", str(model_dir), "--name", MODEL_NAME, "--db", db_url, "--no-signing", "--max-model-len", "512"]
    body = {"model": MODEL_NAME, "messages": MSG, "max_tokens": 48, "ignore_eos": True}

    async def drain(proc) -> tuple[list, float, bool]:
        started = asyncio.Event()

        async def one(client: httpx.AsyncClient, stream: bool):
            if not stream:
                r = await client.post("/v1/chat/completions", json=body)
                return r.status_code, r.json().get("id")
            rid, done = None, False
            async with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
                async for line in r.aiter_lines():
                    started.set()
                    if line == "data: [DONE]":
                        done = True
                    elif line.startswith("data: "):
                        rid = json.loads(line[6:]).get("id", rid)
            return (r.status_code if done else -1), rid

        async with httpx.AsyncClient(base_url=base, timeout=120,
                                     headers={"Authorization": f"Bearer {admin_key}"}) as client:
            tasks = [asyncio.create_task(one(client, i % 2 == 0)) for i in range(8)]
            await started.wait()
            # SIGTERM only once every request is in the engine or answered: one still on its way to the server
            # would be a new connection, refused (seen on a loaded host)
            while (await client.get("/health")).json()["engine_requests"] + sum(t.done() for t in tasks) < len(tasks):
                await asyncio.sleep(0.05)
            stop = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.5)
            try:  # a new connection after SIGTERM is refused or answered 503, never left hanging
                late = await httpx.AsyncClient(timeout=10).get(base + "/health")
                refused = late.status_code == 503
            except httpx.TransportError:
                refused = True
            results = await asyncio.gather(*tasks)
            return results, time.monotonic() - stop, refused

    with serving(args, port, tmp_path / "server.log", tmp_path / "home") as proc:
        children = psutil.Process(proc.pid).children(recursive=True)
        results, drain_s, refused = asyncio.run(drain(proc))
        # uvicorn re-raises the signal once it has shut down gracefully
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM), (tmp_path / "server.log").read_text()[-4000:]
    assert "Application shutdown complete" in (tmp_path / "server.log").read_text()
    assert [status for status, _ in results] == [200] * 8, results
    assert refused
    _, lingering = psutil.wait_procs(children, timeout=30)  # the engine processes end with the server
    for child in lingering:
        child.kill()
    assert lingering == []
    with AuditStore(db_url) as store:
        stored = {rid: store.get_record(rid, tenant=ALL_TENANTS) for _, rid in results}
        report = store.verify(public_keys=[])
    assert all(rec is not None and rec["status"] == "completed" for rec in stored.values()), stored
    assert report.ok
    record("limits", limit="SIGTERM with 8 requests in flight", drained=len(results), records_flushed=len(stored),
           drain_s=round(drain_s, 1))
