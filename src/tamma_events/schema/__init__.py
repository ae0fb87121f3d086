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

__all__ = ["Migration", "drop", "migrate", "migrations"]

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
    applied_now: list[int] = []
    with conn.transaction():
        # Whatever the server's default: a migration that adds a trigger and backfills from the
        # log must see the appends that committed while it waited for its locks.
        conn.execute("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")
        conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", [f"tamma_events:{schema}"])
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
        conn.execute(sql.SQL("SET LOCAL search_path TO {}").format(sql.Identifier(schema)))
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version integer PRIMARY KEY,"
            " name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        cur = conn.execute("SELECT version FROM schema_migrations")
        done = {row[0] for row in cur.fetchall()}  # type: ignore[index]
        for migration in migrations():
            if migration.version in done:
                continue
            conn.execute(migration.text.encode())
            conn.execute(
                "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)",
                [migration.version, migration.name],
            )
            applied_now.append(migration.version)
    return applied_now


def drop(dsn: str, schema: str) -> None:
    """Remove ``schema`` and everything in it (for demos, benchmarks and tests)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
