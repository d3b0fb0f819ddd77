"""The audit store's whole contract (test_store.StoreContract) against a real PostgreSQL 15 server
that this module starts (tests/pg.py): missing binaries fail the tests, they are never skipped."""
from __future__ import annotations

import pytest

from pg import fresh_database, postgres_server
from test_store import StoreContract


@pytest.fixture(scope="module")
def pg_admin_url():
    with postgres_server() as url:
        yield url


class TestPostgres(StoreContract):
    @pytest.fixture
    def url(self, pg_admin_url):
        return fresh_database(pg_admin_url)
