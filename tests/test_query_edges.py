"""Edges of the query API: values at the limits of what PostgreSQL holds, caller pools in other
time zones, stores refilled under the same name, and roles granted before the summaries
existed."""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any
from unittest import mock

import msgspec
import psycopg
import pytest
from psycopg import sql
from psycopg_pool import ConnectionPool

from _schema_support import history, make_outdated, shipped_up_to
from tamma_events import (
    QUERY_ERROR,
    VALIDATION_FAILED,
    DomainEvent,
    EventFilter,
    EventStore,
    EventStoreError,
)
from tamma_events import codec as _codec
from tamma_events.codec.reference import json_rows
from tamma_events.ops.migrating import drop
from tamma_events.sql import schema as schema_module


def _error(call: Callable[[], Any]) -> EventStoreError:
    with pytest.raises(EventStoreError) as caught:
        call()
    return caught.value


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("start_time", "0001-01-01T00:00:00+05:00"),
        ("end_time", datetime.max.replace(tzinfo=timezone(timedelta(hours=-5)))),
    ],
)
def test_times_outside_utc_range_are_query_errors(
    store: EventStore, field: str, value: Any
) -> None:
    error = _error(lambda: store.get_events(EventFilter(**{field: value})))
    assert error.code == QUERY_ERROR and error.context["field"] == field


@pytest.mark.parametrize("field", ["limit", "offset"])
def test_counts_beyond_bigint_are_query_errors(store: EventStore, field: str) -> None:
    store.append(DomainEvent("A"))
    error = _error(lambda: store.get_events(EventFilter(**{field: 2**63})))
    assert error.code == QUERY_ERROR and error.context["field"] == field
    assert _error(lambda: store.count_events(EventFilter(**{field: 2**63}))).code == QUERY_ERROR
    assert len(store.get_events(EventFilter(**{field: 2**63 - 1}))) == (field == "limit")


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("cache_size", 2.5),
        ("cache_size", math.inf),
        ("cache_size", math.nan),
        ("cache_size", True),
        ("cache_ttl", math.nan),
        ("cache_ttl", math.inf),
        ("cache_ttl", -1),
    ],
)
def test_bad_cache_settings_are_validation_errors(pg_dsn: str, name: str, value: Any) -> None:
    error = _error(lambda: EventStore(pg_dsn, schema="never_created", **{name: value}))
    assert error.code == VALIDATION_FAILED and error.context == {"field": name}


def test_a_caller_pool_in_another_time_zone_reads_utc_timestamps(
    make_store: Callable[..., EventStore], pg_dsn: str
) -> None:
    owner = make_store()
    # New York's offset before 1883 was local mean time, -04:56:02: seconds RFC 3339 cannot carry.
    old = DomainEvent("Founded", timestamp=datetime(1799, 12, 31, 23, 59, tzinfo=timezone.utc))
    recent = DomainEvent("Opened", timestamp=datetime(2026, 3, 8, 7, 30, 0, 250, timezone.utc))
    owner.append_batch([old, recent])
    expected = owner.get_events()
    pool: ConnectionPool[Any] = ConnectionPool(
        pg_dsn,
        kwargs={"options": "-c TimeZone=America/New_York"},
        min_size=1,
        max_size=2,
        open=True,
    )
    try:
        with EventStore(pool=pool, schema=owner.schema, migrate=False, cache_size=0) as local:
            for read in (
                lambda: local.get_events(),
                lambda: list(local.read()),
                lambda: [local.get_event(e.event_id) for e in expected],
                lambda: local.get_page().events,
            ):
                got = read()
                assert got == expected
                assert all(e is not None and e.timestamp.utcoffset() == timedelta(0) for e in got)
            assert [e.timestamp for e in local.get_events()] == [old.timestamp, recent.timestamp]
    finally:
        pool.close()


def test_a_refilled_schema_at_the_same_position_is_not_served_from_the_cache(
    pg_dsn: str,
) -> None:
    name = f"t_{uuid.uuid4().hex[:12]}"
    try:
        with EventStore(pg_dsn, schema=name) as store:
            store.append(DomainEvent("First", {"n": 1}))
            assert [e.event_type for e in store.get_events()] == ["First"]
            drop(pg_dsn, name)
            store.migrate()
            store.append(DomainEvent("Second", {"n": 2}))  # the head is at position 1 again
            assert [e.event_type for e in store.get_events()] == ["Second"]
            assert store.cache_stats().hits == 0
    finally:
        drop(pg_dsn, name)


def _append_at_version_3(store: EventStore, events: list[DomainEvent]) -> None:
    """Append ``events`` through the append function of a schema at version 3."""
    batch = _codec.prepare(events)
    with psycopg.connect(store.dsn, autocommit=True) as conn:
        conn.execute(
            sql.SQL(
                "SELECT {}(%s::integer[], %s::jsonb[], %s::jsonb, %s::bytea, %s::integer[])"
            ).format(sql.Identifier(store.schema, "append_group")),
            [
                [batch.count],
                [None],
                msgspec.json.encode(json_rows(batch)).decode(),
                bytes(batch.buffer),
                list(batch.offsets),
            ],
        )


def test_a_role_granted_before_the_summaries_can_query_after_the_upgrade(pg_dsn: str) -> None:
    name = f"t_{uuid.uuid4().hex[:12]}"
    role = f"tamma_app_{uuid.uuid4().hex[:8]}"
    try:
        # A store the migrations before the baseline left at version 3, opened as the
        # tamma-events of that version would open it.
        make_outdated(pg_dsn, name, 3)
        with mock.patch.object(schema_module, "migrations", lambda: shipped_up_to(3)):
            old = EventStore(pg_dsn, schema=name)
        with old:
            # Through version 3's own append_group, which moves the head itself (this
            # package's appends need the functions and the head trigger of later versions).
            _append_at_version_3(
                old, [DomainEvent("IssueCreated", tags={"issueId": f"I-{n}"}) for n in range(5)]
            )
            old.grant_app_role(role)
            assert old.migrate() == [m.version for m in history() if m.version > 3]
        dsn = psycopg.conninfo.make_conninfo(pg_dsn, options=f"-c role={role}")
        with EventStore(dsn, schema=name, migrate=False, max_connections=2) as app:
            assert app.count_events(EventFilter(issue_ids=["I-3"])) == 1  # backfilled
            assert [e.tags for e in app.get_events(EventFilter(issue_ids=["I-3"]))] == [
                {"issueId": "I-3"}
            ]
            assert app.get_event_types() == ["IssueCreated"]
            assert app.get_tags() == {"issueId": [f"I-{n}" for n in range(5)]}
            start = datetime.now(timezone.utc) - timedelta(hours=1)
            assert len(app.get_events(EventFilter(start_time=start))) == 5
            app.append(DomainEvent("IssueClosed", tags={"issueId": "I-3"}))
            assert app.count_events(EventFilter(issue_ids=["I-3"])) == 2
    finally:
        drop(pg_dsn, name)
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
            conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))
