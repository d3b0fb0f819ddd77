"""Retries, backoff and error mapping of the client, against a scripted HTTP server on a real socket.

The localist server cannot be made to fail on cue (a 503, a broken proxy page, an error event in the
middle of a stream), so a small ``http.server`` plays those answers; the client's real httpx
transport talks to it over TCP. The real server's own errors are covered in test_client.py.
"""
from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from localist.clients import (
    APIConnectionError,
    AsyncClient,
    BadRequestError,
    Client,
    NotFoundError,
    RateLimitError,
    ServerError,
)

HEALTH = {"status": "ok", "model": "m", "engine": "running", "engine_requests": 0, "engine_stats_held": 0,
          "engine_restarts": 0, "engine_down_since": None, "engine_last_failure": None, "audit_store": "ok",
          "audit_store_down_since": None, "audit_store_last_failure": None, "dev_mode": False}


def error(message: str, type_: str, param: str | None = None) -> bytes:
    return json.dumps({"error": {"message": message, "type": type_, "param": param, "code": None}}).encode()


class Scripted:
    """Answers requests with the next scripted (status, headers, body); records what it saw."""

    def __init__(self, script: list[tuple[int, dict[str, str], bytes]]):
        self.script = list(script)
        self.seen: list[tuple[str, str, float]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self):
                length = int(self.headers.get("content-length") or 0)
                self.rfile.read(length)
                outer.seen.append((self.command, self.path, time.monotonic()))
                status, headers, body = outer.script.pop(0) if len(outer.script) > 1 else outer.script[0]
                self.send_response(status)
                for k, v in {"content-type": "application/json", **headers}.items():
                    self.send_header(k, v)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _answer

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def scripted():
    servers = []

    def make(*script):
        servers.append(Scripted(list(script)))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


def test_5xx_is_retried_with_backoff(scripted):
    srv = scripted((503, {}, error("warming up", "server_error")), (502, {}, b"<html>bad gateway</html>"),
                   (200, {}, json.dumps(HEALTH).encode()))
    with Client(srv.url, max_retries=3, backoff=0.05) as client:
        assert client.health().status == "ok"
    times = [t for _, _, t in srv.seen]
    assert len(times) == 3
    # exponential backoff with jitter in [0.5, 1] of backoff·2^attempt
    assert 0.025 <= times[1] - times[0] and 0.05 <= times[2] - times[1]


def test_retry_after_is_honoured(scripted):
    srv = scripted((429, {"retry-after": "0.3"}, error("slow down", "rate_limit_error")),
                   (200, {}, json.dumps(HEALTH).encode()))
    with Client(srv.url, backoff=5.0) as client:  # Retry-After wins over the (long) backoff
        started = time.monotonic()
        client.health()
        waited = time.monotonic() - started
    assert len(srv.seen) == 2 and 0.3 <= waited < 2.0


def test_gives_up_after_max_retries_with_the_servers_message(scripted):
    srv = scripted((503, {"x-request-id": "req-42"}, error("engine restarting", "server_error")))
    with Client(srv.url, max_retries=2, backoff=0.01) as client, pytest.raises(ServerError) as failed:
        client.health()
    assert len(srv.seen) == 3
    assert failed.value.status_code == 503 and failed.value.message == "engine restarting"
    assert failed.value.request_id == "req-42" and "engine restarting" in str(failed.value)


def test_a_failed_request_is_not_sent_again(scripted):
    srv = scripted((500, {}, error("generation failed: localist attention failed", "server_error")))
    with Client(srv.url, max_retries=2, backoff=0.01) as client, pytest.raises(ServerError, match="generation failed"):
        client.health()
    assert len(srv.seen) == 1


def test_rate_limit_error_after_retries(scripted):
    srv = scripted((429, {"retry-after": "0"}, error("limit of 1 per minute", "rate_limit_error")))
    with Client(srv.url, max_retries=1) as client, pytest.raises(RateLimitError, match="limit of 1 per minute"):
        client.models()
    assert len(srv.seen) == 2


def test_client_errors_are_not_retried(scripted):
    srv = scripted((400, {}, error("locality: must be in [0, 1], got 1.5", "invalid_request_error", "locality")))
    with Client(srv.url, max_retries=5) as client, pytest.raises(BadRequestError) as bad:
        client.chat("hi", model="m", locality=1.5)
    assert len(srv.seen) == 1
    assert bad.value.param == "locality" and "1.5" in bad.value.message


def test_non_json_error_page_keeps_its_text(scripted):
    srv = scripted((502, {"content-type": "text/html"}, b"<html>upstream timed out</html>"))
    with Client(srv.url, max_retries=0) as client, pytest.raises(ServerError, match="upstream timed out"):
        client.health()


def test_refused_connection_is_retried_then_raised():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed when the block ends: nothing listens there
    with Client(f"http://127.0.0.1:{port}", max_retries=2, backoff=0.01) as client:
        with pytest.raises(APIConnectionError, match=str(port)):
            client.health()


def test_error_event_inside_a_stream_raises(scripted):
    chunk = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
             "choices": [{"index": 0, "delta": {"content": "Hel"},
                          "localist": {"tokens": [{"index": 0, "token_id": 5, "attribution": [0.25, 0.75]}]}}]}
    body = (f"data: {json.dumps(chunk)}\n\n"
            f"data: {error('engine aborted the request', 'server_error').decode()}\n\n").encode()
    srv = scripted((200, {"content-type": "text/event-stream"}, body))
    with Client(srv.url) as client:
        stream = client.chat_stream("hi", model="m")
        deltas = []
        with pytest.raises(ServerError, match="engine aborted"):
            for delta in stream:
                deltas.append(delta)
    assert [d.text for d in deltas] == ["Hel"]
    assert deltas[0].tokens[0].attribution == [0.25, 0.75] and deltas[0].tokens[0].pointer_fidelity is None


async def test_async_client_retries_the_same_way(scripted):
    srv = scripted((503, {}, error("warming up", "server_error")), (200, {}, json.dumps(HEALTH).encode()))
    async with AsyncClient(srv.url, backoff=0.01) as client:
        assert (await client.health()).engine == "running"
    assert len(srv.seen) == 2
    srv = scripted((404, {}, error("audit record 'x' not found", "not_found_error", "id")))
    async with AsyncClient(srv.url) as client:
        with pytest.raises(NotFoundError) as missing:
            await client.audit.get("x")
    assert missing.value.param == "id" and missing.value.status_code == 404
    assert len(srv.seen) == 1
