"""Versioned SQL migrations and the migrator.

Each ``NNNN_name.sql`` file here is applied once, in order, inside one transaction per run,
under an advisory lock, with ``search_path`` set to the store's schema; applied versions are
recorded in ``schema_migrations``. Running `migrate` again is a no-op.
"""

from __future__ import annotations

import re
from importlib import resources
from typing import NamedTuple

import psycopg
from psycopg import sql

from .._ops import Op, Run, run
from ..errors import STORAGE_ERROR, EventStoreError

__all__ = [
    "Migration",
    "drop",
    "migrate",
    "migrate_op",
    "migrations",
    "require_current_op",
    "version_op",
]

_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


class Migration(NamedTuple):
    version: int
    name: str
    text: str


def migrations() -> list[Migration]:
    """The migrations shipped with the package, in version order."""
    found = []
    for entry in resources.files(__name__).iterdir():
        match = _NAME.match(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text(encoding="utf-8")))
    found.sort()
    return found


def migrate(conn: psycopg.Connection[object], schema: str) -> list[int]:
    """Bring ``schema`` up to date on ``conn``; returns the versions applied now."""
    return run(conn, migrate_op(schema))


def version_op(schema: str) -> Op[int]:
    """The last migration applied to ``schema`` (0 when it has none), read with no lock and
    no privilege beyond reading ``schema_migrations``."""
    table = sql.Identifier(schema, "schema_migrations")
    row = yield Run("SELECT to_regclass(%s) IS NOT NULL", [table.as_string(None)], fetch="one")
    if not row or not row[0]:
        return 0
    row = yield Run(sql.SQL("SELECT coalesce(max(version), 0) FROM {}").format(table), fetch="one")
    return int(row[0]) if row else 0


def no_store_error(schema: str) -> EventStoreError:
    """STORAGE_ERROR for reading a schema that holds no event store (never migrated)."""
    return EventStoreError(
        STORAGE_ERROR,
        f"schema {schema} holds no event store: create it with `tamma-events init`"
        " (or open the store with migrate=True)",
        {"schema": schema},
    )


def require_current_op(schema: str) -> Op[None]:
    """STORAGE_ERROR when ``schema`` was migrated by an older tamma-events and lacks some of the
    migrations this package ships: a store opened on it with ``migrate=False`` must not write
    with statements its schema does not know. (A schema not created yet fails at first use.)"""
    version = yield from version_op(schema)
    needed = migrations()[-1].version
    if 0 < version < needed:
        raise EventStoreError(
            STORAGE_ERROR,
            f"schema {schema} is at version {version}, and this tamma-events needs version"
            f" {needed}: migrate it as its owner (open a store with migrate=True, or run"
            " tamma-events init)",
            {"schema": schema, "version": version, "needed": needed},
        )


def migrate_op(schema: str) -> Op[list[int]]:
    """`migrate` as an operation (`tamma_events._ops`), for the sync and the async store. A
    schema already up to date is left alone without a lock or any write, so a role that may
    only read and append (see `EventStore.grant_app_role`) can open it with ``migrate=True``."""
    if (yield from version_op(schema)) >= migrations()[-1].version:
        return []
    applied_now: list[int] = []
    yield Run("BEGIN", fetch="none")
    # Whatever the server's default: a migration that adds a trigger and backfills from the
    # log must see the appends that committed while it waited for its locks.
    yield Run("SET TRANSACTION ISOLATION LEVEL READ COMMITTED", fetch="none")
    yield Run(
        "SELECT pg_advisory_xact_lock(hashtext(%s))", [f"tamma_events:{schema}"], fetch="none"
    )
    yield Run(
        sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)), fetch="none"
    )
    yield Run(sql.SQL("SET LOCAL search_path TO {}").format(sql.Identifier(schema)), fetch="none")
    yield Run(
        "CREATE TABLE IF NOT EXISTS schema_migrations ("
        " version integer PRIMARY KEY,"
        " name text NOT NULL,"
        " applied_at timestamptz NOT NULL DEFAULT now())",
        fetch="none",
    )
    done = {row[0] for row in (yield Run("SELECT version FROM schema_migrations"))}
    for migration in migrations():
        if migration.version in done:
            continue
        yield Run(migration.text.encode(), fetch="none")
        yield Run(
            "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)",
            [migration.version, migration.name],
            fetch="none",
        )
        applied_now.append(migration.version)
    yield Run("COMMIT", fetch="none")
    return applied_now


def drop(dsn: str, schema: str) -> None:
    """Remove ``schema`` and everything in it (for demos, benchmarks and tests)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
