"""The sync and async clients are generated from one definition per endpoint, and the generated
stub gives static type checkers the same, real signatures."""
from __future__ import annotations

import inspect
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from localist.clients import client, endpoints, stubs


def test_twins_have_the_same_endpoints_and_parameters():
    for sync, asynchronous in ((client.Client, client.AsyncClient), (client.AuditAPI, client.AsyncAuditAPI),
                               (client.KeysAPI, client.AsyncKeysAPI)):
        names = set(endpoints.endpoints(sync))
        assert names == set(endpoints.endpoints(asynchronous)) and names
        for name in names:
            s, a = getattr(sync, name), getattr(asynchronous, name)
            assert inspect.signature(s).parameters == inspect.signature(a).parameters, name
            kind = endpoints.endpoints(sync)[name]._localist_kind
            assert inspect.iscoroutinefunction(a) == (kind != "paged"), name
            assert not inspect.iscoroutinefunction(s), name
    assert set(endpoints.endpoints(client.Client)) == {"chat", "complete", "chat_stream", "complete_stream", "models",
                                                    "health"}
    assert set(endpoints.endpoints(client.AuditAPI)) == {"get", "list", "report", "verify", "redact", "replay",
                                                     "purge", "public_key"}
    assert set(endpoints.endpoints(client.KeysAPI)) == {"create", "list", "revoke"}


def test_stub_is_current():
    assert stubs.STUB.read_text() == stubs.render(), "client.pyi is stale: run `python -m localist.clients.stubs`"


def test_type_checker_sees_the_real_types(tmp_path):
    """mypy, reading the stub, knows each endpoint's result and refuses a wrongly typed argument."""
    mypy = shutil.which("mypy", path=str(Path(sys.executable).parent)) or shutil.which("mypy")
    assert mypy, "mypy is missing: it is in the dev extra (pip install -e '.[dev]')"
    (tmp_path / "path" / "localist").mkdir(parents=True)  # the installed namespace, as mypy can read it
    (tmp_path / "path" / "localist" / "clients").symlink_to(Path(client.__file__).parent)
    (tmp_path / "use.py").write_text(textwrap.dedent("""
        from localist.clients import AsyncClient, Client

        def sync_use() -> None:
            with Client() as c:
                reveal_type(c.chat("hi", locality=0.5))
                reveal_type(c.audit.list(block="R1"))
                reveal_type(c.chat_stream("hi"))
                c.chat("hi", max_tokens="many")

        async def async_use() -> None:
            async with AsyncClient() as c:
                reveal_type(await c.audit.verify())
                reveal_type(c.audit.list())
    """))
    proc = subprocess.run([mypy, "--python-executable", sys.executable, "--follow-imports=silent",
                           "--no-incremental", "use.py"], cwd=tmp_path, capture_output=True, text=True,
                          env={"MYPYPATH": str(tmp_path / "path"), "PATH": "/usr/bin:/bin"}, timeout=300)
    revealed = [line.split("Revealed type is ")[1] for line in proc.stdout.splitlines() if "Revealed type" in line]
    assert revealed == ['"localist.clients.contract.generation.ChatCompletionResponse"',
                        '"typing.Iterator[localist.clients.contract.audit.AuditSummary]"',
                        '"localist.clients.streams.Stream"',
                        '"localist.clients.contract.audit.VerifyResult"',
                        '"typing.AsyncIterator[localist.clients.contract.audit.AuditSummary]"'], proc.stdout
    errors = [line for line in proc.stdout.splitlines() if ": error:" in line]
    assert len(errors) == 1 and 'Argument "max_tokens" to "chat" of "Client"' in errors[0], proc.stdout


def test_the_client_and_its_contract_import_without_the_server_stack():
    """A client-only install has httpx and pydantic: the client, the wire contract and the CLI import
    with torch, vLLM, transformers, FastAPI and SQLAlchemy unavailable."""
    code = textwrap.dedent("""
        import sys

        class Absent:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "vllm", "transformers", "fastapi", "sqlalchemy", "numpy"):
                    raise ModuleNotFoundError(f"No module named {name!r}", name=name)

        sys.meta_path.insert(0, Absent())
        import localist.clients
        import localist.clients.contract
        from localist.clients.cli import build_parser

        build_parser().parse_args(["audit", "list"])
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_base_url_must_be_http(monkeypatch):
    with pytest.raises(ValueError, match="base_url: expected http"):
        client.Client("localhost:8000")
    monkeypatch.setenv("LOCALIST_BASE_URL", "https://audit.example:8443/")
    with client.Client() as from_env:
        assert from_env.base_url == "https://audit.example:8443"
