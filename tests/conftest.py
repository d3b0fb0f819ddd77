"""Session-wide fixtures: one real localist server (uvicorn + vLLM engine on a tiny model) per test session.

``localist_server`` starts ``localist serve`` as a subprocess on a free 127.0.0.1 port, with an audit
store in a temporary directory holding two keys created beforehand: an admin key (tenant ``admin``)
and a tenant key (tenant ``acme``). Server and client tests share it; start-up takes about a minute
on CPU, once. ``LOCALIST_TEST_DB=postgresql`` puts the audit store on a real PostgreSQL 15 server
started for the session (tests/pg.py) instead of SQLite.
"""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

STARTUP_TIMEOUT_S = float(os.environ.get("LOCALIST_TEST_STARTUP_S", "300"))
MODEL_NAME = "localist-test-tiny"


@dataclass
class LocalistServer:
    base_url: str  # http://127.0.0.1:PORT (the OpenAI base URL is base_url + "/v1")
    admin_key: str
    tenant_key: str  # tenant "acme"
    tenant: str
    model: str
    model_dir: Path
    db_url: str
    signing_key: Path
    home: Path
    log_path: Path
    process: subprocess.Popen

    def headers(self, key: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {key or self.admin_key}"}

    def log_tail(self, chars: int = 6000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def sql(self, statement: str, **params):
        """Run SQL on the audit database directly (what an attacker holding the database could do)."""
        return run_sql(self.db_url, statement, **params)


def run_sql(db_url: str, statement: str, **params):
    """One statement on a database, in its own transaction: the rows, or None."""
    import sqlalchemy as sa

    engine = sa.create_engine(db_url)
    try:
        with engine.begin() as conn:
            result = conn.execute(sa.text(statement), params)
            return result.all() if result.returns_rows else None
    finally:
        engine.dispose()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ports_in(ports: range, n: int = 1) -> list[int]:
    """``n`` ports of ``ports`` free on 127.0.0.1 now, for tests whose servers keep to a range of their own."""
    found = []
    for port in ports:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        found.append(port)
        if len(found) == n:
            return found
    pytest.fail(f"fewer than {n} free ports in {ports.start}-{ports.stop - 1}")


def server_env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"VLLM_CPU_KVCACHE_SPACE": "1", "LOCALIST_HOME": str(home), "PYTHONUNBUFFERED": "1"})
    env.pop("LOCALIST_DB_URL", None)
    env.pop("LOCALIST_ADMIN_KEY", None)
    return env


@contextlib.contextmanager
def serving(args: list[str], port: int, log_path: Path, home: Path,
            env: dict[str, str] | None = None) -> Iterator[subprocess.Popen]:
    """``localist serve ARGS --port PORT`` as a subprocess (``env`` added to server_env's), yielded once
    /health answers 200; stopped after."""
    cmd = [sys.executable, "-m", "localist.clients.cli", "serve", *args, "--port", str(port)]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=server_env(home) | (env or {}))

    def tail() -> str:
        return log_path.read_text(errors="replace")[-6000:]

    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            pytest.fail(f"localist serve exited with {proc.returncode} during start-up:\n{tail()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"localist serve not healthy after {STARTUP_TIMEOUT_S:.0f} s:\n{tail()}")
        time.sleep(1)
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def localist_server(tmp_path_factory) -> LocalistServer:
    from localist.model.tiny import make_tiny_checkpoint
    from localist.server.store import AuditStore

    root = tmp_path_factory.mktemp("localist-server")
    model_dir = make_tiny_checkpoint(root / MODEL_NAME)
    stack = contextlib.ExitStack()
    if os.environ.get("LOCALIST_TEST_DB") == "postgresql":
        from pg import postgres_server

        db_url = stack.enter_context(postgres_server())
    else:
        db_url = f"sqlite:///{root / 'audit.db'}"
    with AuditStore(db_url) as store:
        admin_key, _ = store.create_key(tenant="admin", name="test admin", admin=True, actor="conftest")
        tenant_key, _ = store.create_key(tenant="acme", name="acme app", actor="conftest")
    port = free_port()
    log_path = root / "server.log"
    signing_key = root / "keys" / "signing.pem"
    args = ["--model", str(model_dir), "--name", MODEL_NAME, "--db", db_url, "--signing-key", str(signing_key),
            "--sign-interval", "1", "--max-model-len", "512",
            "--max-num-seqs", "48"]  # a vLLM engine flag, passed through (tests/test_engine_flags.py)
    with serving(args, port, log_path, root / "home") as proc:
        yield LocalistServer(f"http://127.0.0.1:{port}", admin_key, tenant_key, "acme", MODEL_NAME, model_dir,
                             db_url, signing_key, root / "home", log_path, proc)
    stack.close()


@pytest.fixture
async def api(localist_server):
    """An httpx client with the admin key."""
    async with httpx.AsyncClient(base_url=localist_server.base_url, headers=localist_server.headers(),
                                 timeout=120) as client:
        yield client


@pytest.fixture
async def tenant_api(localist_server):
    """An httpx client with tenant acme's key."""
    async with httpx.AsyncClient(base_url=localist_server.base_url,
                                 headers=localist_server.headers(localist_server.tenant_key), timeout=120) as client:
        yield client
