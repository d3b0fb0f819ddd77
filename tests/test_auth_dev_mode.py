"""Local dev mode: on only while the audit store has never held an API key, off for good the
moment any process creates one. The store and the start-up decision on SQLite and PostgreSQL, then real
servers: keys created by the CLI while one server runs (SQLite), and through the API of one of two
servers sharing a PostgreSQL database; every sequence ends with 401 / 403 / 404 where it must."""
from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from alembic import command
from alembic.config import Config

from conftest import MODEL_NAME, ports_in, server_env, serving
from localist.server.app import Settings, start_auth
from localist.server.auth import DEV_MODE_ENDED, DevModeRefused
from localist.server.store import AuditStore
from localist.server.store.store import MIGRATIONS
from pg import fresh_database, postgres_server

PORTS = range(18200, 18220)  # the ports these tests' servers may take
MADE_UP_KEY = "lk_0123456789abcdef_" + "m" * 43
MSG = [{"role": "user", "content": "Does rule R1 apply?"}]


@pytest.fixture(scope="module")
def pg_admin_url():
    with postgres_server() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path):
    """A fresh, empty audit database on each backend."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'audit.db'}"
    return fresh_database(request.getfixturevalue("pg_admin_url"))


def sql(url: str, statement: str) -> None:
    """Change the database behind the store's back (what someone holding the database could do)."""
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text(statement))
    engine.dispose()


def downgrade(url: str, revision: str) -> None:
    engine = sa.create_engine(url)
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, revision)
    engine.dispose()


def settings(url: str, **over) -> Settings:
    return Settings(model_dir=Path("."), model_name="m", db_url=url, **{"host": "127.0.0.1", **over})


# -- the store remembers --------------------------------------------------------------------------


def test_the_store_remembers_it_has_had_keys(url):
    with AuditStore(url) as server_store, AuditStore(url) as cli_store:
        assert server_store.keys_ever_created() is False
        _, key = cli_store.create_key(tenant="acme", name="k", actor="cli")  # another process's store
        assert server_store.keys_ever_created() is True
        cli_store.revoke_key(key.key_id)
        assert server_store.keys_ever_created() is True
        assert server_store.verify().ok


def test_clearing_the_mark_or_the_key_table_by_hand_does_not_reopen_dev_mode(url):
    with AuditStore(url) as store:
        store.create_key(tenant="acme", name="k")
        sql(url, "UPDATE auth_state SET first_key_us = NULL")
        assert store.keys_ever_created() is True  # the key row still says so
        sql(url, "DELETE FROM api_keys")
        sql(url, "UPDATE auth_state SET first_key_us = 1")
        assert store.keys_ever_created() is True  # the mark still says so
        sql(url, "DELETE FROM auth_state")
        assert store.keys_ever_created() is True  # no mark row at all: fail closed


def test_migrating_a_store_that_had_keys_marks_it(url, tmp_path):
    with AuditStore(url) as store:
        _, key = store.create_key(tenant="acme", name="k")
        store.revoke_key(key.key_id)
    downgrade(url, "0001")  # as a store written before the mark existed
    with AuditStore(url) as store:  # opening migrates it to head
        assert store.keys_ever_created() is True
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT first_key_us FROM auth_state")).scalar_one() == key.created_us
    engine.dispose()

    empty = f"sqlite:///{tmp_path / 'empty.db'}"
    AuditStore(empty).close()
    downgrade(empty, "0001")
    with AuditStore(empty) as store:
        assert store.keys_ever_created() is False


# -- start-up and the per-request check (no engine) -----------------------------------------------


async def test_dev_mode_starts_loudly_and_ends_for_good_when_another_process_creates_a_key(url, caplog):
    with AuditStore(url) as store, caplog.at_level(logging.INFO, logger="localist.server"):
        dev = await start_auth(store, settings(url))
        assert dev.on and "LOCAL DEV MODE: this audit store has never held an API key" in caplog.text
        assert await dev.refresh() is True
        with AuditStore(url) as cli_store:
            _, key = cli_store.create_key(tenant="acme", name="k", actor="cli")
            assert await dev.refresh() is False
            cli_store.revoke_key(key.key_id)  # the last key
        assert await dev.refresh() is False
        assert caplog.text.count(DEV_MODE_ENDED) == 1
        caplog.clear()
        restarted = await start_auth(store, settings(url))
        assert not restarted.on and "LOCAL DEV MODE" not in caplog.text
        assert "authentication on" in caplog.text


async def test_bootstrap_admin_token_means_keys_from_the_start(tmp_path):
    token = "lk_0123456789abcdef_" + "s" * 43
    url = f"sqlite:///{tmp_path / 'a.db'}"
    with AuditStore(url) as store:
        assert not (await start_auth(store, settings(url, admin_token=token))).on
        assert not (await start_auth(store, settings(url, admin_token=token))).on  # importing again: same key
        key = store.verify_key(token)
        assert key is not None and key.admin and key.tenant == "admin"
        assert len(store.list_keys()) == 1


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.1", "example.org", None])
async def test_dev_mode_on_the_network_is_refused_unless_asked_for(host, tmp_path, caplog):
    url = f"sqlite:///{tmp_path / 'a.db'}"
    with AuditStore(url) as store:
        with pytest.raises(DevModeRefused, match="never held an API key.*--allow-dev-mode-on-network"):
            await start_auth(store, settings(url, host=host))
        with caplog.at_level(logging.WARNING, logger="localist.server"):
            assert (await start_auth(store, settings(url, host=host, allow_dev_mode_on_network=True))).on
        assert "reachable from the network" in caplog.text
        store.create_key(tenant="acme", name="k")
        assert not (await start_auth(store, settings(url, host=host))).on  # with keys any address is fine


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
async def test_dev_mode_on_loopback_starts(host, tmp_path):
    url = f"sqlite:///{tmp_path / 'a.db'}"
    with AuditStore(url) as store:
        assert (await start_auth(store, settings(url, host=host))).on


def test_serve_refuses_dev_mode_on_a_network_address(tmp_path, model_dir):
    # 192.0.2.1 (TEST-NET-1) is no address of this machine: a server that wrongly went on could not bind it.
    out = subprocess.run([sys.executable, "-m", "localist.clients.cli", "serve", "--model", str(model_dir),
                          "--host", "192.0.2.1", "--port", str(PORTS[-1]), "--db", f"sqlite:///{tmp_path / 'a.db'}"],
                         capture_output=True, text=True, env=server_env(tmp_path / "home"), timeout=300)
    assert out.returncode == 2
    (line,) = [line for line in out.stderr.splitlines() if "refusing" in line]  # one line, no traceback
    assert line.startswith("localist serve: refusing to start in local dev mode on '192.0.2.1'"), out.stderr
    assert "Traceback" not in out.stderr + out.stdout


# -- real servers ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from localist.model.tiny import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("dev-mode-model") / MODEL_NAME)


def serve_args(model_dir: Path, db_url: str) -> list[str]:
    return ["--model", str(model_dir), "--name", MODEL_NAME, "--db", db_url, "--no-signing", "--max-model-len", "256"]


def keys_cli(home: Path, db_url: str, *args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "localist.clients.cli", "keys", *args, "--db", db_url],
                         capture_output=True, text=True, env=server_env(home), timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def bearer(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def chat(base: str, token: str) -> str:
    r = httpx.post(f"{base}/v1/chat/completions", headers=bearer(token), timeout=120,
                   json={"model": MODEL_NAME, "messages": MSG, "max_tokens": 1})
    assert r.status_code == 200, r.text
    return r.json()["id"]


def health_dev_mode(base: str) -> bool:
    return httpx.get(f"{base}/health", timeout=30).json()["dev_mode"]


def assert_authenticated_and_isolated(base: str, tokens: dict[str, str], records: dict[str, str]) -> None:
    """Every request needs a key; tenant acme reaches nothing of tenant beta's and manages no keys."""
    def call(method: str, path: str, token: str | None, **kwargs) -> httpx.Response:
        return httpx.request(method, base + path, headers=bearer(token), timeout=120, **kwargs)

    for token in (None, MADE_UP_KEY, "dev"):
        assert call("GET", "/v1/audit", token).status_code == 401
        assert call("GET", f"/v1/audit/{records['beta']}", token).status_code == 401
        assert call("POST", "/v1/keys", token, json={"tenant": "x", "admin": True}).status_code == 401
    acme, beta = tokens["acme"], records["beta"]
    assert call("GET", f"/v1/audit/{beta}", acme).status_code == 404
    assert call("GET", f"/v1/audit/{beta}/report", acme).status_code == 404
    assert call("POST", f"/v1/audit/{beta}/replay", acme).status_code == 404
    assert call("POST", f"/v1/audit/{beta}/redact", acme, json={"reason": "not mine"}).status_code == 404
    listed = call("GET", "/v1/audit", acme, params={"limit": 1000}).json()["data"]
    assert records["acme"] in {r["id"] for r in listed} and {r["tenant"] for r in listed} == {"acme"}
    assert call("POST", "/v1/keys", acme, json={"tenant": "acme", "admin": True}).status_code == 403
    assert call("GET", "/v1/keys", acme).status_code == 403
    seen = call("GET", f"/v1/audit/{beta}", tokens["ops"]).json()  # the admin sees it, intact
    assert seen["tenant"] == "beta" and seen["redacted"] is False
    assert health_dev_mode(base) is False


def test_keys_created_by_the_cli_end_dev_mode_of_the_running_server(model_dir, tmp_path):
    """The issue's sequence: serve a fresh store, create keys with the CLI while it runs."""
    db_url, home, (port,) = f"sqlite:///{tmp_path / 'audit.db'}", tmp_path / "home", ports_in(PORTS)
    base = f"http://127.0.0.1:{port}"
    with serving(serve_args(model_dir, db_url), port, tmp_path / "server.log", home):
        assert health_dev_mode(base) is True
        assert httpx.get(f"{base}/v1/audit", timeout=30).status_code == 200  # dev mode, as documented
        tokens = {}
        for tenant, flags in (("ops", ["--admin"]), ("acme", []), ("beta", [])):
            tokens[tenant] = json.loads(keys_cli(home, db_url, "create", "--tenant", tenant, "--json", *flags))["token"]
        records = {tenant: chat(base, tokens[tenant]) for tenant in ("acme", "beta")}
        assert_authenticated_and_isolated(base, tokens, records)
        for key in json.loads(keys_cli(home, db_url, "list", "--json")):
            keys_cli(home, db_url, "revoke", key["key_id"])
        assert httpx.get(f"{base}/v1/audit", timeout=30).status_code == 401  # revoking every key: still closed
        assert health_dev_mode(base) is False
    log = (tmp_path / "server.log").read_text()
    assert "LOCAL DEV MODE: this audit store has never held an API key" in log and DEV_MODE_ENDED in log


def test_a_key_created_through_one_replica_ends_dev_mode_on_both(model_dir, pg_admin_url, tmp_path):
    """Two servers on one PostgreSQL database: the first key, created through server A's API in dev
    mode, closes server B too; B never saw that request."""
    db_url, ports = fresh_database(pg_admin_url), ports_in(PORTS, 2)
    a, b = (f"http://127.0.0.1:{p}" for p in ports)
    with serving(serve_args(model_dir, db_url), ports[0], tmp_path / "a.log", tmp_path / "home"), \
            serving(serve_args(model_dir, db_url), ports[1], tmp_path / "b.log", tmp_path / "home"):
        assert health_dev_mode(a) is True and health_dev_mode(b) is True
        r = httpx.post(f"{a}/v1/keys", json={"tenant": "ops", "admin": True}, timeout=30)
        assert r.status_code == 200, r.text
        tokens = {"ops": r.json()["token"]}
        assert httpx.get(f"{b}/v1/audit", timeout=30).status_code == 401
        assert httpx.get(f"{a}/v1/audit", timeout=30).status_code == 401
        for tenant, server in (("acme", b), ("beta", a)):
            r = httpx.post(f"{server}/v1/keys", headers=bearer(tokens["ops"]), json={"tenant": tenant}, timeout=30)
            assert r.status_code == 200, r.text
            tokens[tenant] = r.json()["token"]
        records = {"acme": chat(a, tokens["acme"]), "beta": chat(b, tokens["beta"])}
        for base in (a, b):
            assert_authenticated_and_isolated(base, tokens, records)
