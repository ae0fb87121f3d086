"""The migrator: brings a schema up to date with `tamma_events.sql.schema`'s scripts.

A schema is brought up to date inside one READ COMMITTED transaction per run, under an advisory
lock, with ``search_path`` set to it; the versions applied are recorded in
``schema_migrations``. Running `migrate` again is a no-op, and a schema already up to date is
not locked or written at all. Which scripts a schema needs is `tamma_events.sql.schema.plan`.
"""

from __future__ import annotations

import psycopg

from tamma_events.errors import EventStoreError, StorageError
from tamma_events.ops.drive import run
from tamma_events.ops.steps import Op, Run
from tamma_events.sql import ADVISORY_XACT_LOCK, BEGIN, COMMIT, READ_COMMITTED, statements_of
from tamma_events.sql import schema as _schema

__all__ = [
    "drop",
    "migrate",
    "migrate_op",
    "no_store_error",
    "require_current_op",
    "version_op",
]


def migrate(conn: psycopg.Connection[object], schema: str) -> list[int]:
    """Bring ``schema`` up to date on ``conn``; returns the versions applied now."""
    return run(conn, migrate_op(schema))


def version_op(schema: str) -> Op[int]:
    """The last migration applied to ``schema`` (0 when it has none), read with no lock and
    no privilege beyond reading ``schema_migrations``."""
    statements = statements_of(schema)
    row = yield Run(statements.relation_exists, [statements.migrations_table], fetch="one")
    if not row or not row[0]:
        return 0
    row = yield Run(statements.schema_version, fetch="one")
    return int(row[0]) if row else 0


def no_store_error(schema: str) -> EventStoreError:
    """STORAGE_ERROR for reading a schema that holds no event store (never migrated)."""
    return StorageError(
        f"schema {schema} holds no event store: create it with `tamma-events init`"
        " (or open the store with migrate=True)",
        {"schema": schema},
    )


def require_current_op(schema: str) -> Op[None]:
    """STORAGE_ERROR when ``schema`` was migrated by an older tamma-events and lacks some of the
    migrations this package ships: a store opened on it with ``migrate=False`` must not write
    with statements its schema does not know. (A schema not created yet fails at first use.)"""
    version = yield from version_op(schema)
    needed = _schema.migrations()[-1].version
    if 0 < version < needed:
        raise StorageError(
            f"schema {schema} is at version {version}, and this tamma-events needs version"
            f" {needed}: migrate it as its owner (open a store with migrate=True, or run"
            " tamma-events init)",
            {"schema": schema, "version": version, "needed": needed},
        )


def migrate_op(schema: str) -> Op[list[int]]:
    """`migrate` as an operation (`tamma_events.ops.steps`), for the sync and the async store. A
    schema already up to date is left alone without a lock or any write, so a role that may
    only read and append (see `EventStore.grant_app_role`) can open it with ``migrate=True``."""
    if (yield from version_op(schema)) >= _schema.migrations()[-1].version:
        return []
    statements = statements_of(schema)
    applied_now: list[int] = []
    yield Run(BEGIN, fetch="none")
    # Whatever the server's default: a migration that adds a trigger and backfills from the
    # log must see the appends that committed while it waited for its locks.
    yield Run(READ_COMMITTED, fetch="none")
    yield Run(ADVISORY_XACT_LOCK, [f"tamma_events:{schema}"], fetch="none")
    yield Run(statements.create_schema_if_missing, fetch="none")
    yield Run(statements.search_path, fetch="none")
    yield Run(statements.create_migrations, fetch="none")
    done = {row[0] for row in (yield Run(statements.applied_versions))}
    for migration, recorded in _schema.plan(done):
        yield Run(migration.text.encode(), fetch="none")
        if recorded:
            yield Run(
                statements.record_migration, [migration.version, migration.name], fetch="none"
            )
            applied_now.append(migration.version)
    yield Run(COMMIT, fetch="none")
    return applied_now


def drop(dsn: str, schema: str) -> None:
    """Remove ``schema`` and everything in it (for demos, benchmarks and tests)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(statements_of(schema).drop_schema)
