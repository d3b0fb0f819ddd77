"""Server pieces that need no engine: the stand-in model, error params (dev mode: test_auth_dev_mode.py)."""
from __future__ import annotations

import json

import pytest

from localist.server.cli import stand_in_model
from localist.server.errors import _loc_to_param


def test_stand_in_model_is_generated_once(tmp_path, monkeypatch):
    monkeypatch.setenv("LOCALIST_HOME", str(tmp_path))
    path = stand_in_model()
    assert path == tmp_path / "stand-in" / "localist-tiny"
    config = json.loads((path / "config.json").read_text())
    assert config["num_hidden_layers"] >= 1 and list(path.glob("*.safetensors"))
    mtime = (path / "config.json").stat().st_mtime_ns
    assert stand_in_model() == path and (path / "config.json").stat().st_mtime_ns == mtime


@pytest.mark.parametrize("loc,param", [
    (("body", "messages", 0, "content"), "messages[0].content"),
    (("body", "locality", "float"), "locality"),
    (("body", "locality", "list[float]", 2), "locality[2]"),
    (("body", "locality", "literal['distributed','balanced','localist']"), "locality"),
    (("query", "rho_min"), "rho_min"),
    (("body",), None),
])
def test_validation_locations_become_field_names(loc, param):
    assert _loc_to_param(loc) == param
