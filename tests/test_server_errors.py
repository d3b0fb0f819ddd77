"""Bad input: a 4xx whose `error.param` names the field, the server stays up, nothing is stored."""
from __future__ import annotations

import pytest

MSG = [{"role": "user", "content": "Which rule applies?"}]
RULE = {"label": "R1", "kind": "rule", "text": "Rule R1: loans need two approvals."}

# (extension fields or overrides of a valid chat request, expected status, expected param)
CHAT_CASES = [
    ({"locality": 1.5}, 400, "locality"),
    ({"locality": -0.1}, 400, "locality"),
    ({"locality": [0.1]}, 400, "locality"),
    ({"locality": [0.1, 0.2, 0.3]}, 400, "locality"),
    ({"locality": [0.1, 2.0]}, 400, "locality[1]"),
    ({"locality": "sharp"}, 400, "locality"),
    ({"locality": True}, 400, "locality"),
    ({"blocks": [RULE, {**RULE, "text": "again"}]}, 400, "blocks[1].label"),
    ({"blocks": [{"label": "E", "text": ""}]}, 400, "blocks[0].text"),
    ({"blocks": [{"label": "S", "message": 0, "start": 5, "end": 5}]}, 400, "blocks[0]"),
    ({"blocks": [{"label": "S", "message": 0, "start": 0, "end": 999}]}, 400, "blocks[0].end"),
    ({"blocks": [{"label": "S", "message": 3, "start": 0, "end": 2}]}, 400, "blocks[0].message"),
    ({"blocks": [{"label": "A", "message": 0, "start": 0, "end": 8},
                 {"label": "B", "message": 0, "start": 4, "end": 10}]}, 400, "blocks[1]"),
    ({"blocks": [{"label": "S", "start": 0, "end": 3}]}, 400, "blocks[0].message"),
    ({"blocks": [{"label": "S", "kind": "response", "text": "x"}]}, 400, "blocks[0].kind"),
    ({"blocks": [{"label": "S", "text": "x", "start": 0, "end": 1}]}, 400, "blocks[0]"),
    ({"blocks": [{"label": f"R{i}", "text": f"rule {i}"} for i in range(70)]}, 400, "blocks"),
    ({"blocks": [RULE], "target_block": "R9"}, 400, "target_block"),
    ({"blocks": [RULE], "target_block": 99}, 400, "target_block"),
    ({"target_block": "user-0"}, 400, "target_block"),
    ({"audit": "everything"}, 400, "audit"),
    ({"temperature": "hot"}, 400, "temperature"),
    ({"temperature": 3.0}, 400, "temperature"),
    ({"max_tokens": 0}, 400, "max_tokens"),
    ({"max_tokens": "5"}, 400, "max_tokens"),
    ({"max_tokens": 100000}, 400, "max_tokens"),
    ({"n": 0}, 400, "n"),
    ({"seed": 2**70}, 400, "seed"),
    ({"stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"stop": [""]}, 400, "stop[0]"),
    ({"top_logprobs": 2}, 400, "top_logprobs"),
    ({"messages": []}, 400, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role"),
    ({"messages": [{"role": "user"}]}, 400, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "word " * 600}]}, 400, "messages"),
    ({"model": "gpt-4o"}, 404, "model"),
]


def _count(localist_server) -> int:
    return localist_server.sql("SELECT COUNT(*) FROM audit_records WHERE kind = 'request'")[0][0]


@pytest.mark.parametrize("extra,status,param", CHAT_CASES, ids=[c[2] + ":" + str(i) for i, c in enumerate(CHAT_CASES)])
async def test_chat_bad_input(localist_server, api, extra, status, param):
    before = _count(localist_server)
    body = {"model": localist_server.model, "messages": MSG, "max_tokens": 2, **extra}
    r = await api.post("/v1/chat/completions", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param, err
    assert param.split("[")[0].split(".")[0] in err["message"]
    assert err["type"] == ("not_found_error" if status == 404 else "invalid_request_error")
    assert _count(localist_server) == before  # nothing stored, not even half
    assert (await api.get("/health")).status_code == 200


@pytest.mark.parametrize("raw,param", [
    ('{"model": "x", "messages": [', None),
    ('{"model": "x", "messages": [{"role": "user", "content": "x"}], "locality": NaN}', "locality"),
    ('{"model": "x", "messages": [{"role": "user", "content": "x"}], "locality": Infinity}', "locality"),
    ('[1, 2]', None),
])
async def test_malformed_json_and_non_finite(localist_server, api, raw, param):
    body = raw.replace('"x"', f'"{localist_server.model}"', 1)
    r = await api.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


@pytest.mark.parametrize("extra,param", [
    ({"prompt": ""}, "prompt"),
    ({"prompt": [1, 2, 99999]}, "prompt[2]"),
    ({"prompt": [1, 2, 3], "blocks": [{"label": "D", "start": 0, "end": 2}]}, "blocks[0].start"),
    ({"prompt": [1, 2, 3], "blocks": [{"label": "D", "text": "x"}]}, "blocks"),
    ({"prompt": "abc", "blocks": [{"label": "D", "start": 1, "end": 9}]}, "blocks[0].end"),
    ({"prompt": "abc", "blocks": [{"label": "D", "message": 0, "start": 0, "end": 1}]}, "blocks[0].message"),
    ({"prompt": "abc", "logprobs": 9}, "logprobs"),
])
async def test_completions_bad_input(localist_server, api, extra, param):
    before = _count(localist_server)
    r = await api.post("/v1/completions", json={"model": localist_server.model, "max_tokens": 2, **extra})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    assert _count(localist_server) == before


async def test_auth_errors(localist_server):
    import httpx

    async with httpx.AsyncClient(base_url=localist_server.base_url) as client:
        r = await client.get("/v1/models")
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        r = await client.get("/v1/models", headers={"Authorization": "Bearer lk_0123456789abcdef_" + "x" * 40})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
