"""openapi.yaml at the repository root is the served schema (regenerate: python -m localist.server.openapi > openapi.yaml)."""
from __future__ import annotations

import json
from pathlib import Path

import httpx
import yaml

from localist.server.openapi import schema

ROOT = Path(__file__).resolve().parents[1]
REGENERATE = "run `.venv/bin/python -m localist.server.openapi > openapi.yaml`"


def _normal(obj):
    return json.loads(json.dumps(obj))


def test_openapi_yaml_equals_the_app_schema():
    committed = yaml.safe_load((ROOT / "openapi.yaml").read_text())
    assert _normal(committed) == _normal(schema()), f"openapi.yaml is stale: {REGENERATE}"


def test_served_schema_equals_openapi_yaml(localist_server):
    served = httpx.get(localist_server.base_url + "/openapi.json", timeout=30).json()
    committed = yaml.safe_load((ROOT / "openapi.yaml").read_text())
    assert _normal(served) == _normal(committed), f"the running server's schema differs: {REGENERATE}"
    paths = set(served["paths"])
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/audit", "/v1/audit/{record_id}",
            "/v1/audit/{record_id}/report", "/v1/audit/verify", "/health", "/metrics"} <= paths
    chat = served["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    assert {"locality", "blocks", "target_block", "audit"} <= set(chat)
