"""A real PostgreSQL 15 server for tests: initdb + pg_ctl in a temp dir, on a free 127.0.0.1 port.

Missing binaries are an error, not a skip: the PostgreSQL path must be tested. initdb refuses to
run as root, so under root the server runs as ``nobody`` (who then owns the temp dir).
"""
from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

PG_BIN = Path(os.environ.get("LOCALIST_PG_BIN", "/usr/lib/postgresql/15/bin"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def postgres_server() -> Iterator[str]:
    """Start a throwaway server; yields its admin URL (``postgresql+psycopg://postgres@.../postgres``)."""
    initdb, pg_ctl = PG_BIN / "initdb", PG_BIN / "pg_ctl"
    if not (initdb.exists() and pg_ctl.exists()):
        raise RuntimeError(f"PostgreSQL 15 binaries not found in {PG_BIN} (initdb, pg_ctl): install "
                           "postgresql-15 or point LOCALIST_PG_BIN at them; the PostgreSQL tests cannot run")
    root = Path(tempfile.mkdtemp(prefix="localist-pg-"))
    run_as: list[str] = []
    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody")
        os.chown(root, nobody.pw_uid, nobody.pw_gid)
        run_as = ["runuser", "-u", "nobody", "--"]
    data, logfile, port = root / "data", root / "server.log", _free_port()

    def run(*args: str) -> None:
        done = subprocess.run([*run_as, *args], capture_output=True, text=True)
        if done.returncode != 0:
            log = logfile.read_text() if logfile.exists() else ""
            raise RuntimeError(f"{' '.join(args)} failed ({done.returncode}):\n{done.stdout}{done.stderr}{log}")

    try:
        run(str(initdb), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
        run(str(pg_ctl), "-D", str(data), "-l", str(logfile), "-w", "-t", "60", "-o",
            # fsync off: a throwaway server on shared test machines; nothing here outlives the test run.
            f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c max_connections=100 -c fsync=off", "start")
        try:
            yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
        finally:
            run(str(pg_ctl), "-D", str(data), "-m", "immediate", "-w", "stop")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def fresh_database(admin_url: str) -> str:
    """Create an empty database on the server; returns its URL."""
    import psycopg

    name = f"t_{uuid.uuid4().hex[:12]}"
    conninfo = admin_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return admin_url.rsplit("/", 1)[0] + f"/{name}"
