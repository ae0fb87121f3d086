"""Schemas as an earlier tamma-events left them, for the tests of upgrades.

A store created before the baseline (``schema/0010_baseline.sql``) went through the legacy
migrations (``schema/legacy/``), each applied by the migrator of its day: in one transaction
under the schema's advisory lock, with ``search_path`` set to the schema, and recorded in
``schema_migrations``. Later versions are the migrations after the baseline.
"""

from __future__ import annotations

import psycopg
from psycopg import sql

from tamma_events.sql.schema import Migration, legacy_migrations, migrations


def history() -> list[Migration]:
    """Every version a store can have gone through, in order: the legacy steps up to the
    baseline's version, then the migrations after the baseline."""
    baseline = migrations()[0].version
    return legacy_migrations() + [m for m in migrations() if m.version > baseline]


def shipped_up_to(version: int) -> list[Migration]:
    """The migrations a tamma-events that shipped versions up to ``version`` had."""
    return [m for m in history() if m.version <= version]


def make_outdated(dsn: str, schema: str, version: int) -> None:
    """Create ``schema`` as a tamma-events that shipped migrations up to ``version`` left it:
    those steps of `history`, applied and recorded the way its migrator did."""
    with psycopg.connect(dsn, autocommit=True) as conn, conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")
        conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", [f"tamma_events:{schema}"])
        name = sql.Identifier(schema)
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(name))
        conn.execute(sql.SQL("SET LOCAL search_path TO {}").format(name))
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version integer PRIMARY KEY,"
            " name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        for migration in shipped_up_to(version):
            conn.execute(migration.text.encode())
            conn.execute(
                "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)",
                [migration.version, migration.name],
            )
