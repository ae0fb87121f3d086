"""All or nothing: batches with a bad event, duplicate ids, batches above the chunk size, a client
killed in the middle of a large append, and mapping events."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from tamma_events import (
    APPEND_CONDITION_FAILED,
    DUPLICATE_EVENT,
    VALIDATION_FAILED,
    AppendCondition,
    DomainEvent,
    EventStore,
    EventStoreError,
    Query,
)

WORKERS = Path(__file__).with_name("_workers.py")


def expect_error(code: str, call: Callable[[], Any]) -> EventStoreError:
    with pytest.raises(EventStoreError) as info:
        call()
    assert info.value.code == code, info.value
    return info.value


def count_events(dsn: str, schema: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(schema, "events"))
        ).fetchone()
    return int(row[0]) if row else -1


def assert_unchanged(store: EventStore, head: int, absent: list[DomainEvent]) -> None:
    """Nothing of a failed append is visible: same head, same events, its ids unknown."""
    assert store.head() == head
    result = store.read()
    assert [e.position for e in result] == list(range(1, head + 1))
    assert result.head == head
    for event in absent:
        assert store.get_event(event.event_id) is None


def seed(store: EventStore, count: int = 3) -> list[DomainEvent]:
    events = [DomainEvent("Seed", {"i": i}, {"seed": str(i)}) for i in range(count)]
    assert store.append_batch(events) == count
    return events


# -- invalid events --------------------------------------------------------------------------

NAIVE = datetime(2024, 1, 1, 12, 0)


@pytest.mark.parametrize(
    ("bad", "field"),
    [
        (lambda: DomainEvent("Bad", {"x": float("nan")}), "data"),
        (lambda: DomainEvent("Bad", {"x": [1, {"y": float("inf")}]}), "data"),
        (lambda: DomainEvent("Bad", metadata={"x": float("-inf")}), "metadata"),
        (lambda: DomainEvent(""), "event_type"),
        (lambda: DomainEvent("x" * 256), "event_type"),
        (lambda: DomainEvent("Bad", tags={"k": 1}), "tags"),  # type: ignore[dict-item]
        (lambda: DomainEvent("Bad", tags={"": "v"}), "tags"),
        (lambda: DomainEvent("Bad", {"s": "a\x00b"}), "data"),
        (lambda: DomainEvent("Bad", timestamp=NAIVE), "timestamp"),
        (lambda: DomainEvent("Bad", data=[1, 2]), "data"),  # type: ignore[arg-type]
    ],
    ids=[
        "nan",
        "nested-inf",
        "metadata-inf",
        "empty-type",
        "long-type",
        "int-tag",
        "empty-tag-key",
        "nul",
        "naive-timestamp",
        "data-list",
    ],
)
def test_batch_with_one_invalid_event_writes_nothing(
    store: EventStore, bad: Callable[[], DomainEvent], field: str
) -> None:
    seed(store)
    batch = [DomainEvent("Good", {"i": i}) for i in range(4)] + [bad()]
    error = expect_error(VALIDATION_FAILED, lambda: store.append_batch(batch))
    assert error.context["index"] == 4
    assert error.context["field"] == field
    assert "event 4" in error.message
    assert_unchanged(store, 3, batch)
    # the first event alone is the invalid one too
    error = expect_error(VALIDATION_FAILED, lambda: store.append_batch([bad(), *batch[:4]]))
    assert error.context["index"] == 0
    assert_unchanged(store, 3, batch)
    assert store.append_batch(batch[:4]) == 7


def test_empty_batch_is_rejected(store: EventStore) -> None:
    seed(store)
    expect_error(VALIDATION_FAILED, lambda: store.append_batch([]))
    assert_unchanged(store, 3, [])


# -- duplicate ids ---------------------------------------------------------------------------


def test_duplicate_id_within_a_batch_writes_nothing(store: EventStore) -> None:
    seed(store)
    first = DomainEvent("A", {"n": 1})
    again = DomainEvent("B", {"n": 2}, event_id=first.event_id)
    batch = [DomainEvent("X"), first, DomainEvent("Y"), again, DomainEvent("Z")]
    error = expect_error(DUPLICATE_EVENT, lambda: store.append_batch(batch))
    assert error.context["index"] == 3
    assert error.context["event_ids"] == [str(first.event_id)]
    assert_unchanged(store, 3, batch)
    # an id given as a string is the same id
    as_text = DomainEvent("C", event_id=str(first.event_id))  # type: ignore[arg-type]
    expect_error(DUPLICATE_EVENT, lambda: store.append_batch([first, as_text]))
    assert_unchanged(store, 3, batch)


def test_batch_with_a_stored_id_writes_nothing(store: EventStore) -> None:
    stored = seed(store)
    replay = DomainEvent("Replayed", {"other": True}, event_id=stored[1].event_id)
    batch = [DomainEvent("New1"), replay, DomainEvent("New2")]
    error = expect_error(DUPLICATE_EVENT, lambda: store.append_batch(batch))
    assert error.context["event_ids"] == [str(stored[1].event_id)]
    assert_unchanged(store, 3, [batch[0], batch[2]])
    # the stored event is untouched
    original = store.get_event(stored[1].event_id)
    assert original is not None
    assert (original.event_type, original.data, original.position) == ("Seed", {"i": 1}, 2)
    # two stored ids are both named, in position order
    both = [
        DomainEvent("N"),
        DomainEvent("R", event_id=stored[2].event_id),
        DomainEvent("R", event_id=stored[0].event_id),
    ]
    error = expect_error(DUPLICATE_EVENT, lambda: store.append_batch(both))
    assert error.context["event_ids"] == [str(stored[0].event_id), str(stored[2].event_id)]
    # a single append of a stored id (a retried append) is refused too
    error = expect_error(DUPLICATE_EVENT, lambda: store.append(replay))
    assert error.context["event_ids"] == [str(stored[1].event_id)]
    assert_unchanged(store, 3, [batch[0], batch[2], both[0]])
    assert store.append_batch([batch[0], batch[2]]) == 5


# -- batches above the chunk size ------------------------------------------------------------

CHUNK = 1000
LARGE = 5500


def large_batch(tag: str = "large") -> list[DomainEvent]:
    return [DomainEvent("Bulk", {"i": i}, {"batch": tag}) for i in range(LARGE)]


@pytest.mark.parametrize("bad_index", [1500, 4321, LARGE - 1])
def test_large_batch_with_a_bad_event_in_a_later_chunk_writes_nothing(
    make_store: Callable[..., EventStore], pg_dsn: str, bad_index: int
) -> None:
    store = make_store(chunk_events=CHUNK)
    seed(store)
    batch = large_batch()
    batch[bad_index] = DomainEvent("Bulk", {"i": float("nan")})
    error = expect_error(VALIDATION_FAILED, lambda: store.append_batch(batch))
    assert error.context["index"] == bad_index
    assert f"event {bad_index}" in error.message
    assert count_events(pg_dsn, store.schema) == 3
    assert_unchanged(store, 3, [batch[0], batch[CHUNK - 1], batch[CHUNK], batch[bad_index - 1]])
    assert store.append(DomainEvent("After")) == 4


def test_large_batch_with_a_stored_id_in_a_later_chunk_writes_nothing(
    make_store: Callable[..., EventStore], pg_dsn: str
) -> None:
    store = make_store(chunk_events=CHUNK)
    stored = seed(store)
    batch = large_batch()
    batch[4200] = DomainEvent("Bulk", event_id=stored[0].event_id)
    error = expect_error(DUPLICATE_EVENT, lambda: store.append_batch(batch))
    assert error.context["event_ids"] == [str(stored[0].event_id)]
    assert count_events(pg_dsn, store.schema) == 3
    assert_unchanged(store, 3, [batch[0], batch[-1]])


def test_large_batch_with_a_duplicate_across_chunks_writes_nothing(
    make_store: Callable[..., EventStore], pg_dsn: str
) -> None:
    store = make_store(chunk_events=CHUNK)
    seed(store)
    batch = large_batch()
    batch[3700] = DomainEvent("Bulk", event_id=batch[10].event_id)  # chunk 3 repeats chunk 0
    error = expect_error(DUPLICATE_EVENT, lambda: store.append_batch(batch))
    assert count_events(pg_dsn, store.schema) == 3
    assert_unchanged(store, 3, [batch[0], batch[10], batch[-1]])
    # the error names the repeated id (as it does for a repeat within one chunk)
    assert error.context["event_ids"] == [str(batch[10].event_id)], error


def test_large_batch_with_a_failing_condition_writes_nothing(
    make_store: Callable[..., EventStore],
) -> None:
    store = make_store(chunk_events=CHUNK)
    seed(store)
    batch = large_batch()
    condition = AppendCondition(Query.of(tags={"seed": "2"}), after=2)
    expect_error(APPEND_CONDITION_FAILED, lambda: store.append_batch(batch, condition))
    assert_unchanged(store, 3, [batch[0], batch[-1]])


def test_large_valid_batch_gets_consecutive_positions(
    make_store: Callable[..., EventStore], pg_dsn: str
) -> None:
    store = make_store(chunk_events=CHUNK)
    seed(store)
    batch = large_batch()
    condition = AppendCondition(Query.of(tags={"batch": "large"}), after=3)
    assert store.append_batch(batch, condition) == 3 + LARGE
    assert store.head() == 3 + LARGE
    assert count_events(pg_dsn, store.schema) == 3 + LARGE
    stored = list(store.read(after=3))
    assert [e.position for e in stored] == list(range(4, 4 + LARGE))
    assert [e.event_id for e in stored] == [e.event_id for e in batch]
    assert [e.data["i"] for e in stored] == list(range(LARGE))
    # the same condition now fails: the batch is there
    expect_error(APPEND_CONDITION_FAILED, lambda: store.append(DomainEvent("X"), condition))
    assert store.append(DomainEvent("After")) == 4 + LARGE


# -- a client killed in the middle of a large append -----------------------------------------

KILL_BATCH = 200_000
# Kill once the server has taken this many rows of the batch (20 of the default 10,000-event
# chunks of the 200,000): the COPY is well under way and far from its end.
KILL_AFTER_ROWS = 20_000


def _copy_progress(dsn: str, application_name: str) -> tuple[int, int] | None:
    """(backend pid, rows processed) of the COPY run by the named client, if one is running."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT a.pid, p.tuples_processed FROM pg_stat_activity a"
            " JOIN pg_stat_progress_copy p ON p.pid = a.pid"
            " WHERE a.application_name = %s AND a.query LIKE 'COPY%%'",
            [application_name],
        ).fetchone()
    return None if row is None else (int(row[0]), int(row[1]))


def _backend_alive(dsn: str, pid: int) -> bool:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", [pid]).fetchone()
    return bool(row and row[0])


def test_client_killed_during_a_large_append_leaves_nothing(store: EventStore, pg_dsn: str) -> None:
    seed(store)
    application_name = f"kill-{uuid.uuid4().hex[:8]}"
    child_dsn = make_conninfo(pg_dsn, application_name=application_name)
    child = subprocess.Popen(
        [sys.executable, str(WORKERS), "bulk", child_dsn, store.schema, str(KILL_BATCH)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        line = child.stdout.readline()
        assert line.strip() == "ready", (line, child.stderr.read() if child.stderr else "")
        deadline = time.monotonic() + 120
        while True:
            progress = _copy_progress(pg_dsn, application_name)
            if progress is not None and progress[1] >= KILL_AFTER_ROWS:
                break
            assert child.poll() is None, f"the client ended early: {child.communicate()}"
            assert time.monotonic() < deadline, "the COPY never got going"
            time.sleep(0.02)
        backend = progress[0]
        os.kill(child.pid, signal.SIGKILL)
        out, _ = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == -signal.SIGKILL
    assert "done" not in out

    deadline = time.monotonic() + 60
    while _backend_alive(pg_dsn, backend):
        assert time.monotonic() < deadline, "the server kept the killed client's backend"
        time.sleep(0.05)
    assert count_events(pg_dsn, store.schema) == 3
    assert_unchanged(store, 3, [])
    assert store.append(DomainEvent("After")) == 4
    assert [e.event_type for e in store.read(after=3)] == ["After"]
    assert store.append_batch([DomainEvent("More"), DomainEvent("More")]) == 6
    assert store.verify().ok


# -- events given as mappings ----------------------------------------------------------------


def test_mapping_events_are_appended(store: EventStore) -> None:
    event_id = uuid.uuid4()
    mapping = {
        "event_type": "FromJson",
        "data": {"title": "x", "n": [1, 2.5, None, True]},
        "tags": {"issueId": "I-7"},
        "metadata": {"source": "http"},
        "event_id": str(event_id),
        "timestamp": "2024-05-06T07:08:09.123456+02:00",
    }
    assert store.append(mapping) == 1
    stored = store.get_event(event_id)
    assert stored is not None
    assert (stored.event_type, stored.data, stored.tags, stored.metadata) == (
        "FromJson",
        mapping["data"],
        mapping["tags"],
        mapping["metadata"],
    )
    assert stored.timestamp == datetime(2024, 5, 6, 5, 8, 9, 123456, tzinfo=timezone.utc)
    assert stored.timestamp.utcoffset() == timedelta(0)
    # a minimal mapping gets an id and a timestamp; mappings and events mix in a batch
    assert store.append_batch([{"event_type": "Minimal"}, DomainEvent("Typed")]) == 3
    assert [e.event_type for e in store.read(after=1)] == ["Minimal", "Typed"]


@pytest.mark.parametrize(
    "bad",
    [
        {"data": {}},
        {"event_type": 5},
        {"event_type": "X", "tags": {"k": 1}},
        {"event_type": "X", "tags": ["k", "v"]},
        {"event_type": "X", "data": [1]},
        {"event_type": "X", "event_id": "not-a-uuid"},
        {"event_type": "X", "timestamp": "yesterday"},
        {"event_type": "X", "timestamp": "2024-05-06T07:08:09"},  # naive
        {"event_type": "X", "data": {"v": float("nan")}},
        {"event_type": ""},
    ],
    ids=[
        "no-type",
        "int-type",
        "int-tag",
        "list-tags",
        "list-data",
        "bad-id",
        "bad-time",
        "naive-time",
        "nan",
        "empty-type",
    ],
)
def test_bad_mapping_events_are_rejected(store: EventStore, bad: dict[str, Any]) -> None:
    seed(store)
    good = DomainEvent("Good")
    error = expect_error(VALIDATION_FAILED, lambda: store.append_batch([good, {**bad}]))
    assert error.context["index"] == 1
    expect_error(VALIDATION_FAILED, lambda: store.append({**bad}))
    assert_unchanged(store, 3, [good])
