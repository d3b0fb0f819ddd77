"""Schema-driven fuzzing of every endpoint in openapi.yaml against the real server.

Requests are generated from the published schema itself (bodies, query and path parameters), then
half of them get one field replaced by an arbitrary JSON value of the wrong shape. Whatever arrives,
the answer is never a 5xx and never a hang; an error is OpenAI-shaped and its `param`, when given,
names a field the operation takes. Generation is bounded (``max_tokens`` ≤ 4, ``n`` ≤ 2, short
strings) so that `make test` stays within about 3 minutes; `make reliability` tries more examples.
"""
from __future__ import annotations

import json
import math
import urllib.parse
from pathlib import Path

import httpx
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reliability_figures import FULL, record

SPEC = yaml.safe_load((Path(__file__).resolve().parents[1] / "openapi.yaml").read_text())
EXAMPLES = 150 if FULL else 25
# Operations that would erase or revoke the session server's shared state run with the tenant key,
# which may not perform them (403): their input is still parsed and checked.
TENANT_ONLY = {("post", "/v1/audit/purge"), ("delete", "/v1/keys/{key_id}"), ("post", "/v1/audit/{record_id}/redact")}
BOUNDED = {"max_tokens": 4, "max_completion_tokens": 4, "n": 2}

json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(), st.text(max_size=20)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)),
    max_leaves=6)


def _resolve(schema: dict) -> dict:
    while "$ref" in schema:
        schema = SPEC["components"]["schemas"][schema["$ref"].rsplit("/", 1)[-1]]
    return schema


def from_schema(schema: dict, depth: int = 0) -> st.SearchStrategy:
    """Values the schema allows (bounded in size); falls back to any JSON value."""
    schema = _resolve(schema)
    if "const" in schema:
        return st.just(schema["const"])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    if "anyOf" in schema or "oneOf" in schema:
        return st.one_of([from_schema(s, depth) for s in schema.get("anyOf", schema.get("oneOf"))])
    kind = schema.get("type")
    if kind == "string":
        return st.text(min_size=schema.get("minLength", 0), max_size=min(schema.get("maxLength", 40), 40))
    if kind in ("integer", "number"):
        lo = schema.get("minimum", schema.get("exclusiveMinimum"))
        hi = schema.get("maximum", schema.get("exclusiveMaximum"))
        if kind == "integer":
            return st.integers(None if lo is None else math.ceil(lo), None if hi is None else math.floor(hi))
        return st.floats(lo, hi, allow_nan=False, exclude_min="exclusiveMinimum" in schema)
    if kind == "boolean":
        return st.booleans()
    if kind == "null":
        return st.none()
    if kind == "array":
        if depth > 3:
            return st.just([])
        return st.lists(from_schema(schema.get("items", {}), depth + 1), min_size=schema.get("minItems", 0),
                        max_size=max(schema.get("minItems", 0), 3))
    if kind == "object" or "properties" in schema:
        props = schema.get("properties", {})
        required = set(schema.get("required", []))
        return st.fixed_dictionaries({k: from_schema(v, depth + 1) for k, v in props.items() if k in required},
                                     optional={k: from_schema(v, depth + 1) for k, v in props.items()
                                               if k not in required})
    return json_values


def _bounded(body):
    if isinstance(body, dict):
        for name, cap in BOUNDED.items():
            if isinstance(body.get(name), int) and not isinstance(body[name], bool):
                body[name] = min(body[name], cap)
    return body


@st.composite
def hostile(draw, valid: st.SearchStrategy):
    """A schema-valid value, or one with a single top-level field replaced by any JSON value."""
    value = draw(valid)
    if isinstance(value, dict) and draw(st.booleans()):
        value[draw(st.sampled_from(sorted(value) + ["unexpected"]))] = draw(json_values)
    return value


OPERATIONS = [(method, path, op) for path, ops in SPEC["paths"].items() for method, op in ops.items()]


def _fields(op: dict) -> set[str]:
    names = {p["name"] for p in op.get("parameters", [])} | {"id", "key_id", "unexpected"}
    body = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
    if body:
        names |= set(_resolve(body).get("properties", {}))
    return names


@pytest.mark.parametrize("method,path,op", OPERATIONS, ids=[f"{m.upper()} {p}" for m, p, _ in OPERATIONS])
def test_schema_fuzz(localist_server, method, path, op):
    params = {p["name"]: p for p in op.get("parameters", [])}
    query = st.fixed_dictionaries({}, optional={n: from_schema(p["schema"]) for n, p in params.items()
                                                if p["in"] == "query"})
    path_values = st.fixed_dictionaries({n: st.text(min_size=1, max_size=30) for n, p in params.items()
                                         if p["in"] == "path"})
    schema = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
    body = hostile(from_schema(schema)) if schema else st.none()
    key = localist_server.tenant_key if (method, path) in TENANT_ONLY else localist_server.admin_key
    statuses: dict[int, int] = {}

    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(query=query, path_values=path_values, body=body)
    def check(query, path_values, body):
        url = path
        for name, value in path_values.items():
            url = url.replace("{" + name + "}", urllib.parse.quote(value, safe=""))
        query = {k: json.dumps(v) if isinstance(v, (list, dict)) else ("" if v is None else str(v))
                 for k, v in query.items()}
        content = json.dumps(_bounded(body)).encode() if schema else None
        r = httpx.request(method, localist_server.base_url + url, params=query, content=content, timeout=60,
                          headers={"Authorization": f"Bearer {key}", "content-type": "application/json"})
        statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
        assert r.status_code < 500, (r.status_code, r.text[:1000], url, query, body)
        if r.status_code >= 400:
            err = r.json()["error"]
            assert err["message"] and err["type"], err
            if err["param"]:
                top = err["param"].split("[")[0].split(".")[0]
                assert top in _fields(op), (err, body, query)

    check()
    record("schema fuzz", operation=f"{method.upper()} {path}", tried=sum(statuses.values()),
           **{f"{s // 100}xx": sum(n for c, n in statuses.items() if c // 100 == s // 100) for s in statuses})
