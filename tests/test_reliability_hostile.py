"""Hostile input against the real server: a hand-written corpus, each request with its expected status and
`error.param`; never a 5xx, never a hang, nothing stored for a refused request, user strings escaped in the
HTML report, and export paths that stay in their folder.
"""
from __future__ import annotations

import base64
import collections
import json
import subprocess
import sys
from dataclasses import dataclass, field

import httpx
import pytest
from conftest import server_env
from reliability_figures import record

MSG = [{"role": "user", "content": "Which rule applies?"}]
RULE = {"label": "R1", "kind": "rule", "text": "Rule R1: loans need two approvals."}
CHAT, COMPLETIONS, AUDIT = "/v1/chat/completions", "/v1/completions", "/v1/audit"
MODEL = "{model}"  # replaced by the served model's name when the request is sent


@dataclass(frozen=True)
class Hostile:
    category: str
    body: dict | None = None  # merged over a valid request for CHAT/COMPLETIONS, sent as JSON (NaN allowed)
    status: int = 400
    param: str | None = None
    path: str = CHAT
    method: str = "POST"
    raw: bytes | None = None  # sent as is instead of `body`
    query: dict = field(default_factory=dict)
    headers: dict = field(default_factory=dict)


def _cursor(value) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")


def _nested(depth: int) -> bytes:
    return b'{"model": "{model}", "messages": [{"role": "user", "content": "x"}], "locality": ' + \
        b"[" * depth + b"]" * depth + b"}"


def _chat_raw(content: bytes) -> bytes:
    return b'{"model": "{model}", "max_tokens": 1, "messages": [{"role": "user", "content": "' + content + b'"}]}'


VALID_CHAT = _chat_raw(b"hello")
S, D, B, P, J, U, T, F, X, M, A = ("sampling parameters", "dial", "blocks", "prompt over context", "nested or huge JSON", "invalid UTF-8",
                                "content type", "audit filters and cursors", "paths leaving their folder",
                                "unknown model or preset", "auth and headers")
CASES = [
    # -- sampling parameters -----------------------------------------------------------------------------
    Hostile(S, {"temperature": -1}, param="temperature"),
    Hostile(S, {"temperature": float("nan")}, param="temperature"),
    Hostile(S, {"temperature": 1e308}, param="temperature"),
    Hostile(S, {"top_p": 2}, param="top_p"),
    Hostile(S, {"top_p": float("nan")}, param="top_p"),
    Hostile(S, {"frequency_penalty": 100}, param="frequency_penalty"),
    Hostile(S, {"presence_penalty": float("-inf")}, param="presence_penalty"),
    Hostile(S, {"seed": "x"}, param="seed"),
    Hostile(S, {"seed": 2**70}, param="seed"),
    Hostile(S, {"n": 0}, param="n"),
    Hostile(S, {"n": -1}, param="n"),
    Hostile(S, {"max_tokens": -1}, param="max_tokens"),
    Hostile(S, {"max_tokens": 1.5}, param="max_tokens"),
    Hostile(S, {"stop": ["a", "b", "c", "d", "e"]}, param="stop"),
    Hostile(S, {"stop": [""]}, param="stop[0]"),
    Hostile(S, {"stop": "s" * 100_000}, status=200),  # never matches; harmless
    Hostile(S, {"logprobs": "yes"}, param="logprobs"),
    Hostile(S, {"logprobs": True, "top_logprobs": 100}, param="top_logprobs"),
    Hostile(S, {"logit_bias": {"abc": 1}}, status=200),  # a field the server does not take is ignored
    Hostile(S, {"stream": "yes"}, param="stream"),
    Hostile(S, {"stream": True, "locality": 2}, param="locality"),
    Hostile(S, {"stream": True, "blocks": "R1"}, param="blocks"),
    Hostile(S, {"stream": True, "model": "gpt-4o"}, status=404, param="model"),
    Hostile(S, {"stream": True, "messages": [{"role": "user", "content": "word " * 600}]}, param="messages"),
    Hostile(S, {"messages": [{"role": "user", "content": ["not", "text"]}]}, param="messages[0].content"),
    Hostile(S, {"messages": [{"role": "system", "content": "x"}, {"role": "tool", "content": 5}]},
            param="messages[1].role"),
    # -- the dial --------------------------------------------------------------------------------------
    Hostile(D, {"locality": -0.1}, param="locality"),
    Hostile(D, {"locality": -1e-12}, param="locality"),
    Hostile(D, {"locality": 1.0000001}, param="locality"),
    Hostile(D, {"locality": float("nan")}, param="locality"),
    Hostile(D, {"locality": float("inf")}, param="locality"),
    Hostile(D, {"locality": float("-inf")}, param="locality"),
    Hostile(D, {"locality": 1e308}, param="locality"),
    Hostile(D, {"locality": -1e308}, param="locality"),
    Hostile(D, {"locality": "0.5"}, param="locality"),
    Hostile(D, {"locality": ""}, param="locality"),
    Hostile(D, {"locality": "BALANCED"}, param="locality"),
    Hostile(D, {"locality": []}, param="locality"),
    Hostile(D, {"locality": [0.5]}, param="locality"),
    Hostile(D, {"locality": [0.5, 0.5, 0.5]}, param="locality"),
    Hostile(D, {"locality": [0.5] * 1000}, param="locality"),
    Hostile(D, {"locality": [0.5, float("nan")]}, param="locality[1]"),
    Hostile(D, {"locality": [0.5, float("inf")]}, param="locality[1]"),
    Hostile(D, {"locality": [-0.5, 0.5]}, param="locality[0]"),
    Hostile(D, {"locality": [[0.5, 0.5]]}, param="locality"),
    Hostile(D, {"locality": {"rho": 0.5}}, param="locality"),
    Hostile(D, {"locality": True}, param="locality"),
    Hostile(D, {"locality": 1}, status=200),
    Hostile(D, {"locality": [5e-324, 1]}, status=200),
    Hostile(D, {"locality": 0.5, "target_block": "R1"}, param="target_block"),
    Hostile(D, {"locality": "distributed", "blocks": []}, status=200),
    Hostile(D, {"locality": None}, status=200),
    Hostile(D, {"locality": 2**64}, param="locality"),
    Hostile(D, {"locality": [0, 1]}, status=200),
    # -- blocks ----------------------------------------------------------------------------------------
    Hostile(B, {"blocks": [{"label": "A", "message": 0, "start": 0, "end": 8},
                           {"label": "B", "message": 0, "start": 4, "end": 10}]}, param="blocks[1]"),
    Hostile(B, {"blocks": [RULE, {**RULE, "text": "again"}]}, param="blocks[1].label"),
    Hostile(B, {"blocks": [{"label": "E", "text": ""}]}, param="blocks[0].text"),
    Hostile(B, {"blocks": [{"label": "", "text": "x"}]}, param="blocks[0].label"),
    Hostile(B, {"blocks": [{"label": "S", "message": 0, "start": 0, "end": 999}]}, param="blocks[0].end"),
    Hostile(B, {"blocks": [{"label": "S", "message": 0, "start": -1, "end": 2}]}, param="blocks[0].start"),
    Hostile(B, {"blocks": [{"label": "S", "message": 0, "start": 5, "end": 2}]}, param="blocks[0]"),
    Hostile(B, {"blocks": [{"label": "S", "message": 0, "start": 0.5, "end": 2}]}, param="blocks[0].start"),
    Hostile(B, {"blocks": [{"label": "S", "message": 99, "start": 0, "end": 2}]}, param="blocks[0].message"),
    Hostile(B, {"blocks": [{"label": "S", "message": -1, "start": 0, "end": 2}]}, param="blocks[0].message"),
    Hostile(B, {"blocks": [{"label": f"R{i}", "text": "r"} for i in range(1000)]}, param="blocks"),
    Hostile(B, {"blocks": [{"label": f"R{i}", "text": "r"} for i in range(5000)]}, param="blocks"),
    Hostile(B, {"blocks": "R1"}, param="blocks"),
    Hostile(B, {"blocks": [None]}, param="blocks[0]"),
    Hostile(B, {"blocks": [{"label": "R1"}]}, param="blocks[0]"),
    Hostile(B, {"blocks": [{"label": "R1", "kind": "sink", "text": "x"}]}, param="blocks[0].kind"),
    Hostile(B, {"blocks": [{"label": "<script>alert(1)</script>", "text": "x"}]}, status=200),
    Hostile(B, {"blocks": [{"label": "R1'; DROP TABLE audit_records;--", "text": "x"}]}, status=200),
    Hostile(B, {"blocks": [{"label": "R1", "text": "' OR 1=1; DELETE FROM audit_payloads;--"}]}, status=200),
    Hostile(B, {"blocks": [{"label": "R1\x00\x1b[31m", "text": "x"}]}, status=200),  # escaped where shown
    Hostile(B, {"blocks": [{"label": "R" * 10000, "text": "x"}]}, param="blocks[0].label"),
    Hostile(B, {"blocks": [RULE], "target_block": "<img src=x onerror=alert(1)>"}, param="target_block"),
    Hostile(B, {"blocks": [RULE], "target_block": -1}, param="target_block"),
    # -- prompts over the context (the server runs --max-model-len 512) -----------------------------------
    Hostile(P, {"messages": [{"role": "user", "content": "word " * 600}]}, param="messages"),
    Hostile(P, {"messages": [{"role": "user", "content": "x" * 200_000}]}, param="messages"),
    Hostile(P, {"messages": [{"role": "user", "content": "hi"}] * 2000}, param="messages"),
    Hostile(P, {"blocks": [{"label": "R1", "text": "rule " * 600}]}, param="messages"),
    Hostile(P, {"max_tokens": 512}, param="max_tokens"),
    Hostile(P, {"max_tokens": 2**31}, param="max_tokens"),
    Hostile(P, {"prompt": "word " * 1000}, path=COMPLETIONS, param="prompt"),
    Hostile(P, {"prompt": [1] * 600}, path=COMPLETIONS, param="prompt"),
    Hostile(P, {"prompt": [-1, 2]}, path=COMPLETIONS, param="prompt[0]"),
    Hostile(P, {"prompt": "word " * 100, "max_tokens": 500}, path=COMPLETIONS, param="max_tokens"),
    Hostile(P, {"n": 1000}, param="n"),
    # -- deeply nested and huge JSON ---------------------------------------------------------------------
    Hostile(J, raw=_nested(100_000), param=None),
    Hostile(J, raw=_nested(2_000), param=None),
    Hostile(J, raw=_nested(40), param="locality"),
    Hostile(J, raw=b'{"model": "{model}", "messages": ' + b'{"a": ' * 50_000 + b"1" + b"}" * 50_000 + b"}",
            param=None),
    Hostile(J, {"locality": [0.5] * 200_000}, param="locality"),
    Hostile(J, {"messages": [{"role": "user", "content": "x", "name": "n" * 1_000_000}]}, param="messages[0].name"),
    Hostile(J, raw=b'"just a string"', param=None),
    Hostile(J, raw=b"null", param=None),
    Hostile(J, raw=b"1e999", param=None),
    Hostile(J, raw=b'{"model": "{model}", "messages": [{"role": "user", "content": "x"}], '
                   b'"max_tokens": 1, "max_tokens": -1}', param="max_tokens"),
    Hostile(J, raw=b"", param=None),
    Hostile(J, raw=b"{" * 10, param=None),
    # -- invalid UTF-8 -------------------------------------------------------------------------------------
    Hostile(U, raw=_chat_raw(b"\xff\xfe"), param=None),
    Hostile(U, raw=_chat_raw(b"\xc0\xaf"), param=None),
    Hostile(U, raw=_chat_raw(b"\xed\xa0\x80"), param="messages[0].content"),
    Hostile(U, raw=_chat_raw(b"\xe2\x82"), param=None),
    Hostile(U, raw=_chat_raw(b"\xf8\x88\x80\x80\x80"), param=None),
    Hostile(U, raw=_chat_raw(b"ok") + b"\x80", param=None),
    Hostile(U, raw=b"\xef\xbb\xbf" + VALID_CHAT, status=200),
    Hostile(U, raw=_chat_raw(b"\\ud800 lone surrogate"), param="messages[0].content"),
    Hostile(U, raw=_chat_raw(b"\\udfff\\ud800"), param="messages[0].content"),
    Hostile(U, raw=b'{"model": "{model}", "max_tokens": 1, "messages": [{"role": "user", "content": "x"}], '
                   b'"blocks": [{"label": "\\ud800", "text": "x"}]}', param="blocks[0].label"),
    Hostile(U, raw=_chat_raw(b"nul \\u0000 byte"), status=200),
    Hostile(U, raw=_chat_raw("caf\u00e9".encode("latin-1")), param=None,
            headers={"content-type": "application/json; charset=latin-1"}),
    # -- wrong content types -------------------------------------------------------------------------------
    Hostile(T, raw=VALID_CHAT, headers={"content-type": "text/plain"}, param=None),
    Hostile(T, raw=VALID_CHAT, headers={"content-type": "application/x-www-form-urlencoded"}, param=None),
    Hostile(T, raw=b"model=x&max_tokens=1", headers={"content-type": "application/x-www-form-urlencoded"}, param=None),
    Hostile(T, raw=b"--b\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nx\r\n--b--\r\n",
            headers={"content-type": "multipart/form-data; boundary=b"}, param=None),
    Hostile(T, raw=b"<request><model>x</model></request>", headers={"content-type": "application/xml"}, param=None),
    Hostile(T, raw=VALID_CHAT, headers={"content-type": "image/png"}, param=None),
    Hostile(T, raw=VALID_CHAT, headers={"content-type": "application/octet-stream"}, param=None),
    Hostile(T, raw=VALID_CHAT, headers={"content-type": ""}, param=None),
    Hostile(T, raw=VALID_CHAT, headers={"content-type": "application/json"}, status=200),
    Hostile(T, raw=VALID_CHAT, headers={"content-type": "application/vnd.api+json"}, status=200),
    Hostile(T, method="GET", status=405),
    Hostile(T, method="PUT", path=AUDIT, status=405),
    Hostile(T, method="DELETE", path="/v1/models", status=405),
    # -- audit filters and cursors -------------------------------------------------------------------------
    Hostile(F, method="GET", path=AUDIT, query={"rho_min": "abc"}, param="rho_min"),
    Hostile(F, method="GET", path=AUDIT, query={"rho_min": "nan"}, param="rho_min"),
    Hostile(F, method="GET", path=AUDIT, query={"rho_max": "inf"}, param="rho_max"),
    Hostile(F, method="GET", path=AUDIT, query={"rho_min": "-1"}, param="rho_min"),
    Hostile(F, method="GET", path=AUDIT, query={"fidelity_min": "nan"}, param="fidelity_min"),
    Hostile(F, method="GET", path=AUDIT, query={"fidelity_max": "1e999"}, param="fidelity_max"),
    Hostile(F, method="GET", path=AUDIT, query={"since": "yesterday"}, param="since"),
    Hostile(F, method="GET", path=AUDIT, query={"since": "nan"}, param="since"),
    Hostile(F, method="GET", path=AUDIT, query={"since": "1e999"}, param="since"),
    Hostile(F, method="GET", path=AUDIT, query={"until": "-inf"}, param="until"),
    Hostile(F, method="GET", path=AUDIT, query={"until": "1e300"}, param="until"),
    Hostile(F, method="GET", path=AUDIT, query={"since": "2026-13-45T00:00:00Z"}, param="since"),
    Hostile(F, method="GET", path=AUDIT, query={"since": "2026-01-01T00:00:00"}, param="since"),
    Hostile(F, method="GET", path=AUDIT, query={"limit": "0"}, param="limit"),
    Hostile(F, method="GET", path=AUDIT, query={"limit": "-5"}, param="limit"),
    Hostile(F, method="GET", path=AUDIT, query={"limit": "1000000000"}, param="limit"),
    Hostile(F, method="GET", path=AUDIT, query={"limit": "abc"}, param="limit"),
    Hostile(F, method="GET", path=AUDIT, query={"cursor": "garbage"}, param="cursor"),
    Hostile(F, method="GET", path=AUDIT, query={"cursor": ""}, param="cursor"),
    Hostile(F, method="GET", path=AUDIT, query={"cursor": "' OR 1=1 --"}, param="cursor"),
    Hostile(F, method="GET", path=AUDIT, query={"cursor": _cursor({"before": -1})}, param="cursor"),
    Hostile(F, method="GET", path=AUDIT, query={"cursor": _cursor({"before": "1 OR 1=1"})}, param="cursor"),
    Hostile(F, method="GET", path=AUDIT, query={"cursor": _cursor({"before": 10**30})}, param="cursor"),
    Hostile(F, method="GET", path=AUDIT, query={"cursor": _cursor({"before": 2**63})}, param="cursor"),
    Hostile(F, method="GET", path=AUDIT, query={"cursor": _cursor([1, 2])}, param="cursor"),
    Hostile(F, method="GET", path=AUDIT, query={"cursor": "x" * 10_000}, param="cursor"),
    # the request line belongs to the header section, whose size the server bounds (16 KiB)
    Hostile(F, method="GET", path=AUDIT, query={"cursor": "x" * 60_000}, status=431),
    Hostile(F, method="GET", path=AUDIT, query={"kind": "xyz"}, param="kind"),
    Hostile(F, method="GET", path=AUDIT, query={"status": "' OR 1=1 --"}, param="status"),
    Hostile(F, method="GET", path=AUDIT, query={"block": "' OR '1'='1"}, status=200),
    Hostile(F, method="GET", path=AUDIT, query={"model": "%' OR 1=1 --"}, status=200),
    Hostile(F, method="GET", path=AUDIT + "/no-such-record", status=404, param="id"),
    Hostile(F, method="GET", path=AUDIT + "/" + "r" * 10_000, status=404, param="id"),
    Hostile(F, method="GET", path=AUDIT + "/x/report", query={"format": "pdf"}, param="format"),
    Hostile(F, method="POST", path=AUDIT + "/%27%20OR%201%3D1/replay", status=404, param="id"),
    Hostile(F, method="POST", path=AUDIT + "/purge", body={"before": "soon"}, param="before"),
    Hostile(F, method="POST", path=AUDIT + "/purge", body={"before": float("nan")}, param="before"),
    Hostile(F, method="POST", path=AUDIT + "/no-such-record/redact", body={"reason": "x"}, status=404, param="id"),
    # -- paths that try to leave their folder -------------------------------------------------------------
    Hostile(X, method="GET", path=AUDIT + "/..%2F..%2F..%2Fetc%2Fpasswd", status=404),
    Hostile(X, method="GET", path=AUDIT + "/..%2F..%2Fetc%2Fpasswd/report", status=404),
    Hostile(X, method="GET", path=AUDIT + "/%2e%2e%2f%2e%2e%2fserver.log", status=404),
    Hostile(X, method="GET", path=AUDIT + "/x/report", query={"format": "../../../etc/passwd"}, param="format"),
    Hostile(X, method="GET", path=AUDIT + "/..%5C..%5Cwindows%5Cwin.ini", status=404, param="id"),
    Hostile(X, method="GET", path=AUDIT + "/%00", status=404, param="id"),
    Hostile(X, method="GET", path="/static/..%2F..%2Fetc%2Fpasswd", status=404),
    Hostile(X, method="GET", path="/v1/audit/public-key/..%2F..%2Fsigning.pem", status=404),
    Hostile(X, method="GET", path="/%2e%2e/%2e%2e/etc/passwd", status=404),
    Hostile(X, method="DELETE", path="/v1/keys/..%2F..%2Fadmin", status=404),
    Hostile(X, method="POST", path=AUDIT + "/..%2Fverify/redact", body={"reason": "x"}, status=404),
    # -- unknown models and presets ------------------------------------------------------------------------
    Hostile(M, {"model": "gpt-4o"}, status=404, param="model"),
    Hostile(M, {"model": ""}, param="model"),
    Hostile(M, {"model": "../models/localist-test-tiny"}, status=404, param="model"),
    Hostile(M, {"model": "/etc/passwd"}, status=404, param="model"),
    Hostile(M, {"model": "x\x00y"}, status=404, param="model"),
    Hostile(M, {"model": None}, param="model"),
    Hostile(M, {"model": 7}, param="model"),
    Hostile(M, {"model": "gpt-4o", "prompt": "x"}, path=COMPLETIONS, status=404, param="model"),
    Hostile(M, {"locality": "ultra"}, param="locality"),
    Hostile(M, {"locality": "localist "}, param="locality"),
    Hostile(M, {"audit": "everything"}, param="audit"),
    Hostile(M, {"audit": ""}, param="audit"),
    Hostile(M, {"blocks": [{"label": "R1", "kind": "law", "text": "x"}]}, status=200),  # a free-form document kind
    # -- auth and headers ------------------------------------------------------------------------------------
    Hostile(A, method="GET", path="/v1/models", status=401, headers={"authorization": ""}),
    Hostile(A, method="GET", path="/v1/models", status=401, headers={"authorization": "Bearer"}),
    Hostile(A, method="GET", path="/v1/models", status=401, headers={"authorization": "Basic YWRtaW46YWRtaW4="}),
    Hostile(A, method="GET", path="/v1/models", status=401, headers={"authorization": "Bearer ' OR 1=1 --"}),
    Hostile(A, method="GET", path="/v1/models", status=401, headers={"authorization": "Bearer " + "k" * 4000}),
    Hostile(A, method="GET", path="/v1/models", status=401, headers={"authorization": b"Bearer lk_\xe9\xff"}),
    Hostile(A, method="GET", path="/v1/models", status=401, headers={"authorization": "Bearer lk_%00%00"}),
    Hostile(A, method="GET", path=AUDIT, status=401, headers={"authorization": "bearer"}),
    Hostile(A, method="POST", path="/v1/keys", body={"tenant": "x", "admin": True}, status=401,
            headers={"authorization": "Bearer lk_0000000000000000_" + "x" * 40}),
    Hostile(A, method="GET", path="/v1/models", status=200, headers={"x-request-id": "<script>" * 200}),
    Hostile(A, method="GET", path="/v1/models", status=431, headers={"x-big": "h" * 200_000}),
    Hostile(A, method="GET", path="/v1/models", status=431, headers={f"x-h{i}": "v" * 100 for i in range(2000)}),
    Hostile(A, method="POST", path="/v1/keys", body={"tenant": "", "name": "x"}, param="tenant"),
    Hostile(A, method="POST", path="/v1/keys", body={"tenant": "t", "rate_limit_per_min": -1},
            param="rate_limit_per_min"),
    Hostile(A, method="POST", path="/v1/keys", body={"tenant": "t", "max_concurrency": 10**30},
            param="max_concurrency"),
    Hostile(A, method="POST", path="/v1/keys", body={"tenant": "t", "admin": "yes"}, param="admin"),
]


def _request_count(server) -> int:
    return server.sql("SELECT COUNT(*) FROM audit_records WHERE kind = 'request'")[0][0]


def _send(server, case: Hostile) -> httpx.Response:
    if case.raw is not None:
        content = case.raw.replace(b"{model}", server.model.encode())
    elif case.body is not None or case.path in (CHAT, COMPLETIONS):
        body = case.body or {}
        if case.path in (CHAT, COMPLETIONS):
            base = {"model": server.model, "max_tokens": 1}
            body = {**base, **({"messages": MSG} if case.path == CHAT else {}), **body}
        content = json.dumps(body).encode()  # NaN and ±inf as the literals Python writes
    else:
        content = None
    headers = {k.lower(): v for k, v in server.headers().items()}
    headers |= {"content-type": "application/json"} if content is not None else {}
    headers |= {k.lower(): v for k, v in case.headers.items()}
    headers = {k: v for k, v in headers.items() if not (k == "content-type" and v == "")}
    with httpx.Client(base_url=server.base_url, timeout=60) as client:
        try:
            return client.request(case.method, case.path, content=content, params=case.query,
                                  headers=headers)
        except httpx.RemoteProtocolError:  # the server closed the connection: an accepted answer, as 0
            return httpx.Response(0)


TALLY: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)


def _ids() -> list[str]:
    seen: collections.Counter = collections.Counter()
    out = []
    for case in CASES:
        seen[case.category] += 1
        out.append(f"{case.category.replace(' ', '-')}-{seen[case.category]}")
    return out


def test_the_corpus_covers_every_category():
    per = collections.Counter(c.category for c in CASES)
    assert len(CASES) >= 200 and min(per.values()) >= 10, per


@pytest.mark.parametrize("case", CASES, ids=_ids())
def test_hostile_request(localist_server, case):
    before = _request_count(localist_server)
    r = _send(localist_server, case)
    TALLY[case.category][f"{r.status_code // 100}xx" if r.status_code else "closed"] += 1
    assert r.status_code < 500, r.text[:2000]
    if case.status == 431:  # a header section over the limit: 431, or closed while the client still sends it
        assert r.status_code in (431, 0), r.status_code
    else:
        assert r.status_code == case.status, r.text[:2000]
    if r.status_code >= 400 and r.headers.get("content-type", "").startswith("application/json"):
        assert r.json()["error"]["param"] == case.param, r.json()
    if r.status_code >= 400 and case.path in (CHAT, COMPLETIONS):
        assert _request_count(localist_server) == before  # nothing stored, not even half
    assert httpx.get(localist_server.base_url + "/health", timeout=30).status_code == 200


def test_report_tally():
    """Writes the per-category counts (after the corpus ran in this session)."""
    for category, counts in sorted(TALLY.items()):
        record("hostile", category=category, tried=sum(counts.values()), **counts)


async def test_user_strings_are_escaped_in_the_html_report(localist_server, api):
    label, text = "<script>alert('L')</script>", "<img src=x onerror=alert('T')>"
    question = "\"><svg onload=alert('Q')>"
    body = {"model": localist_server.model, "messages": [{"role": "user", "content": question}], "max_tokens": 2,
            "blocks": [{"label": label, "kind": "rule", "text": text}], "target_block": label}
    r = await api.post(CHAT, json=body, headers={"x-request-id": "req-<b>x</b>"})
    assert r.status_code == 200, r.text
    page = (await api.get(f"{AUDIT}/{r.json()['id']}/report", params={"format": "html"})).text
    for raw in (label, text, question, "<b>x</b>"):
        assert raw not in page
    assert "&lt;script&gt;alert(" in page  # the label is shown, escaped


async def test_export_stays_in_its_folder(localist_server, api, tmp_path):
    """A record id edited in the database to climb out of the export folder does not write outside it."""
    rid = (await api.post(CHAT, json={"model": localist_server.model, "messages": MSG, "max_tokens": 1})).json()["id"]
    escape = "../../escaped-" + rid
    out = tmp_path / "a" / "b" / "out"
    localist_server.sql("UPDATE audit_records SET record_id = :new WHERE record_id = :old", new=escape, old=rid)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "localist.clients.cli", "audit", "export", "--out", str(out), "--format", "json",
             "--url", localist_server.base_url, "--api-key", localist_server.admin_key, "--limit", "3"],
            capture_output=True, text=True, env=server_env(localist_server.home), timeout=120)
    finally:
        localist_server.sql("UPDATE audit_records SET record_id = :old WHERE record_id = :new", new=escape, old=rid)
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert all(out in p.parents for p in written), (written, done.stdout, done.stderr)
