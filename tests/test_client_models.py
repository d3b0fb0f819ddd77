"""The client's mirrored models must match the server's wire models field for field.

Two sources are checked: ``localist.server.schemas`` (where the fields are defined) and
``openapi.yaml`` (what the served app publishes). Names, normalised JSON types, constraints and the
required set are compared; titles, descriptions and defaults are documentation and are ignored.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from localist.clients import models as client_models

ROOT = Path(__file__).resolve().parents[1]
IGNORED_KEYS = {"title", "description", "default", "examples"}


def _ref_name(ref: str) -> str:
    name = ref.rsplit("/", 1)[-1]
    for suffix in ("-Input", "-Output"):
        name = name.removesuffix(suffix)
    return name


def normalise(node: Any) -> Any:
    """A JSON-schema fragment with documentation dropped and references reduced to the model name."""
    if isinstance(node, dict):
        if "$ref" in node:
            return {"ref": _ref_name(node["$ref"])}
        return {k: normalise(v) for k, v in sorted(node.items()) if k not in IGNORED_KEYS}
    if isinstance(node, list):
        return [normalise(v) for v in node]
    return node


def shape(schema: dict) -> dict:
    return {
        "properties": {name: normalise(prop) for name, prop in schema.get("properties", {}).items()},
        "required": sorted(schema.get("required", [])),
    }


def client_shape(model) -> dict:
    return shape(model.model_json_schema(ref_template="#/components/schemas/{model}"))


@pytest.mark.parametrize("model", client_models.WIRE_MODELS, ids=lambda m: m.__name__)
def test_mirrors_server_schemas(model):
    from localist.server import schemas

    server_model = getattr(schemas, model.__name__, None)
    assert server_model is not None, f"server/schemas.py has no model {model.__name__}"
    assert client_shape(model) == client_shape(server_model)


def _openapi_schemas() -> dict[str, dict]:
    path = ROOT / "openapi.yaml"
    assert path.exists(), "openapi.yaml is missing at the repository root (the server generates it)"
    found = yaml.safe_load(path.read_text())["components"]["schemas"]
    return {_ref_name(name): schema for name, schema in found.items()}


# SSE events are not response models of any route, so OpenAPI cannot publish them; they are checked
# against server/schemas.py above.
STREAM_ONLY = {"ChatDelta", "ChatChunkChoice", "ChatCompletionChunk"}


@pytest.mark.parametrize("model", [m for m in client_models.WIRE_MODELS if m.__name__ not in STREAM_ONLY],
                         ids=lambda m: m.__name__)
def test_mirrors_openapi(model):
    published = _openapi_schemas()
    assert model.__name__ in published, f"openapi.yaml has no schema {model.__name__}"
    assert client_shape(model) == shape(published[model.__name__])


def test_every_server_response_model_is_mirrored():
    """A model added to the server's responses must reach the client too."""
    from pydantic import BaseModel

    from localist.server import schemas

    mirrored = {m.__name__ for m in client_models.WIRE_MODELS}
    response_models = {
        name for name, obj in vars(schemas).items()
        if isinstance(obj, type) and issubclass(obj, schemas._Response) and obj is not schemas._Response
    }
    assert response_models - mirrored == set()
    assert all(issubclass(m, BaseModel) for m in client_models.WIRE_MODELS)


def test_client_accepts_unknown_fields_from_a_newer_server():
    usage = client_models.Usage.model_validate(
        {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7, "cached_tokens": 1}
    )
    assert usage.total_tokens == 7 and usage.model_extra == {"cached_tokens": 1}


def test_block_spec_rejects_bad_fields_by_name():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="label"):
        client_models.BlockSpec(label="", text="x")
    with pytest.raises(ValidationError, match="start"):
        client_models.BlockSpec(label="R1", start=-1, end=3)
