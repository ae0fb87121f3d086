"""The hash chain and immutability against a real PostgreSQL.

Tampering is done the way an attacker with superuser rights would: with
``session_replication_role = replica``, which skips the immutability triggers. `verify` must name
the first position each tamper affects.
"""

from __future__ import annotations

import random
import string
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg import sql

from tamma_events import DomainEvent, EventStore, StorageError
from tamma_events.codec import reference as _pycodec
from tamma_events.ops.verifying import IntegrityReport, verify

EVENTS = 300


def _random_text(rng: random.Random) -> str:
    alphabet = string.ascii_letters + string.digits + ' "\\/\n\t\b\f\r\x01\x1f\u2028é€😀ß\u0301'
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))


def _random_json(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(9 if depth < 4 else 6)
    if kind == 0:
        return _random_text(rng)
    if kind == 1:
        return rng.choice([0, -1, 1, 2**31, -(2**63), 2**64 + 7, 10**30])
    if kind == 2:
        return rng.choice(
            [0.0, -0.0, 1.5, -2.25e-7, 1e16, 1.7976931348623157e308, 5e-324, 0.1 + 0.2, 123456.789]
        )
    if kind == 3:
        return rng.choice([True, False, None])
    if kind == 4:
        return rng.random() * 10 ** rng.randint(-20, 20)
    if kind == 5:
        return rng.randint(-(10**6), 10**6)
    if kind == 6:
        return [_random_json(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {_random_text(rng): _random_json(rng, depth + 1) for _ in range(rng.randint(0, 4))}


def random_events(count: int, seed: int = 1) -> Iterator[DomainEvent]:
    rng = random.Random(seed)
    start = datetime(2026, 3, 1, tzinfo=timezone.utc)
    zones = [timezone.utc, timezone(timedelta(hours=5, minutes=30)), timezone(timedelta(hours=-8))]
    for n in range(count):
        data = {_random_text(rng): _random_json(rng) for _ in range(rng.randint(0, 5))}
        metadata = {"n": n, "note": _random_text(rng)}
        tags = {
            (_random_text(rng) or "k")[:128]: _random_text(rng) for _ in range(rng.randint(0, 3))
        }
        when = (start + timedelta(microseconds=rng.randrange(10**12))).astimezone(rng.choice(zones))
        event_type = (_random_text(rng) or "E")[:255]
        yield DomainEvent(event_type, data, tags, metadata, timestamp=when)


def superuser(dsn: str) -> psycopg.Connection[Any]:
    conn = psycopg.connect(dsn, autocommit=True)
    conn.execute("SET session_replication_role = replica")
    return conn


@pytest.fixture
def filled(store: EventStore) -> EventStore:
    events = list(random_events(EVENTS))
    for i in range(0, EVENTS, 70):
        store.append_batch(events[i : i + 70])
    return store


def _report(store: EventStore) -> IntegrityReport:
    return store.verify(batch_size=64)


def test_untouched_store_verifies(filled: EventStore) -> None:
    report = _report(filled)
    assert report == IntegrityReport(True, EVENTS, None, None, 1, EVENTS)


def test_empty_store_verifies(store: EventStore) -> None:
    assert store.verify() == IntegrityReport(True, 0, None, None, 1, 0)


def test_first_event_chains_from_the_genesis_hash(store: EventStore, pg_dsn: str) -> None:
    store.append(DomainEvent("First", {"a": 1}))
    with psycopg.connect(pg_dsn) as conn:
        genesis = conn.execute(
            sql.SQL("SELECT genesis FROM {}").format(sql.Identifier(store.schema, "chain"))
        ).fetchone()
    assert genesis is not None and bytes(genesis[0]) == _pycodec.GENESIS_HASH
    [event] = store.read()
    prepared = _pycodec.prepare([event])
    assert _pycodec.seal(prepared, 1, _pycodec.GENESIS_HASH) == event.hash


def _events(store: EventStore) -> sql.Identifier:
    return sql.Identifier(store.schema, "events")


TAMPERS: dict[str, tuple[str, int]] = {
    "data character": (
        "UPDATE {t} SET data = jsonb_set(data, '{{tampered}}', '\"x\"') WHERE position = 120",
        120,
    ),
    "tag value": (
        'UPDATE {t} SET tags = tags || \'{{"issueId": "forged"}}\' WHERE position = 77',
        77,
    ),
    "event type": ("UPDATE {t} SET event_type = 'Forged' WHERE position = 200", 200),
    "timestamp": (
        'UPDATE {t} SET "timestamp" = "timestamp" + interval \'1 microsecond\' WHERE position = 9',
        9,
    ),
    "metadata": ("UPDATE {t} SET metadata = '{{}}' WHERE position = 150", 150),
    "event id": ("UPDATE {t} SET event_id = gen_random_uuid() WHERE position = 31", 31),
    "deleted event": ("DELETE FROM {t} WHERE position = 150", 150),
    "deleted first event": ("DELETE FROM {t} WHERE position = 1", 1),
    "swapped contents": (
        "UPDATE {t} e SET data = o.data, tags = o.tags, metadata = o.metadata,"
        ' event_type = o.event_type, "timestamp" = o."timestamp"'
        " FROM {t} o WHERE (e.position, o.position) IN ((60, 61), (61, 60))",
        60,
    ),
    "truncated tail": (f"DELETE FROM {{t}} WHERE position > {EVENTS - 25}", EVENTS - 24),
    "inserted beyond the head": (
        'INSERT INTO {t} (position, event_id, event_type, "timestamp", hash)'
        f" SELECT {EVENTS + 1}, gen_random_uuid(), 'Forged', now(), hash FROM {{t}}"
        f" WHERE position = {EVENTS}",
        EVENTS + 1,
    ),
}


@pytest.mark.parametrize("tamper", TAMPERS)
def test_tampering_is_found_at_its_first_position(
    filled: EventStore, pg_dsn: str, tamper: str
) -> None:
    statement, position = TAMPERS[tamper]
    with superuser(pg_dsn) as conn:
        conn.execute(sql.SQL(statement.replace("{t}", "{t}")).format(t=_events(filled)))
    report = _report(filled)
    assert not report.ok
    assert report.first_bad_position == position, report
    assert report.reason


def test_inserted_event_in_the_middle_is_found(filled: EventStore, pg_dsn: str) -> None:
    """Renumber the tail to make room, then insert a forged event at 100."""
    with superuser(pg_dsn) as conn, conn.transaction():
        t = _events(filled)
        conn.execute(
            sql.SQL("UPDATE {} SET position = position + 1000000 WHERE position >= 100").format(t)
        )
        conn.execute(
            sql.SQL("UPDATE {} SET position = position - 999999 WHERE position >= 1000000").format(
                t
            )
        )
        conn.execute(
            sql.SQL(
                'INSERT INTO {} (position, event_id, event_type, "timestamp", hash)'
                " SELECT 100, gen_random_uuid(), 'Forged', now(), hash FROM {} WHERE position = 99"
            ).format(t, t)
        )
        conn.execute(
            sql.SQL("UPDATE {} SET position = position + 1").format(
                sql.Identifier(filled.schema, "head")
            )
        )
    report = _report(filled)
    assert (report.ok, report.first_bad_position) == (False, 100)


def test_head_moved_without_events_is_found(filled: EventStore, pg_dsn: str) -> None:
    with superuser(pg_dsn) as conn:
        conn.execute(
            sql.SQL("UPDATE {} SET position = position + 3").format(
                sql.Identifier(filled.schema, "head")
            )
        )
    report = _report(filled)
    assert (report.ok, report.first_bad_position) == (False, EVENTS + 1)


def test_verify_a_range(filled: EventStore, pg_dsn: str) -> None:
    assert filled.verify(100, 200) == IntegrityReport(True, 101, None, None, 100, 200)
    with superuser(pg_dsn) as conn:
        conn.execute(
            sql.SQL("UPDATE {} SET event_type = 'X' WHERE position = 250").format(_events(filled))
        )
    assert filled.verify(100, 200).ok
    assert filled.verify(201).first_bad_position == 250


def test_both_streams_read_one_snapshot(filled: EventStore, pg_dsn: str) -> None:
    """verify reads every other range on a second connection, which imports the first one's
    snapshot: a change committed after verify began (here, before the second connection's
    first read) is not seen by either."""

    @contextmanager
    def second() -> Iterator[psycopg.Connection[Any]]:
        with superuser(pg_dsn) as conn:
            conn.execute(
                sql.SQL("UPDATE {} SET event_type = 'X' WHERE position = 75").format(
                    _events(filled)
                )
            )
        with psycopg.connect(pg_dsn) as conn:
            yield conn

    with psycopg.connect(pg_dsn) as conn:
        report = verify(conn, filled.schema, batch_size=50, second=second)
    assert report == IntegrityReport(True, EVENTS, None, None, 1, EVENTS)
    # and the change is there for the next verify
    assert filled.verify(batch_size=50).first_bad_position == 75


def test_without_a_second_connection_one_stream_reads(filled: EventStore, pg_dsn: str) -> None:
    """When the second connection cannot be had (the server's connection limit, say), verify
    reads the range on its own connection alone, and finds what it would have."""

    @contextmanager
    def refused() -> Iterator[psycopg.Connection[Any]]:
        raise StorageError("too many connections")
        yield  # pragma: no cover

    with psycopg.connect(pg_dsn) as conn:
        report = verify(conn, filled.schema, batch_size=50, second=refused)
    assert report == IntegrityReport(True, EVENTS, None, None, 1, EVENTS)


def test_progress_is_reported(filled: EventStore) -> None:
    seen: list[tuple[int, int]] = []
    filled.verify(batch_size=100, progress=lambda done, total: seen.append((done, total)))
    assert seen == [(100, EVENTS), (200, EVENTS), (300, EVENTS)]


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE {t} SET event_type = 'Changed' WHERE position = 1",
        "DELETE FROM {t} WHERE position = 1",
        "TRUNCATE {t}",
    ],
)
def test_events_cannot_be_changed_through_the_store_connection(
    filled: EventStore, pg_dsn: str, statement: str
) -> None:
    """Without bypassing triggers, even the owner cannot change stored events."""
    before = filled.read(limit=5)
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="immutable"):
            conn.execute(sql.SQL(statement).format(t=_events(filled)))
    assert filled.read(limit=5).events == before.events
    assert _report(filled).ok


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE {t} SET event_type = 'Changed' WHERE position = 1",
        "DELETE FROM {t} WHERE position = 1",
        "TRUNCATE {t}",
        "UPDATE {h} SET position = 0",
        "DELETE FROM {h}",
    ],
)
def test_app_role_can_only_read_and_append(filled: EventStore, pg_dsn: str, statement: str) -> None:
    role = f"tamma_app_{uuid.uuid4().hex[:8]}"
    filled.grant_app_role(role)
    try:
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(role)))
            head = sql.Identifier(filled.schema, "head")
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(sql.SQL(statement).format(t=_events(filled), h=head))
            count = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(_events(filled)))
            assert count.fetchone() == (EVENTS,)
    finally:
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))
    assert _report(filled).ok


def test_app_role_appends(filled: EventStore, pg_dsn: str) -> None:
    role = f"tamma_app_{uuid.uuid4().hex[:8]}"
    filled.grant_app_role(role)
    dsn = psycopg.conninfo.make_conninfo(pg_dsn, options=f"-c role={role}")
    try:
        with EventStore(dsn, schema=filled.schema, migrate=False, max_connections=2) as app:
            assert app.append(DomainEvent("ByTheApp", {"ok": True})) == EVENTS + 1
            assert app.read(after=EVENTS)[0].event_type == "ByTheApp"
    finally:
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))
    assert _report(filled).ok


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**40), max_value=10**40)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00")),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00")),
            children,
            max_size=4,
        )
    ),
    max_leaves=12,
)
tag_text = st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00"))


@st.composite
def events(draw: Callable[..., Any]) -> DomainEvent:
    return DomainEvent(
        draw(tag_text.filter(lambda s: 1 <= len(s) <= 255)),
        draw(st.dictionaries(tag_text, json_values, max_size=4)),
        draw(st.dictionaries(tag_text.filter(lambda s: 1 <= len(s) <= 128), tag_text, max_size=3)),
        draw(st.dictionaries(tag_text, json_values, max_size=2)),
        timestamp=draw(
            st.datetimes(
                min_value=datetime(1, 1, 2),
                max_value=datetime(9999, 12, 30),
                timezones=st.sampled_from([timezone.utc, timezone(timedelta(hours=-3))]),
            )
        ),
    )


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(batch=st.lists(events(), min_size=1, max_size=5))
def test_canonical_bytes_survive_postgres(store: EventStore, batch: list[DomainEvent]) -> None:
    """Whatever PostgreSQL's jsonb does to the JSON (key order, number text, escapes), the codec
    re-encodes what it returns to the bytes that were hashed."""
    last = store.append_batch(batch)
    stored = store.read(after=last - len(batch))
    assert [e.event_id for e in stored] == [e.event_id for e in batch]
    for original, back in zip(batch, stored, strict=True):
        assert back.data == _pycodec.canonical(original.data)
        assert back.metadata == _pycodec.canonical(original.metadata)
        assert (back.tags, back.event_type, back.timestamp) == (
            original.tags,
            original.event_type,
            original.timestamp,
        )
    assert store.verify(start=last - len(batch) + 1).ok


@pytest.mark.codec_neutral
def test_100k_random_events_verify(store: EventStore) -> None:
    """The acceptance size: 100,000 events with random payloads (unicode, escapes, floats of
    every magnitude, huge integers, nesting, offsets), appended in batches, verify whole.

    Run with the native codec only: the reference codec's rows and hashes are byte-identical
    (test_codec_hypothesis.py), and the random-payload verify tests here run under both."""
    batch: list[DomainEvent] = []
    for event in random_events(100_000, seed=2):
        batch.append(event)
        if len(batch) == 10_000:
            store.append_batch(batch)
            batch = []
    report = store.verify()
    assert report == IntegrityReport(True, 100_000, None, None, 1, 100_000)
