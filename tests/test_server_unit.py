"""Server pieces that need no engine: dev-mode decision on a real store, the stand-in model, error params."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from localist.server.app import Settings, decide_dev_mode
from localist.server.cli import stand_in_model
from localist.server.errors import _loc_to_param
from localist.server.store import AuditStore


def _settings(tmp_path: Path, admin_token: str | None = None) -> Settings:
    return Settings(model_dir=tmp_path, model_name="m", db_url=f"sqlite:///{tmp_path / 'a.db'}",
                    admin_token=admin_token)


async def test_no_key_means_dev_mode_said_loudly(tmp_path, caplog):
    settings = _settings(tmp_path)
    with AuditStore(settings.db_url) as store, caplog.at_level(logging.WARNING, logger="localist.server"):
        assert await decide_dev_mode(store, settings) is True
        assert "LOCAL DEV MODE" in caplog.text
        caplog.clear()
        _, key = store.create_key(tenant="t", name="k")
        assert await decide_dev_mode(store, settings) is False
        assert "LOCAL DEV MODE" not in caplog.text
        store.revoke_key(key.key_id)
        assert await decide_dev_mode(store, settings) is True  # only active keys count


async def test_bootstrap_admin_token_turns_auth_on(tmp_path):
    token = "lk_0123456789abcdef_" + "s" * 43
    settings = _settings(tmp_path, admin_token=token)
    with AuditStore(settings.db_url) as store:
        assert await decide_dev_mode(store, settings) is False
        assert await decide_dev_mode(store, settings) is False  # importing again is idempotent
        key = store.verify_key(token)
        assert key is not None and key.admin and key.tenant == "admin"
        assert len(store.list_keys()) == 1


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
