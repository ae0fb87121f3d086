"""One schema, however a store got it: a store an earlier tamma-events left at any version, then
migrated by this one, has the catalog of a store this one created from the baseline.

A store at each earlier version k is built by applying the legacy migrations 1..k the way the
migrator of the day did (`_schema_support.make_outdated`); an application role is granted on
it with `EventStore.grant_app_role` at that version; then a store opened on it migrates it. Its
catalog is compared, part by part, with that of a new store granted to the same role: tables
and columns, constraints, indexes, storage options, sequences, views, functions, triggers,
types, comments, policies, and every ACL (schema, relations, columns, functions), with the
schema's name written as ``<schema>`` wherever a definition spells it.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any
from unittest import mock

import psycopg
import pytest
from psycopg import sql

from _schema_support import history, make_outdated, shipped_up_to
from tamma_events import EventStore
from tamma_events.ops.migrating import drop
from tamma_events.sql import schema as schema_module
from tamma_events.sql.schema import Migration, legacy_migrations, migrations

Catalog = dict[str, list[tuple[Any, ...]]]

# Each part of the catalog: a query over the objects of the schema whose oid is %(nsp)s, in a
# stable order. Role names are compared as they are: every store here is owned by the test
# server's user and granted to the same application role.
PARTS: dict[str, str] = {
    "schema": """
        SELECT pg_get_userbyid(n.nspowner),
               ARRAY(SELECT a::text FROM unnest(n.nspacl) AS a ORDER BY 1)
        FROM pg_namespace AS n WHERE n.oid = %(nsp)s
    """,
    "relations": """
        SELECT c.relname, c.relkind, pg_get_userbyid(c.relowner), c.relpersistence,
               c.reloptions, c.relrowsecurity, c.relforcerowsecurity, c.relreplident,
               c.relispartition, am.amname,
               CASE WHEN c.relacl IS NOT NULL
                    THEN ARRAY(SELECT a::text FROM unnest(c.relacl) AS a ORDER BY 1) END
        FROM pg_class AS c LEFT JOIN pg_am AS am ON am.oid = c.relam
        WHERE c.relnamespace = %(nsp)s
        ORDER BY c.relname
    """,
    "columns": """
        SELECT c.relname, a.attnum, a.attname, format_type(a.atttypid, a.atttypmod),
               a.attnotnull, pg_get_expr(d.adbin, d.adrelid), a.attidentity, a.attgenerated,
               a.attisdropped, a.attstattarget, a.attstorage, a.attcompression,
               co.collname,
               CASE WHEN a.attacl IS NOT NULL
                    THEN ARRAY(SELECT x::text FROM unnest(a.attacl) AS x ORDER BY 1) END
        FROM pg_attribute AS a
        JOIN pg_class AS c ON c.oid = a.attrelid
        LEFT JOIN pg_attrdef AS d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
        LEFT JOIN pg_collation AS co ON co.oid = a.attcollation AND a.attcollation <> 0
        WHERE c.relnamespace = %(nsp)s AND a.attnum > 0
        ORDER BY c.relname, a.attnum
    """,
    "constraints": """
        SELECT coalesce(c.relname, ''), k.conname, k.contype, pg_get_constraintdef(k.oid),
               k.condeferrable, k.condeferred, k.convalidated, k.connoinherit, i.relname
        FROM pg_constraint AS k
        LEFT JOIN pg_class AS c ON c.oid = k.conrelid
        LEFT JOIN pg_class AS i ON i.oid = k.conindid
        WHERE k.connamespace = %(nsp)s
        ORDER BY 1, 2
    """,
    "indexes": """
        SELECT t.relname, i.relname, pg_get_indexdef(x.indexrelid), x.indisunique,
               x.indisprimary, x.indisexclusion, x.indimmediate, x.indisclustered,
               x.indisvalid, x.indisready, x.indislive, x.indnullsnotdistinct, i.reloptions
        FROM pg_index AS x
        JOIN pg_class AS i ON i.oid = x.indexrelid
        JOIN pg_class AS t ON t.oid = x.indrelid
        WHERE t.relnamespace = %(nsp)s
        ORDER BY 1, 2
    """,
    "sequences": """
        SELECT c.relname, format_type(s.seqtypid, NULL), s.seqstart, s.seqincrement, s.seqmax,
               s.seqmin, s.seqcache, s.seqcycle
        FROM pg_sequence AS s JOIN pg_class AS c ON c.oid = s.seqrelid
        WHERE c.relnamespace = %(nsp)s
        ORDER BY 1
    """,
    "views": """
        SELECT c.relname, pg_get_viewdef(c.oid), c.reloptions
        FROM pg_class AS c
        WHERE c.relnamespace = %(nsp)s AND c.relkind IN ('v', 'm')
        ORDER BY 1
    """,
    "functions": """
        SELECT p.proname, pg_get_function_identity_arguments(p.oid),
               pg_get_function_arguments(p.oid), pg_get_function_result(p.oid), p.prokind,
               l.lanname, p.provolatile, p.prosecdef, p.proleakproof, p.proisstrict,
               p.proretset, p.proparallel, p.procost, p.prorows, p.proconfig, p.prosrc,
               pg_get_function_sqlbody(p.oid), pg_get_userbyid(p.proowner),
               CASE WHEN p.proacl IS NOT NULL
                    THEN ARRAY(SELECT a::text FROM unnest(p.proacl) AS a ORDER BY 1) END,
               pg_get_functiondef(p.oid)
        FROM pg_proc AS p JOIN pg_language AS l ON l.oid = p.prolang
        WHERE p.pronamespace = %(nsp)s
        ORDER BY 1, 2
    """,
    "triggers": """
        SELECT c.relname, t.tgname, pg_get_triggerdef(t.oid, true), t.tgenabled,
               t.tgisinternal
        FROM pg_trigger AS t JOIN pg_class AS c ON c.oid = t.tgrelid
        WHERE c.relnamespace = %(nsp)s
        ORDER BY 1, 2
    """,
    "types": """
        SELECT t.typname, t.typtype, t.typcategory, coalesce(r.relname, ''),
               format_type(t.typelem, NULL)
        FROM pg_type AS t LEFT JOIN pg_class AS r ON r.oid = t.typrelid
        WHERE t.typnamespace = %(nsp)s
        ORDER BY 1
    """,
    "comments": """
        SELECT c.relname, d.objsubid, d.description
        FROM pg_description AS d JOIN pg_class AS c ON c.oid = d.objoid
        WHERE d.classoid = 'pg_class'::regclass AND c.relnamespace = %(nsp)s
        UNION ALL
        SELECT p.proname, d.objsubid, d.description
        FROM pg_description AS d JOIN pg_proc AS p ON p.oid = d.objoid
        WHERE d.classoid = 'pg_proc'::regclass AND p.pronamespace = %(nsp)s
        ORDER BY 1, 2
    """,
    "policies": """
        SELECT c.relname, p.polname, p.polcmd, p.polpermissive,
               pg_get_expr(p.polqual, p.polrelid), pg_get_expr(p.polwithcheck, p.polrelid)
        FROM pg_policy AS p JOIN pg_class AS c ON c.oid = p.polrelid
        WHERE c.relnamespace = %(nsp)s
        ORDER BY 1, 2
    """,
    "statistics": """
        SELECT s.stxname, pg_get_statisticsobjdef(s.oid)
        FROM pg_statistic_ext AS s WHERE s.stxnamespace = %(nsp)s
        ORDER BY 1
    """,
    "default privileges": """
        SELECT d.defaclobjtype, ARRAY(SELECT a::text FROM unnest(d.defaclacl) AS a ORDER BY 1)
        FROM pg_default_acl AS d WHERE d.defaclnamespace = %(nsp)s
        ORDER BY 1
    """,
    # Not the catalog, but created with it: the singleton rows every store starts from.
    "singletons": """
        SELECT 'head', position::text, encode(hash, 'hex') FROM {schema}.head
        UNION ALL
        SELECT 'chain', '', encode(genesis, 'hex') FROM {schema}.chain
        UNION ALL
        SELECT 'summary_state', folded::text, '' FROM {schema}.summary_state
        ORDER BY 1
    """,
}


def normalised(value: Any, schema: str) -> Any:
    """``value`` with the schema's name written as ``<schema>``, in strings and lists of them."""
    if isinstance(value, str):
        return value.replace(schema, "<schema>")
    if isinstance(value, list):
        return [normalised(item, schema) for item in value]
    return value


def catalog(dsn: str, schema: str) -> Catalog:
    """Every part of `PARTS` for ``schema``."""
    found: Catalog = {}
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT oid FROM pg_namespace WHERE nspname = %s", [schema]).fetchone()
        assert row is not None, schema
        for part, query in PARTS.items():
            text = sql.SQL(query.replace("%(nsp)s", "{nsp}")).format(
                nsp=sql.Literal(row[0]), schema=sql.Identifier(schema)
            )
            found[part] = [
                tuple(normalised(value, schema) for value in values)
                for values in conn.execute(text).fetchall()
            ]
    return found


def recorded(dsn: str, schema: str) -> list[tuple[int, str]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            sql.SQL("SELECT version, name FROM {} ORDER BY version").format(
                sql.Identifier(schema, "schema_migrations")
            )
        ).fetchall()
    return [(int(version), str(name)) for version, name in rows]


def assert_same(got: Catalog, expected: Catalog) -> None:
    assert list(got) == list(expected)
    for part in expected:
        assert got[part] == expected[part], f"the {part} differ"


@pytest.fixture(scope="module")
def app_role(pg_dsn: str) -> Iterator[str]:
    """The application role every store of this module is granted to; dropped at the end."""
    role = f"tamma_catalog_{uuid.uuid4().hex[:10]}"
    try:
        yield role
    finally:
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", [role]).fetchone():
                conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
                conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


@pytest.fixture(scope="module")
def fresh(pg_dsn: str, app_role: str) -> Iterator[Catalog]:
    """The catalog of a store created now (from the baseline), granted to ``app_role``."""
    schema = f"t_catalog_{uuid.uuid4().hex[:12]}"
    try:
        with EventStore(pg_dsn, schema=schema, max_connections=2) as store:
            assert migrations()[0].version == 10
            assert store.applied_on_open == [m.version for m in migrations()]
            store.grant_app_role(app_role)
        assert recorded(pg_dsn, schema) == [(m.version, m.name) for m in migrations()]
        yield catalog(pg_dsn, schema)
    finally:
        drop(pg_dsn, schema)


def test_a_new_store_is_the_baseline_and_its_catalog_is_the_whole_schema(
    fresh: Catalog, app_role: str
) -> None:
    """What the comparisons below compare is the schema, not an empty list: the tables, views,
    functions and triggers of a store, the tag index's pending list, the role's grants."""
    relations = {row[0]: row for row in fresh["relations"]}
    tables = {name for name, row in relations.items() if row[1] == "r"}
    assert tables == {
        "archived_events",
        "archives",
        "chain",
        "consumer_partitions",
        "consumer_workers",
        "consumers",
        "event_snapshots",
        "events",
        "head",
        "parked_events",
        "schema_migrations",
        "summary_state",
        "tag_summary",
        "time_summary",
        "type_summary",
    }
    assert {row[0] for row in fresh["views"]} == {
        "event_index",
        "tag_totals",
        "time_totals",
        "type_totals",
    }
    functions = {row[0]: row for row in fresh["functions"]}
    assert set(functions) == {
        "advance_head",
        "append_channel",
        "append_group",
        "condition_violated",
        "fold_summaries",
        "guard_archive",
        "guard_archived_events",
        "guard_head",
        "guard_summary_state",
        "lock_head",
        "refuse_event_change",
        "unfolded_events",
    }
    # SECURITY DEFINER, with the schema's name (normalised) in a search path of their own.
    for name in ("advance_head", "append_group", "fold_summaries", "lock_head"):
        assert functions[name][7] is True, name
        assert "search_path=pg_catalog, <schema>, pg_temp" in functions[name][14], name
    assert "<schema>.appended" in functions["append_channel"][16]
    assert "sha256(chain" in functions["append_group"][15]
    triggers = {row[1]: row for row in fresh["triggers"]}
    assert "tamma_events.appending" in triggers["events_advance_head"][2]
    assert {row[1] for row in fresh["triggers"] if row[0] == "events"} == {
        "events_advance_head",
        "events_immutable_rows",
        "events_immutable_truncate",
    }
    assert relations["events_tags"][4] == ["gin_pending_list_limit=64"]
    assert relations["head"][4] == ["fillfactor=10"]
    columns = {(row[0], row[2]): row for row in fresh["columns"]}
    assert columns["events", "tags"][9] == 1000  # statistics target
    assert columns["event_snapshots", "version"][3] == "bigint"
    acl = relations["events"][10]
    assert any(item.startswith(f"{app_role}=ar/") for item in acl), acl
    assert any(item.startswith(f"{app_role}=U/") for item in fresh["schema"][0][1])
    assert [row[0] for row in fresh["singletons"]] == ["chain", "head", "summary_state"]


@pytest.mark.parametrize("version", [m.version for m in legacy_migrations()])
def test_a_store_from_an_earlier_version_migrates_to_the_catalog_of_a_new_one(
    pg_dsn: str, fresh: Catalog, app_role: str, version: int
) -> None:
    """A store the legacy migrations left at ``version`` (the last, 10, is the full legacy
    chain, which needs nothing more), with the application role granted then, migrated by this
    tamma-events: the same catalog as a new store's, grants included."""
    schema = f"t_catalog_{uuid.uuid4().hex[:12]}"
    try:
        make_outdated(pg_dsn, schema, version)
        # Opened as the tamma-events of that version (its migrations are all applied), to grant.
        with mock.patch.object(schema_module, "migrations", lambda: shipped_up_to(version)):
            with EventStore(pg_dsn, schema=schema, max_connections=2) as old:
                assert old.applied_on_open == []
                old.grant_app_role(app_role)
        with EventStore(pg_dsn, schema=schema, max_connections=2) as store:
            assert store.applied_on_open == [m.version for m in history() if m.version > version]
            assert store.schema_version() == migrations()[-1].version
        assert recorded(pg_dsn, schema) == [(m.version, m.name) for m in history()]
        assert_same(catalog(pg_dsn, schema), fresh)
    finally:
        drop(pg_dsn, schema)


def test_an_empty_schema_migrations_table_gets_the_baseline(
    pg_dsn: str, fresh: Catalog, app_role: str
) -> None:
    """A schema whose ``schema_migrations`` exists but is empty (a migration that failed before
    its first commit left nothing else) is a new store."""
    schema = f"t_catalog_{uuid.uuid4().hex[:12]}"
    try:
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
            conn.execute(
                sql.SQL(
                    "CREATE TABLE {} (version integer PRIMARY KEY, name text NOT NULL,"
                    " applied_at timestamptz NOT NULL DEFAULT now())"
                ).format(sql.Identifier(schema, "schema_migrations"))
            )
        with EventStore(pg_dsn, schema=schema, max_connections=2) as store:
            assert store.applied_on_open == [m.version for m in migrations()]
            store.grant_app_role(app_role)
        assert recorded(pg_dsn, schema) == [(m.version, m.name) for m in migrations()]
        assert_same(catalog(pg_dsn, schema), fresh)
    finally:
        drop(pg_dsn, schema)


def test_a_migration_after_the_baseline_reaches_both_kinds_of_store(pg_dsn: str) -> None:
    """A migration shipped after the baseline and the ones after it is applied on top of them
    to a new store, and after the legacy steps to one from before the baseline: the two stores
    end alike, each with it recorded."""
    after = [m.version for m in migrations()[1:]]
    version = migrations()[-1].version + 1
    later = Migration(
        version,
        "later",
        "CREATE TABLE later (id bigint PRIMARY KEY);\n"
        "CREATE FUNCTION later_count() RETURNS bigint LANGUAGE sql STABLE\n"
        "SET search_path FROM CURRENT RETURN (SELECT count(*) FROM later);\n",
    )
    shipped = [*migrations(), later]
    new, old = (f"t_catalog_{uuid.uuid4().hex[:12]}" for _ in range(2))
    try:
        make_outdated(pg_dsn, old, 5)
        with mock.patch.object(schema_module, "migrations", lambda: shipped):
            with EventStore(pg_dsn, schema=new, max_connections=2) as store:
                assert store.applied_on_open == [10, *after, version]
            with EventStore(pg_dsn, schema=old, max_connections=2) as store:
                assert store.applied_on_open == [6, 7, 8, 9, 10, *after, version]
                assert store.schema_version() == version
        assert recorded(pg_dsn, new)[0] == (10, "baseline")
        assert recorded(pg_dsn, new)[-1] == (version, "later")
        assert recorded(pg_dsn, old)[-2 - len(after)] == (10, "lean_appends")
        assert recorded(pg_dsn, old)[-1] == (version, "later")
        expected = catalog(pg_dsn, new)
        assert "later_count" in {row[0] for row in expected["functions"]}
        assert_same(catalog(pg_dsn, old), expected)
    finally:
        drop(pg_dsn, new)
        drop(pg_dsn, old)
