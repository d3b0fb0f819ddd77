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
from contextlib import contextmanager, suppress
from pathlib import Path

PG_BIN = Path(os.environ.get("LOCALIST_PG_BIN", "/usr/lib/postgresql/15/bin"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Postgres:
    """A running throwaway server: its admin ``url``; ``stop()`` and ``start()`` take it down and bring
    it back on the same port and data (an outage, as the reliability tests make one)."""

    def __init__(self, root: Path, run_as: list[str]):
        self.root, self.run_as = root, run_as
        self.data, self.logfile, self.port = root / "data", root / "server.log", _free_port()
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def run(self, *args: str) -> None:
        done = subprocess.run([*self.run_as, *args], capture_output=True, text=True)
        if done.returncode != 0:
            log = self.logfile.read_text() if self.logfile.exists() else ""
            raise RuntimeError(f"{' '.join(args)} failed ({done.returncode}):\n{done.stdout}{done.stderr}{log}")

    def start(self) -> None:
        self.run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.logfile), "-w", "-t", "60", "-o",
                 # fsync off: a throwaway server on shared test machines; nothing here outlives the test run.
                 f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c max_connections=100 -c fsync=off",
                 "start")

    def stop(self, mode: str = "fast") -> None:
        """``pg_ctl stop -m MODE``: fast ends every session at once (their transactions roll back)."""
        self.run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")


@contextmanager
def postgres_instance() -> Iterator[Postgres]:
    """Start a throwaway server; yields it (stopped and deleted after)."""
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
    pg = Postgres(root, run_as)
    try:
        pg.run(str(initdb), "-D", str(pg.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
        pg.start()
        try:
            yield pg
        finally:
            with suppress(RuntimeError):  # already stopped by the test
                pg.stop("immediate")
    finally:
        shutil.rmtree(root, ignore_errors=True)


@contextmanager
def postgres_server() -> Iterator[str]:
    """Start a throwaway server; yields its admin URL (``postgresql+psycopg://postgres@.../postgres``)."""
    with postgres_instance() as pg:
        yield pg.url


def fresh_database(admin_url: str) -> str:
    """Create an empty database on the server; returns its URL."""
    import psycopg

    name = f"t_{uuid.uuid4().hex[:12]}"
    conninfo = admin_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return admin_url.rsplit("/", 1)[0] + f"/{name}"
