"""Arbitrary extension fields never crash the server: every answer is 200 or an OpenAI-shaped 4xx naming a field."""
from __future__ import annotations

import json

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

scalars = st.one_of(st.none(), st.booleans(), st.integers(-3, 100), st.floats(allow_nan=True, allow_infinity=True),
                    st.sampled_from(["balanced", "localist", "distributed", "sharp", "", "R1", "rule"]))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.sampled_from(
                                                           ["label", "kind", "text", "start", "end", "message",
                                                            "pinned", "evidence"]), inner, max_size=5)),
                      max_leaves=8)
block = st.fixed_dictionaries({"label": st.one_of(st.sampled_from(["R1", "R2", "D1"]), values)},
                              optional={"kind": st.one_of(st.sampled_from(["rule", "document", "sink"]), values),
                                        "text": st.one_of(st.text(max_size=30), values),
                                        "message": st.one_of(st.integers(-1, 3), values),
                                        "start": st.one_of(st.integers(-2, 40), values),
                                        "end": st.one_of(st.integers(-2, 40), values)})
extras = st.fixed_dictionaries({}, optional={
    "locality": st.one_of(values, st.lists(st.floats(-0.5, 1.5), min_size=1, max_size=3)),
    "blocks": st.one_of(st.lists(block, max_size=4), values),
    "target_block": values,
    "audit": st.one_of(st.sampled_from(["summary", "per_token", "per_layer"]), values),
})


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(extra=extras)
def test_extension_fields_fuzz(localist_server, extra):
    body = {"model": localist_server.model, "messages": [{"role": "user", "content": "Which rule applies here?"}],
            "max_tokens": 1, **extra}
    # NaN and ±inf go out as the literals Python's json writes (httpx's json= refuses them)
    r = httpx.post(localist_server.base_url + "/v1/chat/completions", content=json.dumps(body),
                   headers={**localist_server.headers(), "content-type": "application/json"}, timeout=60)
    assert r.status_code in (200, 400), (r.status_code, r.text, body)
    if r.status_code == 400:
        err = r.json()["error"]
        assert err["type"] == "invalid_request_error" and err["message"]
        top = (err["param"] or "").split("[")[0].split(".")[0]
        assert top in ("locality", "blocks", "target_block", "audit"), err
    else:
        assert r.json()["localist"]["choices"][0]["num_tokens"] == 1
