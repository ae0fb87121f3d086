"""The store's schema and the migrator.

``0010_baseline.sql`` is the whole schema as of version 10, written top to bottom; later changes
are small migrations on top of it, ``0011_name.sql`` and so on, beside it. A schema is brought up
to date inside one READ COMMITTED transaction per run, under an advisory lock, with
``search_path`` set to it; the versions applied are recorded in ``schema_migrations``. Running
`migrate` again is a no-op, and a schema already up to date is not locked or written at all.

Two kinds of store reach version 10:

* A new one (no ``schema_migrations``, or an empty one) gets the baseline alone, recorded as
  version 10, ``baseline``.
* One created before the baseline existed, at a version from 1 to 9, gets the steps it lacks
  from ``legacy/`` (the ten migrations the baseline folds together, kept unchanged; each is
  recorded under its own version and name, as before), then ``legacy/converge.sql``, which
  records no version.

The two end with the same catalog. The legacy steps leave the baseline's tables, indexes,
views, triggers and functions, text for text: the baseline was written to create exactly what
they leave, function bodies included, rather than cleaner bodies that the upgrade would then
have to re-create. It has to be: a store the legacy steps brought to version 10 before the
baseline existed is already current, and is left alone like any other. What the legacy steps
miss is in the converge script, run once on the way through version 10: the one grant they
never passed on (``chain``, to a role set up at version 1). ``tests/test_schema_catalog.py``
checks that a store migrated from every earlier version, with an application role granted
before, ends with the catalog of a new one.

Both kinds then get the migrations after the baseline, the same way.
"""

from __future__ import annotations

import re
from importlib import resources
from typing import TYPE_CHECKING, NamedTuple

import psycopg
from psycopg import sql

from .._drive import run
from .._ops import Op, Run
from ..errors import EventStoreError, StorageError

if TYPE_CHECKING:
    from importlib.abc import Traversable

__all__ = [
    "Migration",
    "drop",
    "legacy_migrations",
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


def _read(directory: Traversable) -> list[Migration]:
    found = []
    for entry in directory.iterdir():
        match = _NAME.match(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text(encoding="utf-8")))
    found.sort()
    return found


def migrations() -> list[Migration]:
    """The migrations a store is built with now, in version order: the baseline (version 10,
    the whole schema), then each later one. The last one's version is the version this package
    needs."""
    return _read(resources.files(__name__))


def legacy_migrations() -> list[Migration]:
    """The migrations the baseline folds together (versions 1 to 10), in version order: what
    brings a store created before the baseline up to it, and what built such stores."""
    return _read(resources.files(__name__) / "legacy")


def _converge() -> str:
    """What makes a store the legacy steps brought to the baseline's version equal to one the
    baseline created (see ``legacy/converge.sql``)."""
    return (resources.files(__name__) / "legacy" / "converge.sql").read_text(encoding="utf-8")


def _plan(done: set[int]) -> list[tuple[Migration, bool]]:
    """The scripts that bring a schema whose applied versions are ``done`` up to date, in order,
    each with whether its version is recorded in ``schema_migrations``."""
    current = migrations()
    baseline = current[0].version
    done = set(done)
    steps: list[tuple[Migration, bool]] = []
    if done and baseline not in done:
        # Created before the baseline: its remaining legacy steps reach the baseline's version.
        for migration in legacy_migrations():
            if migration.version <= baseline and migration.version not in done:
                steps.append((migration, True))
                done.add(migration.version)
        steps.append((Migration(baseline, "converge", _converge()), False))
    for migration in current:
        if migration.version not in done:
            steps.append((migration, True))
    return steps


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
    needed = migrations()[-1].version
    if 0 < version < needed:
        raise StorageError(
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
    for migration, recorded in _plan(done):
        yield Run(migration.text.encode(), fetch="none")
        if recorded:
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
