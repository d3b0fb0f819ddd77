"""The OpenAI surface against the real server (uvicorn + vLLM on a tiny model): httpx and the official SDK."""
from __future__ import annotations

import asyncio
import json
import math

import httpx
import openai
import pytest

RULES = [
    {"label": "R1", "kind": "rule", "text": "Rule R1: A loan above 50000 EUR requires a second approval."},
    {"label": "R2", "kind": "rule", "text": "Rule R2: Claims filed more than 30 days late are not eligible."},
]
MESSAGES = [{"role": "user", "content": "Is a loan of 60000 EUR allowed with one approval?"}]


def chat_body(server, **extra):
    return {"model": server.model, "messages": MESSAGES, "max_tokens": 6, **extra}


def sse_events(text: str) -> list:
    events = []
    for block in text.strip().split("\n\n"):
        assert block.startswith("data: "), block
        payload = block[len("data: "):]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


async def audit_record(api, record_id: str, timeout: float = 10.0) -> dict:
    """Aborted requests are written in the background: poll briefly."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        r = await api.get(f"/v1/audit/{record_id}")
        if r.status_code == 200 or asyncio.get_running_loop().time() > deadline:
            return r
        await asyncio.sleep(0.2)


async def test_chat_completion_carries_localist_metrics(localist_server, api):
    r = await api.post("/v1/chat/completions", json=chat_body(
        localist_server, locality="balanced", blocks=RULES, target_block="R1", audit="per_token", temperature=0))
    assert r.status_code == 200, r.text
    body = r.json()
    assert r.headers["x-request-id"]
    choice = body["choices"][0]
    assert body["object"] == "chat.completion" and choice["message"]["role"] == "assistant"
    assert choice["finish_reason"] in ("length", "stop")
    loc = body["localist"]
    assert loc["audit_id"] == body["id"]
    assert loc["locality"] == {"rho": [0.5, 0.5], "preset": "balanced", "scope": "all"}
    labels = [b["label"] for b in loc["blocks"]]
    assert labels[0] == "sink" and labels[-1] == "response" and "R1" in labels and "R2" in labels
    r1 = labels.index("R1")
    assert [b["candidate"] for b in loc["blocks"]].count(True) == 2
    m = loc["choices"][0]
    n_out = body["usage"]["completion_tokens"]
    assert m["num_tokens"] == n_out == len(m["tokens"]) >= 1
    assert m["num_layers"] == 2 and m["num_heads"] == 4
    assert m["target_block"] == r1 and m["target_source"] == "request"
    assert math.isclose(sum(m["attribution"]), 1.0, abs_tol=1e-4)
    assert 0.0 <= m["pointer_fidelity"] <= 1.0
    assert m["sink_mass"] == pytest.approx(m["attribution"][0], abs=1e-6)
    assert m["entropy"]["total_bits"] == pytest.approx(m["entropy"]["total_nats"] / math.log(2), rel=1e-6)
    assert 0.0 <= m["entropy"]["block_nats"] <= m["entropy"]["total_nats"]
    assert m["theory"]["bound_held_entropy"] == 1.0
    assert m["theory"]["fidelity_predicted"] == pytest.approx(m["theory"]["fidelity_measured"], abs=1e-4)
    for t in m["tokens"]:
        assert math.isclose(sum(t["attribution"]), 1.0, abs_tol=1e-4)
    # per-token attribution averages to the response's
    mean = [sum(t["attribution"][g] for t in m["tokens"]) / n_out for g in range(len(labels))]
    assert mean == pytest.approx(m["attribution"], abs=1e-5)
    assert [t["token_id"] for t in m["tokens"]] and all(isinstance(t["text"], str) for t in m["tokens"])


async def test_dial_sharpens_attribution_onto_one_block(localist_server, api):
    """Same prompt: each head's top free block takes a larger share of the free mass as ρ grows, all of it
    at ρ = 1 (docs/theory.md §2; block 0, the sink, is the only pinned block)."""
    shares = []
    for rho in (0.0, 0.5, 1.0):
        r = await api.post("/v1/chat/completions", json=chat_body(
            localist_server, locality=rho, blocks=RULES, temperature=0, max_tokens=1, audit="per_layer"))
        heads = [h for layer in r.json()["localist"]["choices"][0]["tokens"][0]["layers"] for h in layer]
        shares.append(sum(max(h[1:]) / sum(h[1:]) for h in heads) / len(heads))
    assert shares[0] < shares[1] < shares[2]
    assert shares[2] == pytest.approx(1.0, abs=1e-5)


async def test_per_layer_audit_and_per_layer_dial(localist_server, api):
    r = await api.post("/v1/chat/completions", json=chat_body(
        localist_server, locality=[0.0, 0.8], blocks=RULES, audit="per_layer", max_tokens=2))
    assert r.status_code == 200, r.text
    loc = r.json()["localist"]
    assert loc["locality"] == {"rho": [0.0, 0.8], "preset": None, "scope": "all"}
    tok = loc["choices"][0]["tokens"][0]
    G = len(loc["blocks"])
    assert len(tok["layers"]) == 2 and len(tok["layers"][0]) == 4 and len(tok["layers"][0][0]) == G
    assert len(tok["layer_attribution"]) == 2


async def test_summary_level_has_no_token_detail(localist_server, api):
    r = await api.post("/v1/chat/completions", json=chat_body(localist_server, max_tokens=2))
    m = r.json()["localist"]["choices"][0]
    assert m["tokens"] is None and m["target_source"] in (None, "top_candidate")


async def test_n_seed_stop_and_max_completion_tokens(localist_server, api):
    body = chat_body(localist_server, n=3, seed=7, temperature=1.0, max_tokens=None, max_completion_tokens=5)
    a = (await api.post("/v1/chat/completions", json=body)).json()
    b = (await api.post("/v1/chat/completions", json=body)).json()
    assert [c["message"]["content"] for c in a["choices"]] == [c["message"]["content"] for c in b["choices"]]
    assert [c["index"] for c in a["choices"]] == [0, 1, 2]
    assert len(a["localist"]["choices"]) == 3
    assert a["usage"]["completion_tokens"] == sum(c["num_tokens"] for c in a["localist"]["choices"]) <= 15
    text = a["choices"][0]["message"]["content"]
    if len(text) > 2:  # stop at a string the unconstrained run produced: the output ends before it
        stop = text[1:3]
        c = (await api.post("/v1/chat/completions", json={**body, "n": 1, "stop": [stop]})).json()
        assert c["choices"][0]["finish_reason"] == "stop"
        assert stop not in c["choices"][0]["message"]["content"]


async def test_logprobs_chat_and_completions(localist_server, api):
    r = (await api.post("/v1/chat/completions", json=chat_body(
        localist_server, logprobs=True, top_logprobs=3, max_tokens=3, temperature=0))).json()
    content = r["choices"][0]["logprobs"]["content"]
    assert len(content) == r["usage"]["completion_tokens"]
    for entry in content:
        tops = entry["top_logprobs"]
        assert len(tops) == 3 and tops[0]["logprob"] >= tops[1]["logprob"] >= tops[2]["logprob"]
        assert entry["logprob"] == pytest.approx(tops[0]["logprob"], abs=1e-4)  # greedy picks the top token
    c = (await api.post("/v1/completions", json={"model": localist_server.model, "prompt": "Rule R1: A loan",
                                                   "max_tokens": 3, "logprobs": 2, "temperature": 0})).json()
    lp = c["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 3
    assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])
    assert all(math.isfinite(x) and x <= 0 for x in lp["token_logprobs"])


async def test_completions_with_spans_and_token_prompt(localist_server, api):
    prompt = "Rule R1: loans need two approvals. Question: which rule applies?"
    end = prompt.index(" Question")
    r = await api.post("/v1/completions", json={
        "model": localist_server.model, "prompt": prompt, "max_tokens": 4, "echo": True,
        "blocks": [{"label": "R1", "kind": "rule", "start": 0, "end": end}], "target_block": "R1"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["choices"][0]["text"].startswith(prompt)
    blocks = body["localist"]["blocks"]
    assert [b["label"] for b in blocks][:3] == ["sink", "R1", "prompt"]
    r2 = await api.post("/v1/completions", json={
        "model": localist_server.model, "prompt": [1, 40, 41, 42, 43, 44, 45], "max_tokens": 2,
        "blocks": [{"label": "D", "kind": "document", "start": 2, "end": 5}], "target_block": "D"})
    assert r2.status_code == 200, r2.text
    spans = [(b["label"], b["start"], b["end"]) for b in r2.json()["localist"]["blocks"]]
    assert ("D", 2, 5) in spans and r2.json()["usage"]["prompt_tokens"] == 7


async def test_streaming_chat_with_usage_and_attribution(localist_server, api):
    body = chat_body(localist_server, stream=True, stream_options={"include_usage": True}, locality=0.5,
                     blocks=RULES, max_tokens=5, n=2)
    r = await api.post("/v1/chat/completions", json=body)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    final = events[-2]
    assert final["choices"] == [] and final["usage"]["completion_tokens"] >= 2
    per_choice: dict[int, list] = {0: [], 1: []}
    text: dict[int, str] = {0: "", 1: ""}
    finishes = {}
    for e in events[:-2]:
        for c in e["choices"]:
            text[c["index"]] += c["delta"].get("content") or ""
            per_choice[c["index"]] += (c.get("localist") or {}).get("tokens", [])
            if c.get("finish_reason"):
                finishes[c["index"]] = c["finish_reason"]
    assert set(finishes) == {0, 1}
    total = sum(len(v) for v in per_choice.values())
    assert total == final["usage"]["completion_tokens"]
    for i, toks in per_choice.items():
        assert [t["index"] for t in toks] == list(range(len(toks)))
        assert final["localist"]["choices"][i]["num_tokens"] == len(toks)
    # the stored record holds exactly what was streamed
    rec = (await api.get(f"/v1/audit/{final['id']}")).json()
    assert rec["status"] == "completed"
    assert [c["text"] for c in rec["output"]["choices"]] == [text[0], text[1]]


async def test_streaming_completions(localist_server, api):
    r = await api.post("/v1/completions", json={"model": localist_server.model, "prompt": "Rule R3: Claims",
                                                  "max_tokens": 4, "stream": True})
    events = sse_events(r.text)
    assert events[-1] == "[DONE]" and events[-2]["localist"]["audit_id"] == events[0]["id"]
    assert "usage" not in events[-2]  # include_usage not asked
    assert all(e["object"] == "text_completion" for e in events[:-1])


async def test_models(localist_server, api):
    r = (await api.get("/v1/models")).json()
    assert r["object"] == "list" and r["data"][0]["id"] == localist_server.model
    info = r["data"][0]
    assert info["num_layers"] == 2 and len(info["weights_sha256"]) == 64 and info["stand_in"] is False


def test_openai_sdk_unchanged(localist_server):
    client = openai.OpenAI(base_url=localist_server.base_url + "/v1", api_key=localist_server.admin_key)
    models = client.models.list()
    assert [m.id for m in models.data] == [localist_server.model]
    r = client.chat.completions.create(
        model=localist_server.model, messages=MESSAGES, max_tokens=4, temperature=0, seed=1,
        extra_body={"locality": "localist", "blocks": RULES, "target_block": "R2", "audit": "per_token"})
    assert r.choices[0].message.content is not None and r.usage.completion_tokens >= 1
    loc = r.model_extra["localist"]
    assert loc["locality"]["preset"] == "localist" and loc["choices"][0]["target_source"] == "request"
    chunks = list(client.chat.completions.create(
        model=localist_server.model, messages=MESSAGES, max_tokens=4, stream=True,
        stream_options={"include_usage": True}, extra_body={"locality": 0.3}))
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert isinstance(streamed, str)
    comp = client.completions.create(model=localist_server.model, prompt="Rule R1:", max_tokens=3)
    assert comp.choices[0].finish_reason in ("length", "stop") and comp.model_extra["localist"]["audit_id"] == comp.id
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model=localist_server.model, messages=MESSAGES, extra_body={"locality": 2})
    assert exc.value.body["param"] == "locality"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=localist_server.base_url + "/v1", api_key="lk_wrong").models.list()


async def test_client_disconnect_aborts_and_is_stored(localist_server, api):
    """A streaming client that leaves mid-generation: the engine request is aborted, the record says so."""
    body = chat_body(localist_server, stream=True, max_tokens=400, temperature=1.0, seed=11, ignore_eos=True)
    first_id = None
    async with httpx.AsyncClient(base_url=localist_server.base_url, headers=localist_server.headers(),
                                 timeout=60) as client:
        async with client.stream("POST", "/v1/chat/completions", json=body) as resp:
            async for line in resp.aiter_lines():
                if line.startswith("data: {"):
                    event = json.loads(line[6:])
                    first_id = event["id"]
                    if any(c["delta"].get("content") for c in event["choices"]):
                        break
    assert first_id is not None
    r = await audit_record(api, first_id)
    assert r.status_code == 200, r.text
    rec = r.json()
    assert rec["status"] == "aborted" and "disconnect" in rec["error"]
    assert 1 <= len(rec["output"]["choices"][0]["token_ids"]) < 400


async def test_non_streaming_disconnect_aborts(localist_server, api):
    # 8 × 480 tokens take several seconds even where one choice takes about one
    body = chat_body(localist_server, max_tokens=480, temperature=1.0, seed=11, ignore_eos=True, n=8)
    before = (await api.get("/v1/audit", params={"status": "aborted", "limit": 1000})).json()["data"]
    async with httpx.AsyncClient(base_url=localist_server.base_url, headers=localist_server.headers()) as client:
        with pytest.raises(httpx.ReadTimeout):
            await client.post("/v1/chat/completions", json=body, timeout=httpx.Timeout(60, read=0.5))
    for _ in range(50):
        after = (await api.get("/v1/audit", params={"status": "aborted", "limit": 1000})).json()["data"]
        if len(after) > len(before):
            break
        await asyncio.sleep(0.2)
    new = [r for r in after if r["id"] not in {b["id"] for b in before}]
    assert len(new) == 1 and new[0]["status"] == "aborted"
    rec = (await api.get(f"/v1/audit/{new[0]['id']}")).json()
    assert len(rec["output"]["choices"]) == 8
    assert all(len(c["token_ids"]) < 480 for c in rec["output"]["choices"])
    # the engine dropped all eight (generating the rest would take seconds)
    assert (await api.get("/health")).json()["engine_requests"] == 0


async def test_streamed_token_metrics_equal_the_final_record(localist_server, api):
    """Per-token attribution/fidelity sent while streaming (computed per delta) equal the final per-token record."""
    body = chat_body(localist_server, stream=True, locality=0.6, blocks=RULES, target_block="R2",
                     audit="per_token", max_tokens=8, ignore_eos=True)
    events = sse_events((await api.post("/v1/chat/completions", json=body)).text)
    streamed = [t for e in events[:-2] for c in e["choices"] for t in (c.get("localist") or {}).get("tokens", [])]
    final = events[-2]["localist"]["choices"][0]["tokens"]
    assert len(streamed) == len(final) == 8
    for s, f in zip(streamed, final):
        assert s["index"] == f["index"] and s["token_id"] == f["token_id"]
        assert s["attribution"] == pytest.approx(f["attribution"], abs=1e-6)
        assert s["pointer_fidelity"] == pytest.approx(f["pointer_fidelity"], abs=1e-6)
