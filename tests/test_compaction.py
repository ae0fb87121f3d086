"""Compaction into Parquet archives (`EventStore.compact_events`) against a real PostgreSQL.

After a compaction every read path (``include_archived`` where it is an option) returns what it
returned before; `verify` checks the archives and the live log across the boundary; a crash
after any step of any file leaves every event in the log or in a compacted archive, and a rerun
finishes the job as a clean compaction would; a changed or missing archive file is reported
with its range; archived events still take part in DCB conditions and event-id uniqueness; the
triggers still refuse changes to events, archived events and the manifest.

The cut-off between archived and live events is taken between two appends: ``recorded_at`` is
the appending transaction's time.
"""

from __future__ import annotations

import hashlib
import importlib
import itertools
import json
import random
import shutil
import struct
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import psycopg
import psycopg.errors
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from psycopg import sql

from tamma_events import (
    APPEND_CONDITION_FAILED,
    DUPLICATE_EVENT,
    STORAGE_ERROR,
    VALIDATION_FAILED,
    AggregateRow,
    AppendCondition,
    DomainEvent,
    EventFilter,
    EventStore,
    EventStoreError,
    Query,
    QueryItem,
    SequencedEvent,
    Subscription,
)
from tamma_events.codec import reference
from tamma_events.codec.arrow import stored_rows
from tamma_events.codec.reference import COPY_COLUMNS, GENESIS_HASH
from tamma_events.ops.drive import copy_rows
from tamma_events.tools.workload import generate_events

# Imported at collection: if the extension does not load, every test here errors.
native = importlib.import_module("tamma_events._native")

#: The module's shared history: ARCHIVED events before the cut, LIVE after it.
ARCHIVED = 1_200
LIVE = 400
TOTAL = ARCHIVED + LIVE
FILE_EVENTS = 250
#: The archive files of the shared history, as (first, last) positions.
RANGES = [(1, 250), (251, 500), (501, 750), (751, 1000), (1001, 1200)]

BASE = datetime(2026, 1, 1, tzinfo=timezone.utc)
JOIN_TIMEOUT = 60.0


def at(seconds: float) -> datetime:
    return BASE + timedelta(seconds=seconds)


def shuffled_events(count: int, seed: int) -> list[DomainEvent]:
    """Workload events in a shuffled order, so the log's order is not the time order."""
    events = list(generate_events(count, seed=seed))
    random.Random(seed).shuffle(events)
    return events


EVENTS = shuffled_events(TOTAL, seed=11)


# -- helpers ---------------------------------------------------------------------------------


def append_with_cut(
    store: EventStore, events: list[DomainEvent], archived: int
) -> tuple[datetime, list[SequencedEvent]]:
    """Append ``events[:archived]``, take the cut, append the rest; returns the cut and the
    stored events."""
    store.append_batch(events[:archived])
    cut = datetime.now(timezone.utc)
    time.sleep(0.02)
    if events[archived:]:
        store.append_batch(events[archived:])
    stored = store.get_events()
    assert [e.event_id for e in stored] == [e.event_id for e in events]
    return cut, stored


def query(dsn: str, statement: sql.Composable, params: list[Any] | None = None) -> list[Any]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute(statement, params or []).fetchall()


def manifest(store: EventStore) -> list[tuple[int, int, bool]]:
    """The manifest's (first, last, compacted) rows, in order."""
    return [
        (int(first), int(last), bool(done))
        for first, last, done in query(
            store.dsn,
            sql.SQL(
                "SELECT first_position, last_position, compacted_at IS NOT NULL FROM {}"
                " ORDER BY first_position"
            ).format(sql.Identifier(store.schema, "archives")),
        )
    ]


def positions(store: EventStore, table: str) -> list[int]:
    return [
        int(row[0])
        for row in query(
            store.dsn,
            sql.SQL("SELECT position FROM {} ORDER BY position").format(
                sql.Identifier(store.schema, table)
            ),
        )
    ]


def file_name(first: int, last: int) -> str:
    return f"events-{first:020d}-{last:020d}.parquet"


def superuser(dsn: str) -> psycopg.Connection[Any]:
    """A connection that skips the triggers, as an attacker with superuser rights would."""
    conn = psycopg.connect(dsn, autocommit=True)
    conn.execute("SET session_replication_role = replica")
    return conn


def take(subscription: Subscription, count: int) -> list[SequencedEvent]:
    """The next ``count`` events; a subscription that stalls is stopped after a while, so the
    assertion reports what was delivered instead of hanging."""
    timer = threading.Timer(JOIN_TIMEOUT, subscription.stop)
    timer.daemon = True
    timer.start()
    try:
        return list(itertools.islice(subscription, count))
    finally:
        timer.cancel()


def walk_pages(store: EventStore, event_filter: EventFilter | None) -> list[SequencedEvent]:
    events: list[SequencedEvent] = []
    token: str | None = None
    while True:
        page = store.get_page(event_filter, page_size=97, token=token, include_archived=True)
        events += page.events
        if page.next_token is None:
            return events
        token = page.next_token


def export(store: EventStore, event_filter: EventFilter | None) -> pa.Table:
    return store.export_arrow(event_filter, batch_size=300, include_archived=True).read_all()


def assert_same_export(after: pa.Table, before: pa.Table) -> None:
    assert after.schema == before.schema
    assert after.num_rows == before.num_rows
    assert after.to_pylist() == before.to_pylist()


# -- what is read, before and after ----------------------------------------------------------

FILTERS: dict[str, EventFilter | None] = {
    "everything": None,
    "types": EventFilter(event_types=["IssueCreated", "PullRequestMerged"]),
    "one issue": EventFilter(issue_ids=["ISSUE-3"]),
    "issues and a provider": EventFilter(
        issue_ids=["ISSUE-1", "ISSUE-2", "ISSUE-30"], providers=["openai"]
    ),
    "two tags": EventFilter(tags={"platform": "github", "provider": "anthropic"}),
    "many tag values": EventFilter(
        issue_ids=[f"ISSUE-{n}" for n in range(0, 140, 2)], event_types=["LlmCallCompleted"]
    ),
    "pull requests": EventFilter(
        pr_ids=["PR-3", "PR-4", "PR-5", "PR-40"], event_types=["CiRunCompleted", "ReviewSubmitted"]
    ),
    "window on minutes": EventFilter(start_time=at(60), end_time=at(300)),
    "window by time": EventFilter(start_time=at(37.25), end_time=at(111.5), order_by="timestamp"),
    "users in a window by type": EventFilter(
        user_ids=["user-1", "user-2"], start_time=at(100), end_time=at(350), order_by="type"
    ),
    "ids": EventFilter(
        event_ids=[EVENTS[5].event_id, EVENTS[1199].event_id, EVENTS[1500].event_id, uuid.uuid4()]
    ),
    "newest by time": EventFilter(
        order_by="timestamp", order_direction="desc", limit=60, offset=25
    ),
    "by type desc, a page": EventFilter(
        order_by="type", order_direction="desc", limit=150, offset=700
    ),
    "log desc across the boundary": EventFilter(order_direction="desc", limit=40, offset=380),
    "types by time, a page": EventFilter(
        event_types=["LlmCallCompleted"], order_by="timestamp", limit=100, offset=300
    ),
    "nothing": EventFilter(event_types=["NoSuchType"]),
}
UNPAGED = [name for name, f in FILTERS.items() if f is None or (f.limit is None and not f.offset)]
EXPORTED = ["everything", "two tags", "window by time", "by type desc, a page", "ids"]

READS: dict[str, tuple[Query | None, int | None, int | None, bool]] = {
    "everything": (None, None, None, False),
    "all, backwards": (Query.all(), None, None, True),
    "a type": (Query.of(types=["IssueCreated"]), None, None, False),
    "two items": (
        Query(
            (
                QueryItem(("PullRequestOpened", "PullRequestMerged"), {"platform": "github"}),
                QueryItem((), {"issueId": "ISSUE-4"}),
            )
        ),
        None,
        None,
        False,
    ),
    "after, inside the archive": (Query.of(types=["ReviewSubmitted"]), 700, None, False),
    "after, in the live log": (Query.of(tags={"provider": "openai"}), 1300, None, False),
    "limit across the boundary": (None, 1180, 50, False),
    "limit inside the archive": (Query.of(tags={"platform": "gitlab"}), 10, 35, False),
    "backwards with a limit": (Query.of(tags={"platform": "gitlab"}), None, 300, True),
    "backwards after a position": (Query.of(types=["LlmCallCompleted"]), 900, 100, True),
    "after the head": (None, TOTAL, None, False),
}

AGGREGATES: list[tuple[str, str, str | None]] = [
    ("everything", "event_type", None),
    ("everything", "hour", None),
    ("issues and a provider", "event_type", None),
    ("window by time", "minute", None),
    ("two tags", "tag", "userId"),
    ("types", "tag", "provider"),
]


def read_result(store: EventStore, name: str) -> tuple[list[SequencedEvent], int | None]:
    q, after, limit, backwards = READS[name]
    result = store.read(q, after=after, limit=limit, backwards=backwards)
    return list(result.events), result.head


def aggregate(store: EventStore, name: str, group_by: Any, tag_key: str | None) -> list[Any]:
    rows: list[AggregateRow] = store.aggregate(FILTERS[name], group_by, tag_key=tag_key)
    return rows


@dataclass
class History:
    """The module's store, compacted after everything below was read from it."""

    store: EventStore
    fresh: EventStore
    directory: Path
    cut: datetime
    events: list[SequencedEvent]
    moved: int
    progress: list[tuple[int, int]]
    faults: list[tuple[str, int, int]]
    before: dict[Any, Any] = field(default_factory=dict)


@pytest.fixture(scope="module")
def history(pg_dsn: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[History]:
    schema = f"t_{uuid.uuid4().hex[:12]}"
    directory = tmp_path_factory.mktemp("archives")
    store = EventStore(pg_dsn, schema=schema, max_connections=12)
    # No fold as the events load: the whole log is the summaries' unfolded tail when the
    # compaction deletes its prefix, so the counts below hold only if it folds that tail first.
    store._fold_due = lambda position: False  # type: ignore[method-assign]
    fresh: EventStore | None = None
    try:
        cut, stored = append_with_cut(store, EVENTS, ARCHIVED)
        before: dict[Any, Any] = {}
        for name, f in FILTERS.items():
            before["events", name] = store.get_events(f)
            before["count", name] = store.count_events(f)
        for name in EXPORTED:
            before["export", name] = export(store, FILTERS[name])
        for name in READS:
            before["read", name] = read_result(store, name)
        for name, group_by, tag_key in AGGREGATES:
            before["aggregate", name, group_by] = aggregate(store, name, group_by, tag_key)
        before["types"] = store.get_event_types()
        before["tags"] = store.get_tags()
        progress: list[tuple[int, int]] = []
        faults: list[tuple[str, int, int]] = []
        moved = store.compact_events(
            cut,
            archive_dir=directory,
            file_events=FILE_EVENTS,
            progress=lambda done, total: progress.append((done, total)),
            fault=lambda step, first, last: faults.append((step, first, last)),
        )
        fresh = EventStore(pg_dsn, schema=schema, max_connections=4, cache_size=0)
        yield History(store, fresh, directory, cut, stored, moved, progress, faults, before)
    finally:
        if fresh is not None:
            fresh.close()
        store.close()
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


@pytest.fixture(params=["compacting store", "fresh store"])
def reader(request: pytest.FixtureRequest, history: History) -> EventStore:
    """The store that compacted (its cache and archive reader warm from before), or a new one
    on the same schema without a cache."""
    return history.store if request.param == "compacting store" else history.fresh


# -- 1. every read path returns what it returned before --------------------------------------


def test_the_compaction_moved_the_prefix(history: History) -> None:
    assert history.moved == ARCHIVED
    assert manifest(history.store) == [(first, last, True) for first, last in RANGES]
    assert sorted(p.name for p in history.directory.iterdir()) == [
        file_name(first, last) for first, last in RANGES
    ]
    assert positions(history.store, "events") == list(range(ARCHIVED + 1, TOTAL + 1))
    assert positions(history.store, "archived_events") == list(range(1, ARCHIVED + 1))
    assert history.store.head() == TOTAL


@pytest.mark.parametrize("name", FILTERS)
def test_get_events_with_archived_is_unchanged(
    history: History, reader: EventStore, name: str
) -> None:
    expected = history.before["events", name]
    assert reader.get_events(FILTERS[name], include_archived=True) == expected
    if name != "nothing":
        # The filter reaches into the archive, so the comparison means something.
        assert any(e.position <= ARCHIVED for e in expected), name


@pytest.mark.parametrize("name", UNPAGED)
def test_get_events_without_archived_reads_the_live_log(
    history: History, reader: EventStore, name: str
) -> None:
    expected = [e for e in history.before["events", name] if e.position > ARCHIVED]
    assert reader.get_events(FILTERS[name]) == expected


@pytest.mark.parametrize("name", FILTERS)
def test_count_events_counts_the_whole_history(history: History, name: str) -> None:
    expected = history.before["count", name]
    assert expected == len(history.before["events", name])
    assert history.store.count_events(FILTERS[name]) == expected
    assert history.fresh.count_events(FILTERS[name]) == expected


@pytest.mark.parametrize(("name", "group_by", "tag_key"), AGGREGATES)
def test_aggregate_is_unchanged(
    history: History, name: str, group_by: str, tag_key: str | None
) -> None:
    expected = history.before["aggregate", name, group_by]
    assert expected
    assert aggregate(history.fresh, name, group_by, tag_key) == expected
    assert aggregate(history.store, name, group_by, tag_key) == expected


def test_types_and_tags_are_unchanged(history: History) -> None:
    assert history.fresh.get_event_types() == history.before["types"]
    assert history.fresh.get_tags() == history.before["tags"]


@pytest.mark.parametrize("name", READS)
def test_read_is_unchanged(history: History, reader: EventStore, name: str) -> None:
    assert read_result(reader, name) == history.before["read", name]


def test_read_inside_a_transaction_and_project_are_unchanged(history: History) -> None:
    q = Query.of(types=["IssueCreated", "IssueClosed"])
    expected = [e for e in history.events if e.event_type in ("IssueCreated", "IssueClosed")]
    with history.fresh.transaction() as tx:
        assert list(tx.read(q).events) == expected
    projection = history.fresh.project(q, [], lambda seen, e: [*seen, e.event_id], batch_size=50)
    assert projection.state == [e.event_id for e in expected]
    assert projection.head == TOTAL


@pytest.mark.parametrize("name", FILTERS)
def test_stream_events_with_archived_is_unchanged(history: History, name: str) -> None:
    streamed = list(
        history.fresh.stream_events(FILTERS[name], batch_size=64, include_archived=True)
    )
    assert streamed == history.before["events", name]


@pytest.mark.parametrize("name", UNPAGED)
def test_page_walk_with_archived_is_unchanged(history: History, name: str) -> None:
    assert walk_pages(history.fresh, FILTERS[name]) == history.before["events", name]


@pytest.mark.parametrize("name", EXPORTED)
def test_export_arrow_with_archived_is_unchanged(history: History, name: str) -> None:
    before = history.before["export", name]
    assert before.num_rows == len(history.before["events", name])
    assert_same_export(export(history.fresh, FILTERS[name]), before)
    assert_same_export(export(history.store, FILTERS[name]), before)


def test_get_event_finds_archived_and_live_events(history: History) -> None:
    for index in (0, 249, 250, 777, ARCHIVED - 1, ARCHIVED, TOTAL - 1):
        event = history.events[index]
        assert history.fresh.get_event(event.event_id) == event
        assert history.store.get_event(str(event.event_id)) == event
    assert history.fresh.get_event(uuid.uuid4()) is None


@pytest.mark.parametrize(
    "subscribed",
    [None, Query.of(types=["LlmCallCompleted"]), EventFilter(providers=["google", "local"])],
    ids=["everything", "query", "filter"],
)
def test_subscription_from_the_start_delivers_archived_events(
    history: History, subscribed: Query | EventFilter | None
) -> None:
    if subscribed is None:
        expected = history.events
    elif isinstance(subscribed, Query):
        expected = [e for e in history.events if subscribed.matches(e.event_type, e.tags)]
    else:
        expected = [e for e in history.events if e.tags["provider"] in ("google", "local")]
    with history.fresh.subscribe(subscribed, after=0, buffer=128) as subscription:
        delivered = take(subscription, len(expected))
        assert subscription.position == expected[-1].position
    assert delivered == expected
    assert any(e.position <= ARCHIVED for e in delivered)


# -- a compaction while reads are under way --------------------------------------------------


@pytest.fixture
def uncompacted(make_store: Callable[..., EventStore]) -> tuple[EventStore, datetime, list[Any]]:
    store = make_store()
    cut, stored = append_with_cut(store, shuffled_events(600, seed=5), 450)
    return store, cut, stored


def test_stream_and_export_survive_a_compaction_between_batches(
    uncompacted: tuple[EventStore, datetime, list[SequencedEvent]], tmp_path: Path
) -> None:
    store, cut, stored = uncompacted
    expected_export = store.export_arrow(batch_size=100, include_archived=True).read_all()
    stream = store.stream_events(batch_size=40, include_archived=True)
    batches = store.export_arrow(batch_size=100, include_archived=True)
    first = [next(stream) for _ in range(50)]
    exported = [batches.read_next_batch()]
    assert store.compact_events(cut, archive_dir=tmp_path, file_events=200) == 450
    assert [*first, *stream] == stored
    exported += list(batches)
    assert_same_export(pa.Table.from_batches(exported), expected_export)


def test_subscription_survives_a_compaction(
    uncompacted: tuple[EventStore, datetime, list[SequencedEvent]], tmp_path: Path
) -> None:
    store, cut, stored = uncompacted
    with store.subscribe(after=0, buffer=50) as subscription:
        first = take(subscription, 120)
        assert store.compact_events(cut, archive_dir=tmp_path, file_events=200) == 450
        rest = take(subscription, len(stored) - 120)
    assert [*first, *rest] == stored


# -- 2. verify across the boundary ------------------------------------------------------------


def test_verify_passes_across_the_archive_boundary(history: History) -> None:
    for store in (history.store, history.fresh):
        report = store.verify(batch_size=100)
        assert (report.ok, report.checked, report.first_bad_position) == (True, TOTAL, None)
        assert (report.start, report.end) == (1, TOTAL)
        live = store.verify(include_archived=False, batch_size=100)
        assert (live.ok, live.checked, live.first_bad_position) == (True, LIVE, None)
        assert live.end == TOTAL
    tail = history.fresh.verify(start=ARCHIVED + 1)
    assert (tail.ok, tail.checked) == (True, LIVE)
    inside = history.fresh.verify(start=ARCHIVED + 101)
    assert (inside.ok, inside.checked) == (True, LIVE - 100)


def test_verify_reports_progress_through_archives_and_log(history: History) -> None:
    seen: list[tuple[int, int]] = []
    history.fresh.verify(batch_size=100, progress=lambda done, total: seen.append((done, total)))
    # One call per archive file (one row group each), then one per batch of the live log.
    assert seen == [(last, TOTAL) for _, last in RANGES] + [
        (done, TOTAL) for done in range(ARCHIVED + 100, TOTAL + 1, 100)
    ]


def test_a_change_to_the_first_live_event_is_found(
    make_store: Callable[..., EventStore], tmp_path: Path
) -> None:
    store = make_store()
    cut, _ = append_with_cut(store, shuffled_events(300, seed=3), 200)
    assert store.compact_events(cut, archive_dir=tmp_path, file_events=80) == 200
    with superuser(store.dsn) as conn:
        conn.execute(
            sql.SQL("UPDATE {} SET event_type = 'Forged' WHERE position = 201").format(
                sql.Identifier(store.schema, "events")
            )
        )
    for include_archived in (True, False):
        report = store.verify(include_archived=include_archived)
        assert (report.ok, report.first_bad_position) == (False, 201), report


# -- 3. a crash after any step, then a rerun -------------------------------------------------

CRASH_EVENTS = 800
CRASH_ARCHIVED = 600
CRASH_RANGES = [(1, 250), (251, 500), (501, 600)]
STEPS = ("written", "verified", "recorded", "compacted")


class Crash(Exception):
    """What the fault hook raises: the compaction stops there, as if the process died."""


@pytest.mark.parametrize("crashed_file", [0, 1], ids=["first file", "later file"])
@pytest.mark.parametrize("step", STEPS)
def test_a_crash_at_any_step_is_finished_by_a_rerun(
    make_store: Callable[..., EventStore], tmp_path: Path, step: str, crashed_file: int
) -> None:
    store = make_store()
    cut, stored = append_with_cut(store, shuffled_events(CRASH_EVENTS, seed=17), CRASH_ARCHIVED)
    exported = store.export_arrow().read_all()
    first, last = CRASH_RANGES[crashed_file]
    calls: list[tuple[str, int, int]] = []

    def fault(at: str, lo: int, hi: int) -> None:
        calls.append((at, lo, hi))
        if (at, lo) == (step, first):
            raise Crash(f"{at} {lo}-{hi}")

    with pytest.raises(Crash, match=f"{step} {first}-{last}"):
        store.compact_events(cut, archive_dir=tmp_path, file_events=FILE_EVENTS, fault=fault)
    assert calls[-1] == (step, first, last)

    # The state it stopped in: the files before this one compacted, this one as far as the
    # step got, nothing else; every event in the log or in a compacted archive, exactly once.
    done = CRASH_RANGES[: crashed_file + 1 if step == "compacted" else crashed_file]
    archived_end = done[-1][1] if done else 0
    expected_manifest = [(lo, hi, True) for lo, hi in done]
    if step == "recorded":
        expected_manifest.append((first, last, False))
    assert manifest(store) == expected_manifest
    assert positions(store, "archived_events") == list(range(1, archived_end + 1))
    assert positions(store, "events") == list(range(archived_end + 1, CRASH_EVENTS + 1))
    names = {file_name(lo, hi) for lo, hi in CRASH_RANGES[: crashed_file + 1]}
    assert {p.name for p in tmp_path.iterdir()} == names
    assert store.get_events(include_archived=True) == stored
    assert store.get_events() == stored[archived_end:]
    assert store.read().events == stored
    assert store.count_events() == CRASH_EVENTS
    report = store.verify()
    assert (report.ok, report.checked) == (True, CRASH_EVENTS), report
    if step == "recorded":
        # Recorded but not compacted: the trigger still refuses a plain delete of its events.
        with psycopg.connect(store.dsn, autocommit=True) as conn:
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="immutable"):
                conn.execute(
                    sql.SQL("DELETE FROM {} WHERE position = %s").format(
                        sql.Identifier(store.schema, "events")
                    ),
                    [first],
                )

    # The rerun finishes: the same files, manifest, index and reads as a clean compaction.
    seen: list[tuple[int, int]] = []
    moved = store.compact_events(
        cut,
        archive_dir=tmp_path,
        file_events=FILE_EVENTS,
        progress=lambda d, t: seen.append((d, t)),
    )
    assert moved == CRASH_ARCHIVED - archived_end
    if seen:
        assert seen[-1][0] == seen[-1][1]
    assert_clean_compaction(store, tmp_path, stored, exported)
    assert store.compact_events(cut, archive_dir=tmp_path, file_events=FILE_EVENTS) == 0


def assert_clean_compaction(
    store: EventStore, directory: Path, stored: list[SequencedEvent], exported: pa.Table
) -> None:
    assert manifest(store) == [(lo, hi, True) for lo, hi in CRASH_RANGES]
    rows = query(
        store.dsn,
        sql.SQL(
            "SELECT first_position, file_name, events, prev_hash, last_hash FROM {}"
            " ORDER BY first_position"
        ).format(sql.Identifier(store.schema, "archives")),
    )
    for (lo, hi), (first, name, events, prev_hash, last_hash) in zip(
        CRASH_RANGES, rows, strict=True
    ):
        assert (first, name, events) == (lo, file_name(lo, hi), hi - lo + 1)
        assert bytes(prev_hash) == (GENESIS_HASH if lo == 1 else stored[lo - 2].hash)
        assert bytes(last_hash) == stored[hi - 1].hash
        content = pq.read_table(directory / name)
        assert content.to_pylist() == exported.slice(lo - 1, hi - lo + 1).to_pylist()
    assert sorted(p.name for p in directory.iterdir()) == [
        file_name(lo, hi) for lo, hi in CRASH_RANGES
    ]
    assert positions(store, "archived_events") == list(range(1, CRASH_ARCHIVED + 1))
    assert positions(store, "events") == list(range(CRASH_ARCHIVED + 1, CRASH_EVENTS + 1))
    report = store.verify()
    assert (report.ok, report.checked) == (True, CRASH_EVENTS), report
    assert store.get_events(include_archived=True) == stored
    assert store.get_events() == stored[CRASH_ARCHIVED:]
    assert store.read().events == stored


def test_the_fault_hook_sees_every_step_of_every_file(history: History) -> None:
    assert history.faults == [(step, lo, hi) for lo, hi in RANGES for step in STEPS]


# -- 4. a changed or missing archive file ----------------------------------------------------


@pytest.fixture
def compacted(
    make_store: Callable[..., EventStore], tmp_path: Path
) -> tuple[EventStore, Path, list[SequencedEvent]]:
    store = make_store()
    cut, stored = append_with_cut(store, shuffled_events(800, seed=23), CRASH_ARCHIVED)
    assert store.compact_events(cut, archive_dir=tmp_path, file_events=FILE_EVENTS) == 600
    return store, tmp_path, stored


def test_a_flipped_byte_in_an_archive_is_reported_with_its_range(
    compacted: tuple[EventStore, Path, list[SequencedEvent]],
) -> None:
    store, directory, _ = compacted
    path = directory / file_name(251, 500)
    content = bytearray(path.read_bytes())
    content[len(content) // 2] ^= 0x01
    path.write_bytes(bytes(content))
    report = store.verify()
    assert (report.ok, report.first_bad_position, report.checked) == (False, 251, 250), report
    assert report.reason is not None
    assert path.name in report.reason
    assert "251-500" in report.reason
    # The live log alone still verifies, anchored on the manifest.
    assert store.verify(include_archived=False).ok


def test_a_deleted_archive_is_reported(
    compacted: tuple[EventStore, Path, list[SequencedEvent]],
    make_store: Callable[..., EventStore],
) -> None:
    store, directory, _ = compacted
    path = directory / file_name(501, 600)
    path.unlink()
    report = store.verify()
    assert (report.ok, report.first_bad_position, report.checked) == (False, 501, 500), report
    assert report.reason is not None and path.name in report.reason
    # Its events cannot be read, and a read says so instead of leaving them out.
    reader = make_store(schema=store.schema, cache_size=0)
    with pytest.raises(EventStoreError) as info:
        reader.get_events(EventFilter(limit=10, offset=520), include_archived=True)
    assert info.value.code == STORAGE_ERROR
    assert len(reader.get_events(EventFilter(limit=10, offset=100), include_archived=True)) == 10


def forge(store: EventStore, path: Path, table: pa.Table, first_position: int) -> None:
    """Write ``table`` over the archive ``path`` and forge its manifest row to match, as an
    attacker with superuser rights could."""
    pq.write_table(table, path)
    digest = hashlib.sha256(path.read_bytes()).digest()
    with superuser(store.dsn) as conn:
        conn.execute(
            sql.SQL("UPDATE {} SET sha256 = %s, bytes = %s WHERE first_position = %s").format(
                sql.Identifier(store.schema, "archives")
            ),
            [digest, path.stat().st_size, first_position],
        )


def changed(table: pa.Table, name: str, row: int, value: Any, nullable: bool = False) -> pa.Table:
    """``table`` with column ``name``'s value at ``row`` replaced (the column made nullable
    when ``nullable``)."""
    index = table.schema.get_field_index(name)
    field = table.schema.field(index)
    values = table.column(name).to_pylist()
    values[row] = value
    column = pa.array(values, field.type)
    return table.set_column(index, field.with_nullable(nullable), column)


def swapped(table: pa.Table, row: int) -> pa.Table:
    """``table`` with the events at ``row`` and the next one in each other's place."""
    parts = [table.slice(0, row), table.slice(row + 1, 1), table.slice(row, 1)]
    return pa.concat_tables([*parts, table.slice(row + 2)])


FORGERIES: dict[str, tuple[Callable[[pa.Table], pa.Table], int, str]] = {
    # name: (the change to the file of positions 251-500, the position reported, its words)
    "event type": (
        lambda t: t.set_column(
            t.schema.get_field_index("event_type"),
            "event_type",
            pa.array(
                ["Forged" if i == 9 else v for i, v in enumerate(t["event_type"].to_pylist())],
                pa.string(),
            ).dictionary_encode(),
        ),
        260,
        "hash does not match",
    ),
    "a tag value": (
        lambda t: changed(t, "tags", 3, [("issueId", "ISSUE-forged")]),
        254,
        "hash does not match",
    ),
    "a tag added": (
        lambda t: changed(t, "tags", 4, [*t["tags"][4].as_py(), ("zz", "1")]),
        255,
        "hash does not match",
    ),
    "data": (lambda t: changed(t, "data", 7, '{"forged": true}'), 258, "hash does not match"),
    "metadata": (lambda t: changed(t, "metadata", 8, "{}"), 259, "hash does not match"),
    "timestamp": (
        lambda t: changed(t, "timestamp", 11, BASE),
        262,
        "hash does not match",
    ),
    "a null": (lambda t: changed(t, "data", 12, None, nullable=True), 263, "data is NULL"),
    "a null tag value": (
        lambda t: changed(t, "tags", 13, [("issueId", None)], nullable=True),
        264,
        "tags is NULL",
    ),
    "two events swapped": (lambda t: swapped(t, 20), 271, "the next stored position is 272"),
    "a hash": (
        lambda t: changed(t, "hash", 30, bytes(32)),
        281,
        "hash does not match",
    ),
    "data that is not an object": (
        lambda t: changed(t, "data", 40, "[1, 2]"),
        291,
        "cannot be re-encoded",
    ),
}


@pytest.mark.parametrize("name", FORGERIES)
def test_an_archive_rewritten_with_a_changed_event_breaks_the_chain(
    compacted: tuple[EventStore, Path, list[SequencedEvent]], name: str
) -> None:
    """Even with the manifest's SHA-256 forged to match, the hash chain names the event."""
    store, directory, _ = compacted
    change, position, words = FORGERIES[name]
    path = directory / file_name(251, 500)
    forge(store, path, change(pq.read_table(path)), 251)
    report = store.verify()
    # ``checked`` counts the archive files that verified whole.
    assert (report.ok, report.first_bad_position, report.checked) == (False, position, 250), report
    assert report.reason is not None and words in report.reason, report.reason


def test_moved_archives_are_found_through_archive_dir(
    compacted: tuple[EventStore, Path, list[SequencedEvent]],
    make_store: Callable[..., EventStore],
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    store, directory, stored = compacted
    moved = tmp_path_factory.mktemp("moved") / "archives"
    shutil.move(directory, moved)
    lost = make_store(schema=store.schema, cache_size=0)
    report = lost.verify()
    assert (report.ok, report.first_bad_position) == (False, 1)
    with pytest.raises(EventStoreError) as info:
        lost.get_events(include_archived=True)
    assert info.value.code == STORAGE_ERROR
    found = make_store(schema=store.schema, cache_size=0, archive_dir=moved)
    assert found.get_events(include_archived=True) == stored
    report = found.verify()
    assert (report.ok, report.checked) == (True, len(stored))


# -- 5. the write side sees archived history -------------------------------------------------


@pytest.fixture
def marked(
    make_store: Callable[..., EventStore], tmp_path: Path
) -> tuple[EventStore, list[SequencedEvent]]:
    """A compacted store whose only ``Marker`` event (tag ``marker=m1``) is archived, at 100."""
    store = make_store(chunk_events=3)
    events = shuffled_events(300, seed=29)
    events.insert(99, DomainEvent("Marker", {"n": 1}, {"marker": "m1", "issueId": "ISSUE-1"}))
    cut, stored = append_with_cut(store, events, 200)
    assert stored[99].event_type == "Marker"
    assert store.compact_events(cut, archive_dir=tmp_path, file_events=100) == 200
    return store, stored


@pytest.mark.parametrize(
    "how", ["single append", "batch of two", "batch by COPY", "large batch", "transaction"]
)
def test_an_archived_event_id_is_a_duplicate(
    marked: tuple[EventStore, list[SequencedEvent]], how: str
) -> None:
    store, stored = marked
    archived_id = stored[42].event_id
    again = DomainEvent("Again", {"x": 1}, event_id=archived_id)
    new = [DomainEvent("New", {"n": n}) for n in range(7)]
    with pytest.raises(EventStoreError) as info:
        if how == "single append":
            store.append(again)
        elif how == "batch of two":
            store.append_batch([new[0], again])
        elif how == "batch by COPY":
            store.append_batch([new[0], again, new[1]])
        elif how == "large batch":  # above chunk_events=3: encoded and copied in chunks
            store.append_batch([*new, again])
        else:
            with store.transaction() as tx:
                tx.append_batch([new[0], again, new[1]])
    assert info.value.code == DUPLICATE_EVENT
    assert info.value.context["event_ids"] == [str(archived_id)]
    assert store.head() == len(stored)
    assert store.get_events(include_archived=True) == stored


@pytest.mark.parametrize(
    "batch", [1, 3, 5], ids=["by the append function", "by COPY", "large batch"]
)
@pytest.mark.parametrize(
    "condition_query",
    [
        Query.of(types=["Marker"]),
        Query.of(tags={"marker": "m1"}),
        Query.of(types=["Marker", "Other"], tags={"issueId": "ISSUE-1"}),
    ],
    ids=["type", "tag", "type and tag"],
)
def test_conditions_see_archived_events(
    marked: tuple[EventStore, list[SequencedEvent]], batch: int, condition_query: Query
) -> None:
    store, stored = marked
    head = len(stored)
    for after in (None, 0, 50, 99):
        with pytest.raises(EventStoreError) as info:
            store.append_batch(
                [DomainEvent("Decided", {"n": n}) for n in range(batch)],
                AppendCondition(condition_query, after=after),
            )
        assert info.value.code == APPEND_CONDITION_FAILED, after
        assert store.head() == head
    assert store.read(condition_query).events == [stored[99]]
    # After the archived match (and after the head) the condition holds.
    for after in (100, head):
        last = store.append_batch(
            [DomainEvent("Decided", {"n": n}) for n in range(batch)],
            AppendCondition(condition_query, after=after),
        )
        assert last == store.head()
    assert store.verify().ok


# -- 6. the triggers still hold --------------------------------------------------------------

REFUSED = {
    "delete a live event": "DELETE FROM {events} WHERE position = 250",
    "update a live event": "UPDATE {events} SET event_type = 'Changed' WHERE position = 250",
    "truncate the log": "TRUNCATE {events}",
    "delete an archived index row": "DELETE FROM {archived} WHERE position = 10",
    "update an archived index row": "UPDATE {archived} SET event_type = 'X' WHERE position = 10",
    "move an archived event's tags": "UPDATE {archived} SET tags = '{{}}' WHERE position = 150",
    "truncate the archived index": "TRUNCATE {archived}",
    "delete a manifest row": "DELETE FROM {archives} WHERE first_position = 1",
    "rename an archive": "UPDATE {archives} SET file_name = 'other.parquet'",
    "move an archive's range": (
        "UPDATE {archives} SET last_position = 150 WHERE first_position = 101"
    ),
    "compact again": "UPDATE {archives} SET compacted_at = now()",
    "un-compact": "UPDATE {archives} SET compacted_at = NULL WHERE first_position = 1",
    "truncate the manifest": "TRUNCATE {archives}",
}


@pytest.mark.parametrize("statement", REFUSED.values(), ids=list(REFUSED))
def test_changes_are_refused(
    marked: tuple[EventStore, list[SequencedEvent]], statement: str
) -> None:
    store, stored = marked
    before = manifest(store)
    with psycopg.connect(store.dsn, autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute(
                sql.SQL(statement).format(
                    events=sql.Identifier(store.schema, "events"),
                    archived=sql.Identifier(store.schema, "archived_events"),
                    archives=sql.Identifier(store.schema, "archives"),
                )
            )
    assert manifest(store) == before
    assert store.get_events(include_archived=True) == stored
    report = store.verify()
    assert (report.ok, report.checked) == (True, len(stored))


def test_a_forged_manifest_row_is_refused_or_found_by_verify(
    marked: tuple[EventStore, list[SequencedEvent]],
) -> None:
    """The manifest only grows by the next contiguous range, not yet compacted, and the archived
    index only takes events of such a range: a row out of order is refused. An owner who
    records the next range by hand and deletes its events is found out by `verify`."""
    store, stored = marked
    schema = store.schema
    archives = sql.Identifier(schema, "archives")
    archived = sql.Identifier(schema, "archived_events")
    events = sql.Identifier(schema, "events")
    insert = sql.SQL(
        "INSERT INTO {} (first_position, last_position, file_name, directory, events,"
        " bytes, sha256, prev_hash, last_hash, compacted_at)"
        " VALUES (%s, %s, 'forged.parquet', '/nowhere', %s, 1, '', '', '', %s)"
    ).format(archives)
    copy = sql.SQL(
        'INSERT INTO {} SELECT position, event_id, event_type, "timestamp", tags'
        " FROM {} WHERE position BETWEEN %s AND %s"
    ).format(archived, events)
    before = manifest(store)
    end = max(last for _, last, _ in before)
    with psycopg.connect(store.dsn, autocommit=True) as conn:
        for values in (
            [end + 50, end + 50, 1, None],
            [end + 1, end + 1, 1, datetime.now(timezone.utc)],
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(insert, values)
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute(copy, [end + 1, end + 1])
    assert manifest(store) == before
    assert store.get_events(include_archived=True) == stored
    with psycopg.connect(store.dsn, autocommit=True) as conn:
        conn.execute(insert, [end + 1, end + 1, 1, None])
        conn.execute(copy, [end + 1, end + 1])
        conn.execute(sql.SQL("DELETE FROM {} WHERE position = %s").format(events), [end + 1])
    report = store.verify()
    assert not report.ok
    assert report.first_bad_position == end + 1, report


# -- 7. idempotence and arguments ------------------------------------------------------------


def test_compaction_is_idempotent_and_follows_later_cuts(
    make_store: Callable[..., EventStore], tmp_path: Path
) -> None:
    store = make_store()
    events = shuffled_events(900, seed=31)
    assert store.compact_events(datetime.now(timezone.utc), archive_dir=tmp_path) == 0
    early = datetime.now(timezone.utc)
    time.sleep(0.02)
    cut, _ = append_with_cut(store, events[:600], 400)
    assert store.compact_events(early, archive_dir=tmp_path) == 0
    assert manifest(store) == []
    assert store.compact_events(cut, archive_dir=tmp_path, file_events=300) == 400
    files = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert store.compact_events(cut, archive_dir=tmp_path, file_events=300) == 0
    assert store.compact_events(cut.isoformat(), archive_dir=tmp_path) == 0
    assert store.compact_events(early, archive_dir=tmp_path) == 0
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == files
    assert manifest(store) == [(1, 300, True), (301, 400, True)]
    second = datetime.now(timezone.utc)
    time.sleep(0.02)
    store.append_batch(events[600:])
    moved = store.compact_events(
        second.astimezone(timezone(timedelta(hours=-5))).isoformat(),
        archive_dir=tmp_path,
        file_events=300,
    )
    assert moved == 200
    assert manifest(store) == [(1, 300, True), (301, 400, True), (401, 600, True)]
    assert positions(store, "events") == list(range(601, 901))
    report = store.verify()
    assert (report.ok, report.checked) == (True, 900)
    assert [e.event_id for e in store.get_events(include_archived=True)] == [
        e.event_id for e in events
    ]
    assert store.compact_events(datetime.now(timezone.utc), archive_dir=tmp_path) == 300
    assert store.get_events() == []
    assert store.compact_events(datetime.now(timezone.utc), archive_dir=tmp_path) == 0
    live = store.verify(include_archived=False)
    assert (live.ok, live.checked) == (True, 0)


@pytest.mark.parametrize(
    ("before", "file_events"),
    [
        (datetime(2030, 1, 1), 10),
        ("2030-01-01T00:00:00", 10),
        ("not a time", 10),
        ("", 10),
        (None, 10),
        (1_700_000_000, 10),
        (datetime(2030, 1, 1, tzinfo=timezone.utc), 0),
        (datetime(2030, 1, 1, tzinfo=timezone.utc), -5),
        (datetime(2030, 1, 1, tzinfo=timezone.utc), 2.5),
        (datetime(2030, 1, 1, tzinfo=timezone.utc), True),
    ],
    ids=[
        "naive datetime",
        "string without offset",
        "garbage",
        "empty",
        "None",
        "epoch number",
        "zero file events",
        "negative file events",
        "float file events",
        "bool file events",
    ],
)
def test_invalid_arguments_are_refused(
    make_store: Callable[..., EventStore], tmp_path: Path, before: Any, file_events: Any
) -> None:
    store = make_store()
    store.append_batch(shuffled_events(20, seed=37))
    with pytest.raises(EventStoreError) as info:
        store.compact_events(before, archive_dir=tmp_path / "a", file_events=file_events)
    assert info.value.code == VALIDATION_FAILED
    assert manifest(store) == []
    assert not (tmp_path / "a").exists()
    assert store.count_events() == len(store.get_events()) == 20


def test_a_second_compaction_at_the_same_time_is_refused(
    compacted: tuple[EventStore, Path, list[SequencedEvent]],
) -> None:
    store, directory, stored = compacted
    key = f"tamma_events:compact:{store.schema}"
    with psycopg.connect(store.dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(hashtext(%s))", [key])
        with pytest.raises(EventStoreError) as info:
            store.compact_events(datetime.now(timezone.utc), archive_dir=directory)
        assert info.value.code == STORAGE_ERROR
        # Released here: a closed connection's backend lets its locks go as it exits, which may
        # be after another connection's next statement.
        conn.execute("SELECT pg_advisory_unlock(hashtext(%s))", [key])
    assert store.compact_events(datetime.now(timezone.utc), archive_dir=directory) == 200
    assert store.get_events(include_archived=True) == stored


# -- 8. progress -----------------------------------------------------------------------------


def test_progress_follows_the_files(history: History) -> None:
    assert history.progress == [(last, ARCHIVED) for _, last in RANGES]


def test_a_range_reaching_into_the_archives_checks_them(
    compacted: tuple[EventStore, Path, list[SequencedEvent]],
) -> None:
    store, directory, _ = compacted
    report = store.verify(1, 50)
    assert report.ok and report.checked == 600, report
    path = directory / file_name(251, 500)
    content = bytearray(path.read_bytes())
    content[len(content) // 2] ^= 0x01
    path.write_bytes(bytes(content))
    report = store.verify(300, 700)
    assert (report.ok, report.first_bad_position) == (False, 251), report
    # A range wholly in the live log does not need the archives.
    assert store.verify(650, 700).ok


def test_paginate_and_export_parquet_include_archived_events(
    compacted: tuple[EventStore, Path, list[SequencedEvent]], tmp_path: Path
) -> None:
    store, _, stored = compacted
    pages = list(store.paginate(page_size=37, include_archived=True))
    assert [event for page in pages for event in page] == stored
    assert [event for page in store.paginate(page_size=37) for event in page] == stored[600:]
    path = tmp_path / "all.parquet"
    assert store.export_parquet(None, path, include_archived=True) == len(stored)
    assert store.export_parquet(None, tmp_path / "live.parquet") == len(stored) - 600


# -- archives of hostile content verify natively ---------------------------------------------

#: Tags and JSON that PostgreSQL prints differently from the codec, and that the archive keeps
#: as Arrow strings: escapes, control characters, non-ASCII text, key order, numbers.
HOSTILE_TAGS = [
    {"quote": 'a"b', "backslash": "c\\d", "both": '\\"'},
    {"control": "line\nfeed\ttab\x01\x1f\x7f", "é": "ü 中文 🎉 \u2028"},
    {"k": "", "zz": "long " * 40, "a": "1"},
    {},
]
HOSTILE_DATA = [
    {"b": 1, "aa": 2, "a": [1.5, -0.0, 1e16, 1.5e300, 5e-324, 0.1, 2**100, -(2**70)]},
    {"text": 'quote " backslash \\ newline \n tab \t bell \x07 é ü 中文 🎉 \u2028'},
    {"nested": {"z": {"y": [[], {}, [None, True, False, ""]]}}, "": "empty key"},
    {"n": 12345678901234567890, "f": 123456.789e-20, "neg": -1.0},
]


def test_archives_of_hostile_events_verify_and_keep_the_stored_fields(
    make_store: Callable[..., EventStore], tmp_path: Path
) -> None:
    """The rows `stored_rows` builds from an archive are the log's rows (the tags as an equal
    JSON object), and the native and reference codecs rehash them alike, to the stored hashes."""
    store = make_store()
    events = list(generate_events(60, seed=5))
    events += [
        DomainEvent("Hostile", data, tags, {"m": data, "n": n}, timestamp=at(n))
        for n, (tags, data) in enumerate(itertools.product(HOSTILE_TAGS, HOSTILE_DATA))
    ]
    store.append_batch(events)
    with store._pool.connection() as conn:
        ((live, count),) = copy_rows(
            conn,
            sql.SQL("SELECT {} FROM {} ORDER BY position").format(
                sql.SQL(", ").join(sql.Identifier(c) for c in COPY_COLUMNS),
                sql.Identifier(store.schema, "events"),
            ),
            [],
        )
    assert count == len(events)
    assert store.compact_events(datetime.now(timezone.utc), archive_dir=tmp_path) == count
    table = pq.read_table(next(tmp_path.glob("*.parquet")))
    rows = bytes(stored_rows(table))
    # Every field as the log holds it; the tags an equal JSON object.
    assert split_rows(rows) == split_rows(bytes(live))
    assert split_rows(rows)[0][:2] == [struct.pack(">q", 1), events[0].event_id.bytes]
    results = [codec.rehash(rows, count, 1, GENESIS_HASH) for codec in (native, reference)]
    assert results[0] == results[1] == (count, table["hash"][-1].as_py(), -1, "", "")
    report = store.verify()
    assert (report.ok, report.checked) == (True, count), report


def json_field(value: bytes) -> Any:
    """A jsonb field's value: its version byte, and its text parsed."""
    return value[:1], json.loads(value[1:])


def split_rows(rows: bytes) -> list[list[Any]]:
    """Binary COPY rows of `COPY_COLUMNS` as their fields, the tags parsed."""
    out: list[list[Any]] = []
    at = 0
    while at < len(rows):
        (fields,) = struct.unpack_from(">h", rows, at)
        at += 2
        values: list[Any] = []
        for _ in range(fields):
            (size,) = struct.unpack_from(">i", rows, at)
            values.append(rows[at + 4 : at + 4 + size])
            at += 4 + size
        values[4] = json_field(values[4])
        out.append(values)
    return out
