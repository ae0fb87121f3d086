"""Least privilege and secrets, against the real test PostgreSQL.

The application connects as a login role that is a member of the role `EventStore.grant_app_role`
sets up (the layout ``docs/integrity.md`` recommends). Connected as that role:

- every table, view, trigger, constraint and function of the store's schema, listed from the
  catalog so that tables added by later migrations are covered too, resists change: each attempt
  fails with ``InsufficientPrivilege`` (the privilege check, or the immutability triggers), the
  log and the catalog are left exactly as they were, and `verify` stays ok;
- what the role *may* write directly (rows of ``events``, the ``head``) cannot pass unnoticed:
  `verify` names the first position it breaks;
- the whole application API works with ``migrate=False``, and compaction and migrations fail
  with a clear `EventStoreError`.

The DSN's password (in a URL, in a ``password=`` conninfo, or in ``$PGPASSWORD``) must not show in
a ``repr``, an error, a log record at DEBUG level, the metrics, the CLI's output or the HTTP app's
responses.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import re
import subprocess
import sys
import threading
import traceback
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import httpx
import psycopg
import pyarrow as pa
import pytest
from prometheus_client import generate_latest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from _schema_support import history, make_outdated
from _web_support import LiveServer
from tamma_events import (
    APPEND_CONDITION_FAILED,
    STORAGE_ERROR,
    AppendCondition,
    AsyncEventStore,
    DomainEvent,
    EventFilter,
    EventStore,
    EventStoreError,
    Query,
    SequencedEvent,
)
from tamma_events.streaming.web import create_app

pytestmark = pytest.mark.codec_neutral

#: Events the owner appends before the application role gets to work.
EVENTS = 12
#: What the application role may do to each relation of the schema (`grant_app_role`); every
#: other relation, whatever a migration adds, is read-only for it.
WRITABLE: dict[str, set[str]] = {
    "events": {"SELECT", "INSERT"},
    "head": {"SELECT"},
    "event_snapshots": {"SELECT", "INSERT", "UPDATE"},
    # Durable consumers: their checkpoints, leases, workers and parked events.
    "consumers": {"SELECT", "INSERT", "UPDATE", "DELETE"},
    "consumer_partitions": {"SELECT", "INSERT", "UPDATE", "DELETE"},
    "consumer_workers": {"SELECT", "INSERT", "UPDATE", "DELETE"},
    "parked_events": {"SELECT", "INSERT", "UPDATE", "DELETE"},
}
#: Relations the migrations create (a sanity check that the catalog listing finds them).
KNOWN = {
    "events",
    "head",
    "chain",
    "event_snapshots",
    "type_summary",
    "tag_summary",
    "time_summary",
    "summary_state",
    "type_totals",
    "tag_totals",
    "time_totals",
    "archives",
    "archived_events",
    "event_index",
    "schema_migrations",
    "consumers",
    "consumer_partitions",
    "consumer_workers",
    "parked_events",
}
TABLE_PRIVILEGES = ("SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES", "TRIGGER")
#: Loggers whose DEBUG records are checked for the password (the root logger sees the rest).
LOGGERS = ("", "tamma_events", "psycopg", "psycopg.pool")
#: A 32-byte hash that chains from nothing.
FORGED_HASH = bytes(range(32))
#: Where nothing listens: connecting fails at once.
REFUSED = "postgresql://u:{secret}@127.0.0.1:1/x?connect_timeout=1"
#: The DSN of the CLI check, `test_the_cli_hides_the_password`: refused, with a password.
CLI_REFUSED_DSN = "postgresql://u:SECRET@127.0.0.1:1/x?connect_timeout=1"


# -- roles ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AppRole:
    """The role `grant_app_role` set up, and a login role in it that the application uses."""

    role: str
    login: str
    password: str
    schema: str
    #: The test server's DSN for ``login``, with ``password`` in it (the test server trusts its
    #: local connections, so any password will do; one that checks passwords gets the right one).
    dsn: str

    def with_settings(self, **settings: Any) -> str:
        """`dsn` with more connection settings."""
        return make_conninfo(self.dsn, **settings)


def owner_connection(pg_dsn: str) -> psycopg.Connection[Any]:
    """A connection as the schema's owner (the test server's user)."""
    return psycopg.connect(pg_dsn, autocommit=True)


def drop_roles(pg_dsn: str, *roles: str) -> None:
    """Revoke what ``roles`` were granted and drop them (those that exist)."""
    with owner_connection(pg_dsn) as conn:
        for role in roles:
            exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", [role]).fetchone()
            if exists:
                conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
                conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


@pytest.fixture
def filled(store: EventStore) -> EventStore:
    """A store of `EVENTS` events, appended by its owner."""
    store.append_batch(
        DomainEvent(
            "Seeded", {"n": n}, {"issueId": f"I-{n % 3}"}, timestamp=datetime.now(timezone.utc)
        )
        for n in range(EVENTS)
    )
    return store


@pytest.fixture
def app_role(filled: EventStore, pg_dsn: str) -> Iterator[AppRole]:
    """`grant_app_role` on ``filled``'s schema, and a login role in it with a password."""
    suffix = uuid.uuid4().hex[:10]
    role, login = f"tamma_app_{suffix}", f"tamma_login_{suffix}"
    password = f"pw-{uuid.uuid4().hex}"
    try:
        filled.grant_app_role(role)
        with owner_connection(pg_dsn) as conn:
            conn.execute(
                sql.SQL("CREATE ROLE {} LOGIN PASSWORD {} IN ROLE {}").format(
                    sql.Identifier(login), sql.Literal(password), sql.Identifier(role)
                )
            )
        dsn = make_conninfo(pg_dsn, user=login, password=password)
        yield AppRole(role, login, password, filled.schema, dsn)
    finally:
        drop_roles(pg_dsn, login, role)


# -- the catalog ----------------------------------------------------------------------------------


def relations(conn: psycopg.Connection[Any], schema: str) -> dict[str, str]:
    """Every table (from ``pg_tables``) and view (from ``pg_views``) of ``schema``, by name:
    ``"table"`` or ``"view"``."""
    rows = conn.execute(
        "SELECT tablename, 'table' FROM pg_tables WHERE schemaname = %(s)s"
        " UNION ALL SELECT viewname, 'view' FROM pg_views WHERE schemaname = %(s)s"
        " UNION ALL SELECT matviewname, 'view' FROM pg_matviews WHERE schemaname = %(s)s",
        {"s": schema},
    ).fetchall()
    return {name: kind for name, kind in rows}


def privileges(conn: psycopg.Connection[Any], role: str, schema: str) -> dict[str, set[str]]:
    """What ``role`` may do to each relation of ``schema`` (``has_table_privilege``)."""
    found: dict[str, set[str]] = {}
    for name in relations(conn, schema):
        table = sql.Identifier(schema, name).as_string(conn)
        found[name] = {
            privilege
            for privilege in TABLE_PRIVILEGES
            if conn.execute(
                "SELECT has_table_privilege(%s, %s, %s)", [role, table, privilege]
            ).fetchone()
            == (True,)
        }
    return found


def fingerprint(pg_dsn: str, schema: str) -> dict[str, Any]:
    """Everything an attack could change, read as the owner: each table's rows, the head, and
    the schema's catalog (columns, constraints, triggers and their state, indexes, functions,
    owners and privileges)."""
    with owner_connection(pg_dsn) as conn:
        tables = sorted(
            row[0]
            for row in conn.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = %s", [schema]
            ).fetchall()
        )
        contents = {}
        for table in tables:
            contents[table] = conn.execute(
                sql.SQL(
                    "SELECT count(*), md5(coalesce(string_agg(t::text, E'\\n' ORDER BY t::text),"
                    " '')) FROM {} t"
                ).format(sql.Identifier(schema, table))
            ).fetchone()
        catalog = {
            "schema": conn.execute(
                "SELECT nspowner::regrole::text, coalesce(nspacl, acldefault('n', nspowner))::text"
                " FROM pg_namespace WHERE nspname = %s",
                [schema],
            ).fetchall(),
            "relations": conn.execute(
                "SELECT c.relname, c.relkind, c.relowner::regrole::text,"
                " coalesce(c.relacl, acldefault('r', c.relowner))::text,"
                " c.relrowsecurity, obj_description(c.oid, 'pg_class')"
                " FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
                " WHERE n.nspname = %s ORDER BY 1",
                [schema],
            ).fetchall(),
            "columns": conn.execute(
                "SELECT c.relname, a.attname, a.atttypid::regtype::text, a.attnotnull"
                " FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid"
                " JOIN pg_namespace n ON n.oid = c.relnamespace"
                " WHERE n.nspname = %s AND a.attnum > 0 AND NOT a.attisdropped ORDER BY 1, 2",
                [schema],
            ).fetchall(),
            "constraints": conn.execute(
                "SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid)"
                " FROM pg_constraint WHERE connamespace = %s::regnamespace ORDER BY 1, 2",
                [schema],
            ).fetchall(),
            "triggers": conn.execute(
                "SELECT t.tgrelid::regclass::text, t.tgname, t.tgenabled, pg_get_triggerdef(t.oid)"
                " FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid"
                " WHERE c.relnamespace = %s::regnamespace ORDER BY 1, 2",
                [schema],
            ).fetchall(),
            "functions": conn.execute(
                "SELECT p.oid::regprocedure::text, p.proowner::regrole::text,"
                " coalesce(p.proacl, acldefault('f', p.proowner))::text,"
                " p.prosecdef, p.proconfig, md5(pg_get_functiondef(p.oid))"
                " FROM pg_proc p WHERE p.pronamespace = %s::regnamespace ORDER BY 1",
                [schema],
            ).fetchall(),
            "views": conn.execute(
                "SELECT viewname, md5(definition) FROM pg_views WHERE schemaname = %s ORDER BY 1",
                [schema],
            ).fetchall(),
            "default_acl": conn.execute(
                "SELECT defaclrole::regrole::text, defaclobjtype, defaclacl::text"
                " FROM pg_default_acl WHERE defaclnamespace IN (0, %s::regnamespace)"
                " ORDER BY 1, 2",
                [schema],
            ).fetchall(),
        }
    return {"rows": contents, "catalog": catalog}


#: A statement to try, alone or with the one other error that also counts as a refusal (for a
#: view that cannot be written at all, PostgreSQL says so before it checks privileges).
Statement = sql.SQL | sql.Composed
Attack = Statement | tuple[Statement, type[psycopg.Error]]


def attempt(
    conn: psycopg.Connection[Any],
    statement: Statement,
    also: tuple[type[psycopg.Error], ...] = (),
) -> str | None:
    """Run ``statement`` in its own transaction; None when it was refused for want of privilege
    (``InsufficientPrivilege``: a permission check or an immutability trigger, or one of
    ``also``), otherwise what happened instead. A GRANT of privileges one does not hold is not an
    error in PostgreSQL but a warning that nothing was granted: that counts as refused too (the
    catalog check of each test confirms nothing changed)."""
    notices: list[str] = []

    def notice(diagnostic: psycopg.errors.Diagnostic) -> None:
        notices.append(diagnostic.message_primary or "")

    refused: tuple[type[psycopg.Error], ...] = (psycopg.errors.InsufficientPrivilege, *also)
    conn.add_notice_handler(notice)
    try:
        with conn.transaction():
            conn.execute(statement)
    except refused:
        return None
    except psycopg.Error as exc:
        return f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
    finally:
        conn.remove_notice_handler(notice)
    if any(message.startswith("no privileges were granted") for message in notices):
        return None
    return f"it succeeded (notices: {notices})"


def refusals(dsn: str, attacks: list[Attack]) -> list[str]:
    """Each attack tried on one connection as the application; returns those that were not
    refused, as text with what happened."""
    problems = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        for attack in attacks:
            statement, also = attack if isinstance(attack, tuple) else (attack, None)
            outcome = attempt(conn, statement, () if also is None else (also,))
            if outcome is not None:
                problems.append(f"{statement.as_string(conn)} -> {outcome}")
    return problems


def assert_untouched(store: EventStore, pg_dsn: str, before: dict[str, Any]) -> None:
    """The log, the schema and its privileges are as ``before``, and the chain verifies."""
    after = fingerprint(pg_dsn, store.schema)
    assert after["rows"] == before["rows"]
    assert after["catalog"] == before["catalog"]
    assert store.head() == EVENTS
    report = store.verify()
    assert report.ok, report
    assert report.checked == EVENTS


# -- 1. what the application role holds -----------------------------------------------------------


def test_app_role_holds_only_the_documented_privileges(
    filled: EventStore, app_role: AppRole, pg_dsn: str
) -> None:
    """Per relation, from ``has_table_privilege``: SELECT everywhere, INSERT on ``events``,
    INSERT and UPDATE on ``event_snapshots``, nothing else; USAGE on the
    schema but not CREATE; no CREATE on the database; no role attributes. The login role has
    exactly what it inherits."""
    with owner_connection(pg_dsn) as conn:
        found = privileges(conn, app_role.role, filled.schema)
        assert KNOWN <= set(found)
        expected = {name: WRITABLE.get(name, {"SELECT"}) for name in found}
        assert found == expected
        assert privileges(conn, app_role.login, filled.schema) == expected
        schema_rights = conn.execute(
            "SELECT has_schema_privilege(%(r)s, %(s)s, 'USAGE'),"
            " has_schema_privilege(%(r)s, %(s)s, 'CREATE'),"
            " has_database_privilege(%(r)s, current_database(), 'CREATE')",
            {"r": app_role.login, "s": filled.schema},
        ).fetchone()
        assert schema_rights == (True, False, False)
        attributes = conn.execute(
            "SELECT rolname, rolsuper, rolcreaterole, rolcreatedb, rolreplication, rolbypassrls"
            " FROM pg_roles WHERE rolname IN (%s, %s) ORDER BY rolname",
            [app_role.role, app_role.login],
        ).fetchall()
        assert [row[1:] for row in attributes] == [(False,) * 5] * 2
        # The functions that run with the owner's rights: a trigger (it cannot be called
        # directly); the head's lock, which only locks and reads it; the append function,
        # which writes events only at the next positions it takes under that lock; and the
        # summaries' fold, which writes only what it counts from the log. Each search path puts
        # pg_temp last.
        definers = conn.execute(
            "SELECT proname, prorettype::regtype::text, proconfig FROM pg_proc"
            " WHERE pronamespace = %s::regnamespace AND prosecdef ORDER BY proname",
            [filled.schema],
        ).fetchall()
        assert [(name, returns) for name, returns, _ in definers] == [
            ("advance_head", "trigger"),
            ("append_group", "bigint[]"),
            ("fold_summaries", "bigint"),
            ("lock_head", "record"),
        ]
        for _name, _returns, config in definers:
            assert config[0] == f"search_path=pg_catalog, {filled.schema}, pg_temp"
            assert set(config[1:]) <= {"plan_cache_mode=force_custom_plan"}


def test_app_role_cannot_change_rows_of_any_table(
    filled: EventStore, app_role: AppRole, pg_dsn: str
) -> None:
    """UPDATE, DELETE, TRUNCATE and INSERT on every table and view of the schema, except the
    writes `grant_app_role` grants, are refused; so are moving the head backwards, locking rows
    of the log for update and locking the log against readers."""
    before = fingerprint(pg_dsn, filled.schema)
    statements: list[Attack] = []
    with owner_connection(pg_dsn) as conn:
        found = relations(conn, filled.schema)
        for name, kind in sorted(found.items()):
            rows: list[Statement] = []
            column = conn.execute(
                "SELECT attname FROM pg_attribute WHERE attrelid = %s::regclass AND attnum = 1",
                [sql.Identifier(filled.schema, name).as_string(conn)],
            ).fetchone()
            assert column is not None
            target = sql.Identifier(filled.schema, name)
            allowed = WRITABLE.get(name, {"SELECT"})
            if "UPDATE" not in allowed:
                rows.append(
                    sql.SQL("UPDATE {} SET {} = {}").format(
                        target, sql.Identifier(column[0]), sql.Identifier(column[0])
                    )
                )
            if "INSERT" not in allowed:
                rows.append(sql.SQL("INSERT INTO {} DEFAULT VALUES").format(target))
            if "DELETE" not in allowed:
                rows.append(sql.SQL("DELETE FROM {}").format(target))
            if kind == "view":
                not_updatable = psycopg.errors.ObjectNotInPrerequisiteState
                statements += [(statement, not_updatable) for statement in rows]
            else:
                statements += rows
                statements.append(sql.SQL("TRUNCATE {}").format(target))
                statements.append(sql.SQL("TRUNCATE {} CASCADE").format(target))
    events = sql.Identifier(filled.schema, "events")
    head = sql.Identifier(filled.schema, "head")
    statements += [
        sql.SQL("UPDATE {} SET position = position - 1").format(head),
        sql.SQL("UPDATE {} SET position = 0, hash = {}").format(head, sql.Literal(FORGED_HASH)),
        sql.SQL("SELECT * FROM {} WHERE position = 1 FOR UPDATE").format(events),
        sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(events),
    ]
    problems = refusals(app_role.dsn, statements)
    assert problems == []
    assert_untouched(filled, pg_dsn, before)


def test_app_role_cannot_change_the_schema(
    filled: EventStore, app_role: AppRole, pg_dsn: str
) -> None:
    """DROP, ALTER (a column, a trigger disabled, a constraint dropped, row-level security, the
    owner), DROP TRIGGER, DROP INDEX, REINDEX, COMMENT, CREATE TRIGGER and CREATE INDEX on every
    relation; CREATE OR REPLACE (with the function's own definition), ALTER and DROP of every
    function; replacing the ``event_index`` view; creating anything in the schema, renaming,
    handing over or dropping it: all refused, nothing changed."""
    before = fingerprint(pg_dsn, filled.schema)
    schema = sql.Identifier(filled.schema)
    statements: list[Attack] = []
    with owner_connection(pg_dsn) as conn:
        found = relations(conn, filled.schema)
        for name, kind in sorted(found.items()):
            target = sql.Identifier(filled.schema, name)
            what = sql.SQL("TABLE" if kind == "table" else "VIEW")
            statements += [
                sql.SQL("DROP {} {} CASCADE").format(what, target),
                sql.SQL("ALTER {} {} RENAME TO hijacked").format(what, target),
                sql.SQL("ALTER {} {} OWNER TO {}").format(
                    what, target, sql.Identifier(app_role.login)
                ),
                sql.SQL("COMMENT ON {} {} IS 'hijacked'").format(what, target),
            ]
            if kind == "table":
                statements += [
                    sql.SQL("ALTER TABLE {} ADD COLUMN hijacked int").format(target),
                    sql.SQL("ALTER TABLE {} DISABLE TRIGGER ALL").format(target),
                    sql.SQL("ALTER TABLE {} DISABLE TRIGGER USER").format(target),
                    sql.SQL("ALTER TABLE {} ENABLE ROW LEVEL SECURITY").format(target),
                    sql.SQL("CREATE INDEX ON {} ((1))").format(target),
                    sql.SQL("REINDEX TABLE {}").format(target),
                    sql.SQL(
                        "CREATE TRIGGER hijacked BEFORE INSERT ON {} FOR EACH ROW"
                        " EXECUTE FUNCTION {}()"
                    ).format(target, sql.Identifier(filled.schema, "guard_head")),
                ]
        for table, constraint in conn.execute(
            "SELECT conrelid::regclass::text, conname FROM pg_constraint"
            " WHERE connamespace = %s::regnamespace",
            [filled.schema],
        ).fetchall():
            statements.append(
                sql.SQL("ALTER TABLE {} DROP CONSTRAINT {} CASCADE").format(
                    sql.SQL(table), sql.Identifier(constraint)
                )
            )
        for table, trigger in conn.execute(
            "SELECT t.tgrelid::regclass::text, t.tgname FROM pg_trigger t"
            " JOIN pg_class c ON c.oid = t.tgrelid"
            " WHERE c.relnamespace = %s::regnamespace AND NOT t.tgisinternal",
            [filled.schema],
        ).fetchall():
            statements += [
                sql.SQL("DROP TRIGGER {} ON {}").format(sql.Identifier(trigger), sql.SQL(table)),
                sql.SQL("ALTER TABLE {} DISABLE TRIGGER {}").format(
                    sql.SQL(table), sql.Identifier(trigger)
                ),
                sql.SQL("ALTER TRIGGER {} ON {} RENAME TO hijacked").format(
                    sql.Identifier(trigger), sql.SQL(table)
                ),
            ]
        for (index,) in conn.execute(
            "SELECT indexrelid::regclass::text FROM pg_index i JOIN pg_class c"
            " ON c.oid = i.indrelid WHERE c.relnamespace = %s::regnamespace",
            [filled.schema],
        ).fetchall():
            statements += [
                sql.SQL("DROP INDEX {}").format(sql.SQL(index)),
                sql.SQL("REINDEX INDEX {}").format(sql.SQL(index)),
            ]
        functions = conn.execute(
            "SELECT oid::regprocedure::text, pg_get_functiondef(oid) FROM pg_proc"
            " WHERE pronamespace = %s::regnamespace",
            [filled.schema],
        ).fetchall()
        assert {"append_group", "refuse_event_change", "guard_head", "fold_summaries"} <= {
            signature.split(".", 1)[1].split("(")[0] for signature, _ in functions
        }
        for signature, definition in functions:
            statements += [
                sql.SQL(definition),
                sql.SQL("ALTER FUNCTION {} SECURITY DEFINER").format(sql.SQL(signature)),
                sql.SQL("ALTER FUNCTION {} SET search_path = pg_temp").format(sql.SQL(signature)),
                sql.SQL("ALTER FUNCTION {} OWNER TO {}").format(
                    sql.SQL(signature), sql.Identifier(app_role.login)
                ),
                sql.SQL("DROP FUNCTION {} CASCADE").format(sql.SQL(signature)),
            ]
        view = conn.execute(
            "SELECT definition FROM pg_views WHERE schemaname = %s AND viewname = 'event_index'",
            [filled.schema],
        ).fetchone()
        assert view is not None
    statements += [
        sql.SQL("CREATE OR REPLACE VIEW {} AS {}").format(
            sql.Identifier(filled.schema, "event_index"), sql.SQL(view[0].rstrip().rstrip(";"))
        ),
        sql.SQL("CREATE TABLE {} (a int)").format(sql.Identifier(filled.schema, "hijacked")),
        sql.SQL("CREATE VIEW {} AS SELECT 1").format(sql.Identifier(filled.schema, "hijacked")),
        sql.SQL("CREATE FUNCTION {}() RETURNS int LANGUAGE sql RETURN 1").format(
            sql.Identifier(filled.schema, "hijacked")
        ),
        sql.SQL("CREATE SEQUENCE {}").format(sql.Identifier(filled.schema, "hijacked")),
        sql.SQL("ALTER SCHEMA {} RENAME TO hijacked").format(schema),
        sql.SQL("ALTER SCHEMA {} OWNER TO {}").format(schema, sql.Identifier(app_role.login)),
        sql.SQL("DROP SCHEMA {} CASCADE").format(schema),
        sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(f"{filled.schema}_hijacked")),
    ]
    problems = refusals(app_role.dsn, statements)
    assert problems == []
    assert_untouched(filled, pg_dsn, before)


def test_app_role_cannot_grant_or_escalate(
    filled: EventStore, app_role: AppRole, pg_dsn: str
) -> None:
    """GRANT on the schema, its relations and functions to PUBLIC (PostgreSQL grants nothing,
    with a warning), granting the role on, changing default privileges, skipping triggers with
    ``session_replication_role``, becoming the owner, raising its own attributes, creating roles,
    dropping or taking over the owner's objects: all refused, no privilege changed."""
    before = fingerprint(pg_dsn, filled.schema)
    schema = sql.Identifier(filled.schema)
    with owner_connection(pg_dsn) as conn:
        owner_row = conn.execute(
            "SELECT nspowner::regrole::text FROM pg_namespace WHERE nspname = %s",
            [filled.schema],
        ).fetchone()
        assert owner_row is not None
        owner = sql.Identifier(owner_row[0].strip('"'))
        found = relations(conn, filled.schema)
        functions = [
            row[0]
            for row in conn.execute(
                "SELECT oid::regprocedure::text FROM pg_proc WHERE pronamespace = %s::regnamespace",
                [filled.schema],
            ).fetchall()
        ]
    login = sql.Identifier(app_role.login)
    statements: list[Attack] = [
        sql.SQL("GRANT ALL ON {} TO PUBLIC").format(sql.Identifier(filled.schema, name))
        for name in sorted(found)
    ]
    statements += [
        sql.SQL("GRANT EXECUTE ON FUNCTION {} TO PUBLIC").format(sql.SQL(f)) for f in functions
    ]
    statements += [
        sql.SQL("GRANT ALL ON ALL TABLES IN SCHEMA {} TO PUBLIC").format(schema),
        sql.SQL("GRANT SELECT ON {} TO {} WITH GRANT OPTION").format(
            sql.Identifier(filled.schema, "events"), login
        ),
        sql.SQL("GRANT CREATE ON SCHEMA {} TO PUBLIC").format(schema),
        sql.SQL("GRANT {} TO {}").format(sql.Identifier(app_role.role), owner),
        sql.SQL(
            "ALTER DEFAULT PRIVILEGES FOR ROLE {} IN SCHEMA {} GRANT ALL ON TABLES TO {}"
        ).format(owner, schema, login),
        sql.SQL("SET session_replication_role = replica"),
        sql.SQL("SET ROLE {}").format(owner),
        sql.SQL("SET SESSION AUTHORIZATION {}").format(owner),
        sql.SQL("ALTER ROLE {} SUPERUSER").format(login),
        sql.SQL("ALTER ROLE {} BYPASSRLS").format(login),
        sql.SQL("ALTER ROLE {} CREATEROLE").format(login),
        sql.SQL("CREATE ROLE {}").format(sql.Identifier(f"{app_role.login}_x")),
        sql.SQL("DROP OWNED BY {}").format(owner),
        sql.SQL("REASSIGN OWNED BY {} TO {}").format(owner, login),
    ]
    problems = refusals(app_role.dsn, statements)
    assert problems == []
    assert_untouched(filled, pg_dsn, before)


# -- what the role may write directly --------------------------------------------------------------


def _insert(store: EventStore, app_role: AppRole, position: int, hash_: bytes) -> None:
    """INSERT one row into ``events`` as the application role, bypassing the store."""
    with psycopg.connect(app_role.dsn, autocommit=True) as conn:
        conn.execute(
            sql.SQL(
                'INSERT INTO {} (position, event_id, event_type, "timestamp", hash)'
                " VALUES (%s, gen_random_uuid(), 'Forged', now(), %s)"
            ).format(sql.Identifier(store.schema, "events")),
            [position, hash_],
        )


@pytest.mark.parametrize(
    ("position", "hash_"),
    [(EVENTS + 1, FORGED_HASH), (EVENTS + 1, b"\x01")],
    ids=["forged_hash", "short_hash"],
)
def test_a_row_written_at_the_head_moves_it_and_breaks_the_chain_for_verify(
    filled: EventStore, app_role: AppRole, position: int, hash_: bytes
) -> None:
    """The role's INSERT (granted for the append paths) can put a row right after the head,
    bypassing the codec: the head trigger moves the head with it, so appends go on (no jam on
    the primary key), and `verify` reports the row, without raising."""
    _insert(filled, app_role, position, hash_)
    assert filled.head() == position
    report = filled.verify()
    assert (report.ok, report.first_bad_position) == (False, position), report
    assert filled.append(DomainEvent("After")) == position + 1


@pytest.mark.parametrize(
    "position",
    [3, EVENTS, EVENTS + 2, EVENTS + 1000],
    ids=["stored", "the_head", "a_gap", "far_beyond"],
)
def test_a_row_written_elsewhere_than_the_head_is_refused(
    filled: EventStore, app_role: AppRole, pg_dsn: str, position: int
) -> None:
    """Rows before the head collide with stored ones, and rows past head + 1 would leave a gap:
    the head trigger (or the primary key) refuses them, and the log is as it was."""
    before = fingerprint(pg_dsn, filled.schema)
    with pytest.raises(
        (psycopg.errors.IntegrityConstraintViolation, psycopg.errors.UniqueViolation)
    ):
        _insert(filled, app_role, position, FORGED_HASH)
    assert_untouched(filled, pg_dsn, before)


@pytest.mark.parametrize("position", [EVENTS + 2, 3], ids=["a_gap", "stored"])
def test_the_append_functions_setting_does_not_let_the_role_skip_the_head_trigger(
    filled: EventStore, app_role: AppRole, pg_dsn: str, position: int
) -> None:
    """The append function's own INSERTs skip the head trigger (it moves the head itself):
    only while its setting is on and the role is the owner. The application role turning the
    setting on is still refused a row off the head, and the log is as it was."""
    before = fingerprint(pg_dsn, filled.schema)
    with psycopg.connect(app_role.dsn, autocommit=True) as conn:
        conn.execute("SET tamma_events.appending = 'on'")
        with pytest.raises(
            (psycopg.errors.IntegrityConstraintViolation, psycopg.errors.UniqueViolation)
        ):
            conn.execute(
                sql.SQL(
                    'INSERT INTO {} (position, event_id, event_type, "timestamp", hash)'
                    " VALUES (%s, gen_random_uuid(), 'Forged', now(), %s)"
                ).format(sql.Identifier(filled.schema, "events")),
                [position, FORGED_HASH],
            )
    assert_untouched(filled, pg_dsn, before)
    assert filled.append(DomainEvent("After")) == EVENTS + 1


def test_the_role_cannot_move_the_head(filled: EventStore, app_role: AppRole) -> None:
    head = sql.Identifier(filled.schema, "head")
    for statement in (
        sql.SQL("UPDATE {} SET position = position + 5").format(head),
        sql.SQL("UPDATE {} SET hash = {}").format(head, sql.Literal(FORGED_HASH)),
        sql.SQL("SELECT * FROM {} FOR UPDATE").format(head),
    ):
        with psycopg.connect(app_role.dsn, autocommit=True) as conn:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(statement)
    assert filled.head() == EVENTS
    assert filled.verify().ok


def test_a_row_written_into_a_compacted_prefix_is_refused(
    filled: EventStore, app_role: AppRole, tmp_path: Path
) -> None:
    """Once the log's prefix is compacted its positions are free in ``events``; the head trigger
    still refuses a row there, and `verify` stays ok."""
    archived = filled.compact_events(
        datetime.now(timezone.utc) + timedelta(days=1), archive_dir=tmp_path
    )
    assert archived > 3
    with pytest.raises(psycopg.errors.IntegrityConstraintViolation):
        _insert(filled, app_role, 3, FORGED_HASH)
    assert filled.verify().ok
    assert filled.head() == EVENTS


def test_verify_reports_a_row_found_in_a_compacted_prefix(
    filled: EventStore, pg_dsn: str, tmp_path: Path
) -> None:
    """Should one get there anyway (a superuser with triggers off, a restored backup), `verify`
    reports it rather than passing."""
    filled.compact_events(datetime.now(timezone.utc) + timedelta(days=1), archive_dir=tmp_path)
    with owner_connection(pg_dsn) as conn:
        conn.execute("SET session_replication_role = replica")  # triggers off: superuser only
        conn.execute(
            sql.SQL(
                'INSERT INTO {} (position, event_id, event_type, "timestamp", hash)'
                " VALUES (3, gen_random_uuid(), 'Forged', now(), %s)"
            ).format(sql.Identifier(filled.schema, "events")),
            [FORGED_HASH],
        )
    for report in (filled.verify(), filled.verify(include_archived=False)):
        assert (report.ok, report.first_bad_position) == (False, 3), report
        assert "compacted" in (report.reason or "")


# -- 2. the application API as the application role ----------------------------------------------


def _sessions_of(pg_dsn: str, application_name: str) -> set[str]:
    """The session users of the server's connections named ``application_name``."""
    with owner_connection(pg_dsn) as conn:
        rows = conn.execute(
            "SELECT DISTINCT usename FROM pg_stat_activity WHERE application_name = %s",
            [application_name],
        ).fetchall()
    return {row[0] for row in rows}


def _take(subscription: Any, count: int) -> list[SequencedEvent]:
    """The next ``count`` events of a sync subscription, stopping it after 60 s at most (a
    bound for a hang)."""
    watchdog = threading.Timer(60.0, subscription.stop)
    watchdog.start()
    try:
        return list(itertools.islice(subscription, count))
    finally:
        watchdog.cancel()


def test_app_role_runs_durable_consumers(filled: EventStore, app_role: AppRole) -> None:
    """Connected as the login role, with ``migrate=False``: a transactional consumer appends
    under its checkpoint, parks an event, and the role replays, resets and drops it; the log
    stays as appended and verifies."""
    before = filled.get_events()
    with EventStore(app_role.dsn, schema=filled.schema, migrate=False, max_connections=4) as app:

        def handler(events: list[SequencedEvent], tx: Any) -> None:
            for event in events:
                if event.position == 5:
                    raise ValueError("poison")
                tx.append(DomainEvent("Handled", {"of": event.position}))

        consumer = app.consumer(
            "audit",
            Query.of(types=["Seeded"]),
            partition_by="issueId",
            partitions=3,
            max_attempts=1,
        )
        consumer.run(handler, transactional=True, until_idle=True)
        handled = app.read(Query.of(types=["Handled"])).events
        assert sorted(e.data["of"] for e in handled) == [p for p in range(1, EVENTS + 1) if p != 5]
        assert [p.position for p in app.parked_events("audit")] == [5]
        assert app.replay_parked("audit") == [5]
        assert app.reset_consumer("audit", to=EVENTS) == 3
        assert app.drop_consumer("audit") == 3
        assert app.consumers() == []
    assert filled.get_events()[: len(before)] == before
    assert filled.verify().ok


def test_app_role_runs_the_application(
    filled: EventStore, app_role: AppRole, pg_dsn: str, tmp_path: Path
) -> None:
    """With ``migrate=False``, connected as the login role: appends (one event, a group, a batch
    large enough to go by COPY, a caller's transaction, a transaction block), conditions (met and
    violated), reads, queries, streams, exports, a live subscription, snapshots, projections,
    metrics and `verify` all work."""
    name = f"tamma-app-{uuid.uuid4().hex[:8]}"
    dsn = app_role.with_settings(application_name=name)
    with EventStore(
        dsn, schema=filled.schema, migrate=False, max_connections=4, chunk_events=10
    ) as app:
        assert app.head() == EVENTS
        assert _sessions_of(pg_dsn, name) == {app_role.login}

        issue = {"issueId": "I-new"}
        position = app.append(DomainEvent("Opened", {"by": "app"}, issue))
        assert position == EVENTS + 1
        seen = app.read(Query.of(tags=issue))
        assert [e.position for e in seen] == [position]
        condition = AppendCondition(Query.of(tags=issue), after=seen.head)
        assert app.append(DomainEvent("Assigned", tags=issue), condition) == EVENTS + 2
        with pytest.raises(EventStoreError) as conflict:
            app.append(DomainEvent("Assigned", tags=issue), condition)
        assert conflict.value.code == APPEND_CONDITION_FAILED
        last = app.append_batch([DomainEvent("Bulk", {"n": n}) for n in range(25)])  # COPY
        assert last == EVENTS + 27
        assert app.append_batch([DomainEvent("Small"), DomainEvent("Small")]) == EVENTS + 29
        with psycopg.connect(app_role.dsn) as own:
            assert app.append(DomainEvent("Outbox"), conn=own) == EVENTS + 30
        with app.transaction() as tx:
            tx.append(DomainEvent("InBlock"))
            tx.append(DomainEvent("InBlock"))
        total = EVENTS + 32
        assert app.head() == total

        stored = app.get_event(seen[0].event_id)
        assert stored is not None and stored.event_type == "Opened"
        assert len(app.get_events()) == total
        assert [e.position for e in app.get_events(EventFilter(issue_ids=["I-new"]))] == [
            EVENTS + 1,
            EVENTS + 2,
        ]
        assert app.count_events() == total
        assert app.count_events(EventFilter(event_types=["Bulk"])) == 25
        assert "Bulk" in app.get_event_types()
        assert "I-new" in app.get_tags()["issueId"]
        by_type = {row.key: row.count for row in app.aggregate(group_by="event_type")}
        assert by_type["Bulk"] == 25
        assert sum(len(page) for page in app.paginate(page_size=7)) == total
        assert [e.position for e in app.stream_events(batch_size=5)] == list(range(1, total + 1))
        table = pa.Table.from_batches(list(app.export_arrow(batch_size=8)))
        assert table.num_rows == total
        assert app.export_parquet(None, tmp_path / "export.parquet") == total

        subscription = app.subscribe(Query.of(types=["Live"]), after=app.head())
        try:
            live = app.append(DomainEvent("Live"))
            assert [e.position for e in _take(subscription, 1)] == [live]
        finally:
            subscription.stop()

        snapshot = app.create_snapshot("agg-1", 3, {"state": 1})
        assert snapshot.version == 3
        app.create_snapshot("agg-1", 3, {"state": 2})  # the same version again: an UPDATE
        latest = app.get_snapshot("agg-1")
        assert latest is not None and latest.state == {"state": 2}
        projected = app.project(
            Query.of(types=["Bulk"]),
            0,
            lambda n, _: n + 1,
            key="bulk-count",
            snapshot_every=10,
        )
        assert projected.state == 25

        report = app.verify()
        assert report.ok and report.checked == total + 1
        metrics = app.metrics()
        # (the transaction block's two are not counted by the store's metrics)
        assert metrics["appends"]["events"] >= total + 1 - EVENTS - 2
        assert metrics["appends"]["conflicts"] == 1
        assert _sessions_of(pg_dsn, name) == {app_role.login}
    assert filled.verify().ok


def test_app_role_runs_the_async_application(
    filled: EventStore, app_role: AppRole, pg_dsn: str, tmp_path: Path
) -> None:
    """The same through `AsyncEventStore`: its compaction is refused with a clear STORAGE_ERROR,
    and migrating an up-to-date schema does nothing."""
    name = f"tamma-app-{uuid.uuid4().hex[:8]}"

    async def main() -> None:
        async with AsyncEventStore(
            app_role.with_settings(application_name=name),
            schema=filled.schema,
            migrate=False,
            max_connections=4,
            chunk_events=10,
        ) as app:
            assert await app.head() == EVENTS
            assert _sessions_of(pg_dsn, name) == {app_role.login}
            tags = {"issueId": "I-async"}
            first = await app.append(DomainEvent("Opened", tags=tags))
            condition = AppendCondition(Query.of(tags=tags), after=first)
            assert await app.append(DomainEvent("Next", tags=tags), condition) == first + 1
            with pytest.raises(EventStoreError) as conflict:
                await app.append(DomainEvent("Next", tags=tags), condition)
            assert conflict.value.code == APPEND_CONDITION_FAILED
            assert await app.append_batch([DomainEvent("Bulk") for _ in range(25)]) == first + 26
            async with app.transaction() as tx:
                await tx.append(DomainEvent("InBlock"))
            total = first + 27
            assert len(await app.read()) == total
            assert len(await app.get_events(EventFilter(event_types=["Bulk"]))) == 25
            assert await app.count_events() == total
            assert [e.position async for e in app.stream_events(batch_size=9)] == list(
                range(1, total + 1)
            )
            assert sum([b.num_rows async for b in app.export_arrow(batch_size=8)]) == total
            with app.subscribe(after=total) as subscription:
                live = await app.append(DomainEvent("Live"))
                received = await asyncio.wait_for(anext(aiter(subscription)), 20)
                assert received.position == live
            await app.create_snapshot("agg", 1, [1])
            await app.create_snapshot("agg", 1, [2])
            snapshot = await app.get_snapshot("agg")
            assert snapshot is not None and snapshot.state == [2]
            assert (await app.verify()).ok
            with pytest.raises(EventStoreError) as compaction:
                await app.compact_events(
                    datetime.now(timezone.utc) + timedelta(days=1), archive_dir=tmp_path
                )
            assert compaction.value.code == STORAGE_ERROR
            assert compaction.value.context.get("sqlstate") == "42501"
            assert await app.migrate() == []  # up to date: nothing to do, nothing refused
            assert _sessions_of(pg_dsn, name) == {app_role.login}

    asyncio.run(main())
    assert filled.verify().ok
    assert filled.head() == EVENTS + 29


def test_app_role_cannot_compact(
    filled: EventStore, app_role: AppRole, pg_dsn: str, tmp_path: Path
) -> None:
    """`compact_events` as the application role fails with a STORAGE_ERROR naming the
    privilege (not a raw psycopg error); the log keeps every event and the manifest stays
    empty."""
    before = fingerprint(pg_dsn, filled.schema)
    with EventStore(app_role.dsn, schema=filled.schema, migrate=False, max_connections=2) as app:
        with pytest.raises(EventStoreError) as info:
            app.compact_events(datetime.now(timezone.utc) + timedelta(days=1), archive_dir=tmp_path)
    assert not isinstance(info.value, psycopg.Error)
    assert info.value.code == STORAGE_ERROR
    assert info.value.context.get("sqlstate") == "42501"
    assert "compacting failed" in info.value.message
    assert "permission denied" in info.value.message
    assert_untouched(filled, pg_dsn, before)
    assert filled.get_events(include_archived=True)[0].position == 1


def test_app_role_opens_a_current_schema_and_cannot_migrate(
    filled: EventStore, app_role: AppRole, pg_dsn: str
) -> None:
    """Opening with ``migrate=True`` (the default) as the application role works on a schema
    already up to date: the migrator reads its version and changes nothing. A schema to create,
    or one an older tamma-events migrated, needs the owner: opening it fails clearly (42501 from
    the migrator; with ``migrate=False``, the versions), and nothing changes."""
    before = fingerprint(pg_dsn, filled.schema)
    with EventStore(app_role.dsn, schema=filled.schema, max_connections=2) as app:
        assert app.applied_on_open == [] and app.migrate() == []
        assert app.head() == EVENTS
    assert_untouched(filled, pg_dsn, before)
    with pytest.raises(EventStoreError) as opened:
        EventStore(app_role.dsn, schema=f"{filled.schema}_new", max_connections=2)
    assert opened.value.code == STORAGE_ERROR
    assert "migrating the schema failed" in opened.value.message
    assert opened.value.context.get("sqlstate") == "42501"

    old = f"{filled.schema}_old"
    shipped = history()
    try:
        make_outdated(pg_dsn, old, shipped[-2].version)  # what the previous release left
        with owner_connection(pg_dsn) as conn:
            conn.execute(
                sql.SQL(
                    "GRANT USAGE ON SCHEMA {0} TO {1}; GRANT SELECT ON ALL TABLES IN SCHEMA"
                    " {0} TO {1}"
                ).format(sql.Identifier(old), sql.Identifier(app_role.role))
            )
        with pytest.raises(EventStoreError) as stale:
            EventStore(app_role.dsn, schema=old, migrate=False, max_connections=2)
        assert stale.value.code == STORAGE_ERROR
        assert stale.value.context == {
            "schema": old,
            "version": shipped[-2].version,
            "needed": shipped[-1].version,
        }
        with pytest.raises(EventStoreError) as migrating:
            EventStore(app_role.dsn, schema=old, max_connections=2)
        assert migrating.value.context.get("sqlstate") == "42501"
    finally:
        with owner_connection(pg_dsn) as conn:
            conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(old)))


def test_grant_app_role_run_by_the_app_role_grants_nothing(
    filled: EventStore, app_role: AppRole, pg_dsn: str
) -> None:
    """The application role cannot pass its rights on through `grant_app_role`: creating a role
    is refused, and granting to an existing one leaves it without any privilege."""
    other = f"tamma_other_{uuid.uuid4().hex[:8]}"
    try:
        with owner_connection(pg_dsn) as conn:
            conn.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(other)))
        with EventStore(app_role.dsn, schema=filled.schema, migrate=False) as app:
            with pytest.raises(EventStoreError) as created:
                app.grant_app_role(f"{other}_new")
            assert created.value.context.get("sqlstate") == "42501"
            app.grant_app_role(other, create=False)
        with owner_connection(pg_dsn) as conn:
            granted = privileges(conn, other, filled.schema)
            assert granted == {name: set() for name in granted}
            usage = conn.execute(
                "SELECT has_schema_privilege(%s, %s, 'USAGE')", [other, filled.schema]
            ).fetchone()
            assert usage == (False,)
            created_role = conn.execute(
                "SELECT 1 FROM pg_roles WHERE rolname = %s", [f"{other}_new"]
            ).fetchone()
            assert created_role is None
    finally:
        drop_roles(pg_dsn, other, f"{other}_new")


@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_a_role_set_with_options_in_the_dsn_is_the_one_used(
    filled: EventStore, app_role: AppRole, pg_dsn: str, flavour: str
) -> None:
    """``docs/integrity.md`` offers ``options=-c role=tamma_app`` as the other way to run as the
    application role: a store opened so must then have only that role's rights (creating a
    role is refused, as for the login role), not those of the DSN's user."""
    dsn = make_conninfo(pg_dsn, options=f"-c role={app_role.role}")
    other = f"{app_role.role}_x"
    if flavour == "sync":
        with EventStore(dsn, schema=filled.schema, migrate=False, max_connections=2) as app:
            with pytest.raises(EventStoreError) as info:
                app.grant_app_role(other)
    else:

        async def main() -> pytest.ExceptionInfo[EventStoreError]:
            async with AsyncEventStore(
                dsn, schema=filled.schema, migrate=False, max_connections=2
            ) as app:
                with pytest.raises(EventStoreError) as raised:
                    await app.grant_app_role(other)
                return raised

        info = asyncio.run(main())
    assert info.value.context.get("sqlstate") == "42501"


# -- 3. secrets -----------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def cli_refused() -> Iterator[subprocess.Popen[str]]:
    """``python -m tamma_events --dsn <refused, with a password> verify``, started with the
    module, read by `test_the_cli_hides_the_password`."""
    process = subprocess.Popen(
        [sys.executable, "-m", "tamma_events", "--dsn", CLI_REFUSED_DSN, "verify"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_cli_env(),
    )
    yield process
    if process.poll() is None:
        process.kill()
    process.communicate()


def _cli_env(**extra: str) -> dict[str, str]:
    """The environment of a CLI run: no DSN or password from this one, wide lines (a wrapped
    line could split a password), plus ``extra``."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("TAMMA_EVENTS_DSN", "PGPASSWORD") and not key.startswith("PYTEST")
    }
    env.update(COLUMNS="400", NO_COLOR="1", **extra)
    return env


def assert_hidden(secret: str, *texts: object) -> None:
    """``secret`` is in none of ``texts``, even with their line breaks removed."""
    for text in texts:
        shown = str(text)
        assert secret not in shown, shown
        assert secret not in re.sub(r"\s+", "", shown), shown


def error_texts(exc: BaseException) -> list[str]:
    """What an error shows: its text, its repr, its context and the whole formatted chain."""
    texts = [str(exc), repr(exc), "".join(traceback.format_exception(exc))]
    if isinstance(exc, EventStoreError):
        texts += [repr(exc.context), repr(exc.to_dict())]
    return texts


@pytest.fixture
def debug_logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """Every record at DEBUG and above from the store's, psycopg's and the pool's loggers."""
    for name in LOGGERS:
        caplog.set_level(logging.DEBUG, logger=name)
    return caplog


def logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Each record's message, arguments and formatted exception."""
    texts = [caplog.text]
    for record in caplog.records:
        texts += [record.getMessage(), repr(record.args)]
        if record.exc_info and record.exc_info[1] is not None:
            texts += error_texts(record.exc_info[1])
    return texts


def url_form(dsn: str) -> str:
    """``dsn`` (host, port, database, user and password) as a ``postgresql://`` URL."""
    params = conninfo_to_dict(dsn)
    query: dict[str, str] = {k: str(params[k]) for k in ("host", "port") if k in params}
    return (
        f"postgresql://{quote(str(params['user']), safe='')}:"
        f"{quote(str(params['password']), safe='')}@/{params.get('dbname', 'postgres')}"
        f"?{urlencode(query)}"
    )


def _refused_dsns(secret: str) -> dict[str, str]:
    return {
        "url": REFUSED.format(secret=secret),
        "keyword": f"host=127.0.0.1 port=1 dbname=x user=u password={secret} connect_timeout=1",
        "quoted_keyword": (f"host=127.0.0.1 port=1 user=u password='{secret} x' connect_timeout=1"),
    }


@pytest.mark.parametrize("form", ["url", "keyword", "quoted_keyword", "PGPASSWORD"])
def test_a_failed_connection_hides_the_password(
    form: str, debug_logs: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Connecting fails (nothing listens): the sync and the async store's errors, their
    context and traceback chain, the async store's repr, and every DEBUG record, say nothing
    of the password, in a URL, a ``password=`` conninfo (plain or quoted) or
    ``$PGPASSWORD``."""
    secret = f"s3cr3t-{uuid.uuid4().hex[:10]}"
    if form == "PGPASSWORD":
        monkeypatch.setenv("PGPASSWORD", secret)
        dsn = "host=127.0.0.1 port=1 dbname=x user=u connect_timeout=1"
    else:
        dsn = _refused_dsns(secret)[form]
    with pytest.raises(EventStoreError) as sync_error:
        EventStore(dsn, connect_timeout=0.3)
    assert sync_error.value.code == STORAGE_ERROR
    assert "cannot connect to PostgreSQL at 127.0.0.1:1: " in sync_error.value.message
    assert_hidden(secret, *error_texts(sync_error.value))
    if form != "PGPASSWORD":
        assert "password=***" in sync_error.value.context["dsn"]

    async def main() -> tuple[BaseException, list[str]]:
        store = AsyncEventStore(dsn, connect_timeout=0.3)
        reprs = [repr(store), str(store)]
        try:
            await store.open()
        except EventStoreError as exc:
            return exc, [*reprs, repr(store), str(store)]
        raise AssertionError("the async store connected to nothing")

    async_error, reprs = asyncio.run(main())
    assert isinstance(async_error, EventStoreError) and async_error.code == STORAGE_ERROR
    assert_hidden(secret, *error_texts(async_error), *reprs)
    assert any(r.name.startswith("psycopg") for r in debug_logs.records)
    assert_hidden(secret, *logged(debug_logs))


@pytest.mark.parametrize(
    "dsn",
    [
        "postgresql://u:{secret}@[::1/x",  # an IPv6 address without its closing bracket
        "postgresql://u:{secret}%zz@127.0.0.1:1/x",  # a '%' not percent-encoded
        "postgresql://u:{secret} x@127.0.0.1:1/x",  # a space not percent-encoded
    ],
)
def test_a_malformed_dsn_hides_the_password(dsn: str, debug_logs: pytest.LogCaptureFixture) -> None:
    """A DSN libpq cannot parse (a typo, a password with a character a URL must escape) is
    refused, sync and async, without quoting the password back: libpq's own message does."""
    secret = f"s3cr3t-{uuid.uuid4().hex[:10]}"
    with pytest.raises(EventStoreError) as sync_error:
        EventStore(dsn.format(secret=secret), connect_timeout=0.3)

    async def main() -> BaseException:
        try:
            await AsyncEventStore(dsn.format(secret=secret), connect_timeout=0.3).open()
        except EventStoreError as exc:
            return exc
        raise AssertionError("the async store accepted a malformed DSN")

    async_error = asyncio.run(main())
    assert_hidden(
        secret, *error_texts(sync_error.value), *error_texts(async_error), *logged(debug_logs)
    )


def test_a_working_session_hides_the_password(
    filled: EventStore,
    app_role: AppRole,
    pg_dsn: str,
    debug_logs: pytest.LogCaptureFixture,
) -> None:
    """A session whose DSN carries the password (URL form for the primary, ``password=`` form
    for a replica that is down), through appends, reads, a subscription, its backends being
    terminated (the pool and the listener reconnect, an append runs again), `metrics` and the
    Prometheus text: no repr, record or metric shows the password."""
    secret = app_role.password
    params = conninfo_to_dict(app_role.dsn)
    url = (
        f"postgresql://{params['user']}:{secret}@/{params.get('dbname', 'postgres')}"
        f"?host={params.get('host', '')}" + (f"&port={params['port']}" if "port" in params else "")
    )
    replica = f"host=127.0.0.1 port=1 user=u password={secret} connect_timeout=1"
    with EventStore(
        url,
        schema=filled.schema,
        migrate=False,
        max_connections=3,
        replicas=[replica],
        replica_timeout=0.2,
    ) as app:
        assert secret in app.dsn  # what it connects with: documented as holding the password
        texts = [repr(app), str(app)]
        subscription = app.subscribe(after=app.head())
        try:
            first = app.append(DomainEvent("Before"))
            assert [e.position for e in _take(subscription, 1)] == [first]
            with owner_connection(pg_dsn) as conn:
                # Each waited for, up to a minute (a bound for a hang); counted as found, not
                # as ended within the wait.
                killed = conn.execute(
                    "SELECT pg_terminate_backend(pid, 60000)"
                    " FROM pg_stat_activity WHERE usename = %s",
                    [app_role.login],
                ).fetchall()
            assert len(killed) >= 2
            second = app.append(DomainEvent("After"))
            assert [e.position for e in _take(subscription, 1)] == [second]
        finally:
            subscription.stop()
        assert len(app.read(after=EVENTS)) == 2
        measured = app.measure_replicas()
        metrics = app.metrics()
        assert metrics["replicas"][0]["up"] is False
        texts += [repr(measured), repr(metrics)]
        texts += [generate_latest(app.prometheus_registry).decode()]
        texts += [repr(app.pool_stats())]
    texts += [repr(app)]
    assert any(r.name.startswith("tamma_events") for r in debug_logs.records)
    assert_hidden(secret, *texts, *logged(debug_logs))


def test_the_http_app_hides_the_password(
    filled: EventStore, app_role: AppRole, pg_dsn: str, debug_logs: pytest.LogCaptureFixture
) -> None:
    """``/health``, ``/metrics`` and the error bodies of the HTTP app, served by a store whose
    DSN holds the password (and a down replica's DSN too), while the database works, for bad
    requests, and once the role may no longer log in (503 with the store's error)."""
    secret = app_role.password
    replica = REFUSED.format(secret=secret)
    with EventStore(
        app_role.dsn,
        schema=filled.schema,
        migrate=False,
        max_connections=2,
        # Once the role may no longer log in, a request waits this long for a connection
        # before it is refused: short, but the working requests find one open already.
        pool_timeout=2,
        replicas=[replica],
        replica_timeout=0.2,
    ) as app:
        bodies: list[str] = []
        server = LiveServer(create_app(app))
        try:
            with httpx.Client(base_url=server.url, timeout=20, trust_env=False) as client:
                health = client.get("/health")
                assert health.status_code == 200 and health.json()["head"] == EVENTS
                metrics = client.get("/metrics")
                assert metrics.status_code == 200 and "tamma_events_" in metrics.text
                assert "password=***" in metrics.text
                bad = client.get("/events", params={"page_size": "many"})
                assert bad.status_code == 400
                bodies += [health.text, metrics.text, bad.text, repr(dict(metrics.headers))]
                with owner_connection(pg_dsn) as conn:
                    conn.execute(
                        sql.SQL("ALTER ROLE {} NOLOGIN").format(sql.Identifier(app_role.login))
                    )
                    conn.execute(
                        "SELECT pg_terminate_backend(pid, 60000) FROM pg_stat_activity"
                        " WHERE usename = %s",
                        [app_role.login],
                    )
                down = client.get("/health")
                assert down.status_code == 503, down.text
                assert down.json()["error"]["code"] == STORAGE_ERROR
                failed = client.get("/events")
                assert failed.status_code >= 500
                bodies += [down.text, failed.text, client.get("/metrics").text]
        finally:
            server.stop()
    assert_hidden(secret, *bodies, *logged(debug_logs))


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tamma_events", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env or _cli_env(),
    )


def test_the_cli_hides_the_password(
    filled: EventStore, app_role: AppRole, cli_refused: subprocess.Popen[str]
) -> None:
    """The CLI's output (stdout and stderr) when it fails: the connection refused (the run the
    module started), and a server that refuses the work (the application role cannot create a
    schema),
    with the password in a URL, a ``password=`` conninfo (from ``--dsn`` and from
    ``$TAMMA_EVENTS_DSN``) and ``$PGPASSWORD``. Each exits 1 with its error and no password."""
    secret = app_role.password
    params = conninfo_to_dict(app_role.dsn)
    keyword = make_conninfo(app_role.dsn)  # the conninfo form, password=... included
    assert f"password={secret}" in keyword
    without_password = make_conninfo(
        "", **{key: value for key, value in params.items() if key != "password"}
    )
    # A schema that does not exist yet: creating it is the owner's job, refused to the role.
    schema = ("--schema", f"{filled.schema}_new")
    runs = {
        "keyword": _cli("--dsn", keyword, *schema, "init"),
        "url": _cli("--dsn", url_form(app_role.dsn), *schema, "init"),
        "PGPASSWORD": _cli(
            "--dsn", without_password, *schema, "init", env=_cli_env(PGPASSWORD=secret)
        ),
        "env_dsn": _cli(*schema, "init", env=_cli_env(TAMMA_EVENTS_DSN=keyword)),
    }
    outputs = {}
    for name, process in runs.items():
        out, err = process.communicate(timeout=120)
        outputs[name] = (process.returncode, out + err)
    out, err = cli_refused.communicate(timeout=120)
    outputs["refused"] = (cli_refused.returncode, out + err)
    assert (
        "cannot connect to PostgreSQL at 127.0.0.1:1: connection refused" in outputs["refused"][1]
    )
    assert_hidden("SECRET", outputs["refused"][1])
    for name, (code, text) in outputs.items():
        assert code == 1, (name, text)
        assert "error STORAGE_ERROR" in text, (name, text)
        assert name == "refused" or '"sqlstate": "42501"' in text, (name, text)
        assert_hidden(secret, text)


def test_the_cli_hides_the_password_of_a_malformed_dsn() -> None:
    """A ``--dsn`` libpq cannot parse (here an IPv6 address without its closing bracket) exits
    1 with the error, without the password."""
    secret = f"s3cr3t-{uuid.uuid4().hex[:10]}"
    process = _cli("--dsn", f"postgresql://u:{secret}@[::1/x", "init")
    out, err = process.communicate(timeout=120)
    assert process.returncode == 1, out + err
    assert "error VALIDATION_FAILED" in out + err
    assert_hidden(secret, out + err)
