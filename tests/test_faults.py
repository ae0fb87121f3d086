"""Faults with real processes: the server SIGKILLed in the middle of a stream of batches and
restarted, connections terminated during appends, reads and subscriptions, and appends under
``statement_timeout`` and ``lock_timeout`` while a long compaction runs. After each, every
batch whose append returned is stored exactly once, every other batch wholly or not at all,
subscribers saw every event once in order, and `verify()` passes.

(A client SIGKILLed in the middle of its COPY is in test_atomicity.py.)
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path

import psutil
import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from tamma_events import (
    APPEND_CONDITION_FAILED,
    DUPLICATE_EVENT,
    STORAGE_ERROR,
    AppendCondition,
    DomainEvent,
    EventFilter,
    EventStore,
    EventStoreError,
    Query,
    embedded,
)

pytestmark = pytest.mark.codec_neutral

BATCH = 2_000


class Producer:
    """Appends numbered batches in a thread. With ``retry``, a batch that failed for the
    connection is tried again with the same event ids until it is stored (``"returned"``) or
    the store answers DUPLICATE_EVENT: its first try had landed (``"landed"``). Without, it
    moves on (``"failed"``: unknown, the batch must be wholly stored or wholly absent)."""

    def __init__(self, store: EventStore, name: str, retry: bool) -> None:
        self.store = store
        self.name = name
        self.retry = retry
        self.batches: list[list[DomainEvent]] = []
        self.outcomes: list[str] = []
        self.storage_errors = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            number = len(self.batches)
            batch = [
                DomainEvent("Batch", {"n": number, "i": i}, {"producer": self.name})
                for i in range(BATCH)
            ]
            self.batches.append(batch)
            self.outcomes.append(self._append(batch))

    def _append(self, batch: list[DomainEvent]) -> str:
        while True:
            try:
                self.store.append_batch(batch)
                return "returned"
            except EventStoreError as exc:
                if exc.code == DUPLICATE_EVENT and self.retry:
                    return "landed"
                assert exc.code == STORAGE_ERROR, exc
                self.storage_errors += 1
                if not self.retry or self.stop.is_set():
                    return "failed"
                time.sleep(0.05)

    def returned(self, count: int, timeout: float = 120.0) -> None:
        """Wait until ``count`` more batches have returned."""
        target = self.outcomes.count("returned") + count
        deadline = time.monotonic() + timeout
        while self.outcomes.count("returned") < target:
            assert self.thread.is_alive(), "the producer died"
            assert time.monotonic() < deadline, f"{self.name}: no progress"
            time.sleep(0.02)


class Follower:
    """A subscription from the start of the log, in a thread, keeping every position."""

    def __init__(self, store: EventStore) -> None:
        self.subscription = store.subscribe(after=0, poll_interval=0.5, retry_for=120.0)
        self.positions: list[int] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        for event in self.subscription:
            self.positions.append(event.position)

    def reaches(self, head: int, timeout: float = 120.0) -> list[int]:
        deadline = time.monotonic() + timeout
        while self.subscription.position < head and time.monotonic() < deadline:
            time.sleep(0.02)
        self.subscription.stop()
        self.thread.join(10)
        return self.positions


def check_batches(
    store: EventStore, producers: list[Producer], other_types: frozenset[str] = frozenset()
) -> None:
    """Every batch that returned (or landed on retry) is stored once, whole and in order;
    every batch that failed is stored wholly or not at all; the log holds nothing else but
    events of ``other_types``; positions are gapless and the chain verifies."""
    everything = list(store.read())
    assert [e.position for e in everything] == list(range(1, len(everything) + 1))
    log = {e.event_id: e for e in everything if e.event_type not in other_types}
    stored = 0
    for producer in producers:
        for batch, outcome in zip(producer.batches, producer.outcomes, strict=False):
            found = [log.get(event.event_id) for event in batch]
            if outcome in ("returned", "landed"):
                assert None not in found, (producer.name, outcome)
            if None in found:
                assert found == [None] * len(batch), f"{producer.name}: part of a batch stored"
                continue
            positions = [e.position for e in found if e is not None]
            assert positions == list(range(positions[0], positions[0] + len(batch)))
            assert [e.data for e in found if e is not None] == [e.data for e in batch]
            stored += len(batch)
    assert stored == len(log), "the log holds events no producer appended"
    assert store.verify().ok


# -- the server killed -----------------------------------------------------------------------


def kill_server(server: embedded.EmbeddedServer) -> None:
    """SIGKILL the postmaster and every backend at once (its process group), as a crash
    would, and wait until none of them runs."""
    pid = server.pid
    assert pid is not None
    os.killpg(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while any(_in_group(process, pid) for process in psutil.process_iter()):
        assert time.monotonic() < deadline, "the server's processes outlived SIGKILL"
        time.sleep(0.05)
    assert not server.running


def wait_for_a_copy(dsn: str) -> None:
    """Return once a batch's COPY is under way on the server (rows sent, not committed)."""
    deadline = time.monotonic() + 60
    with psycopg.connect(dsn, autocommit=True) as conn:
        while not conn.execute(
            "SELECT count(*) > 0 FROM pg_stat_progress_copy WHERE tuples_processed > 0"
        ).fetchone()[0]:  # type: ignore[index]
            assert time.monotonic() < deadline, "no COPY got going"
            time.sleep(0.002)


def _in_group(process: psutil.Process, group: int) -> bool:
    try:
        return os.getpgid(process.pid) == group and process.status() != psutil.STATUS_ZOMBIE
    except (OSError, psutil.Error):
        return False


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[embedded.EmbeddedServer]:
    """An embedded server of this test's own, to kill."""
    server = embedded.start(tmp_path / "data", cleanup="delete")
    yield server
    server.ensure_running()
    server.stop()


def test_a_server_killed_mid_batches_loses_no_returned_batch(
    own_server: embedded.EmbeddedServer,
) -> None:
    store = EventStore(own_server.dsn, schema="faults", max_connections=4, pool_timeout=5)
    try:
        retrying = Producer(store, "retrying", retry=True)
        moving_on = Producer(store, "moving-on", retry=False)
        follower = Follower(store)
        for producer in (retrying, moving_on):
            producer.thread.start()
        retrying.returned(3)
        moving_on.returned(3)
        wait_for_a_copy(own_server.dsn)
        kill_server(own_server)
        time.sleep(1.0)  # the producers meet a dead server
        # The same data directory: the server recovers from its WAL. The store is not told:
        # its pool reconnects by itself.
        embedded.start(own_server.data_dir, cleanup="delete")
        retrying.returned(3)
        moving_on.returned(3)
        for producer in (retrying, moving_on):
            producer.stop.set()
            producer.thread.join(60)
        check_batches(store, [retrying, moving_on])
        head = store.head()
        assert follower.reaches(head) == list(range(1, head + 1))
    finally:
        store.close()


# -- connections terminated ----------------------------------------------------------------------


class Killer:
    """Terminates one backend of the store's application name at a time, every few tens of
    milliseconds, from a connection of its own."""

    def __init__(self, dsn: str, application_name: str) -> None:
        self.dsn = dsn
        self.application_name = application_name
        self.killed = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            while not self.stop.wait(random.uniform(0.02, 0.08)):
                row = conn.execute(
                    "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM"
                    " (SELECT pid FROM pg_stat_activity WHERE application_name = %s"
                    "  ORDER BY random() LIMIT 1) AS one",
                    [self.application_name],
                ).fetchone()
                self.killed += int(row[0]) if row else 0

    def finish(self) -> None:
        self.stop.set()
        self.thread.join(10)


def test_terminated_connections_fail_safely_or_retry(
    pg_dsn: str, make_store: Callable[..., EventStore]
) -> None:
    name = f"kill-{uuid.uuid4().hex[:8]}"
    store = make_store(dsn=make_conninfo(pg_dsn, application_name=name), max_connections=8)
    store.append_batch([DomainEvent("Seed", {"i": i}) for i in range(50)])
    follower = Follower(store)
    retrying = Producer(store, "retrying", retry=True)
    moving_on = Producer(store, "moving-on", retry=False)
    decisions: list[tuple[DomainEvent, str]] = []
    reads = {"ok": 0, "failed": 0}
    stop = threading.Event()

    def decide() -> None:
        """Conditional appends on one boundary, retried with the same id after a lost
        connection. A refusal on a retry may be the first try's own doing: get_event tells."""
        boundary = Query.of(types=["Decided"], tags={"boundary": "b"})
        while not stop.is_set():
            event = DomainEvent("Decided", {"at": time.time()}, {"boundary": "b"})
            while True:
                try:
                    seen = store.read(boundary)
                    store.append(event, AppendCondition(boundary, seen.head))
                    decisions.append((event, "returned"))
                    break
                except EventStoreError as exc:
                    if exc.code == STORAGE_ERROR:
                        continue
                    assert exc.code in (APPEND_CONDITION_FAILED, DUPLICATE_EVENT), exc
                    landed = _lookup(store, event)
                    decisions.append((event, "landed" if landed else "refused"))
                    break

    def read() -> None:
        """Every read path: each returns whole, consistent results or raises STORAGE_ERROR."""
        while not stop.is_set():
            try:
                for events in (
                    list(store.read()),
                    store.get_events(EventFilter(event_types=["Batch", "Seed", "Decided"])),
                    list(store.stream_events(batch_size=97)),
                ):
                    positions = [e.position for e in events]
                    assert positions == list(range(1, len(positions) + 1))
                table = store.export_arrow(batch_size=500).read_all()
                assert table.column("position").to_pylist() == list(range(1, table.num_rows + 1))
                reads["ok"] += 1
            except EventStoreError as exc:
                assert exc.code == STORAGE_ERROR, exc
                reads["failed"] += 1

    threads = [threading.Thread(target=f, daemon=True) for f in (decide, read)]
    for thread in threads:
        thread.start()
    retrying.thread.start()
    moving_on.thread.start()
    killer = Killer(pg_dsn, name)

    def progressed() -> bool:
        """Every kind of work got through between the kills at least once."""
        return (
            reads["ok"] > 0
            and "returned" in retrying.outcomes
            and any(outcome == "returned" for _event, outcome in decisions)
        )

    try:
        # At least 4 s and 10 kills, then on until each kind of work got through: a busy
        # machine makes this longer, not a failure. The bound is for a hang.
        least = time.monotonic() + 4.0
        hang = time.monotonic() + 180.0
        workers = [*threads, retrying.thread, moving_on.thread]
        while time.monotonic() < least or killer.killed < 10 or not progressed():
            assert time.monotonic() < hang, ("no progress", killer.killed, reads, decisions[-3:])
            assert all(thread.is_alive() for thread in workers), "a worker died"
            time.sleep(0.05)
    finally:
        killer.finish()
        stop.set()
        retrying.stop.set()
        moving_on.stop.set()
        for thread in [*threads, retrying.thread, moving_on.thread]:
            thread.join(60)
    assert progressed()
    # Every decision that returned, or landed on a retry, is stored once; no refused one is.
    for event, outcome in decisions:
        assert _lookup(store, event) == (outcome != "refused"), outcome
    decided = store.read(Query.of(types=["Decided"]))
    assert len(decided) == len({e.event_id for e in decided})
    # The seed batch and the producers' batches, whole or absent.
    seeds = len(store.get_events(EventFilter(event_types=["Seed"])))
    assert seeds == 50
    check_batches(store, [retrying, moving_on], frozenset({"Seed", "Decided"}))
    head = store.head()
    assert follower.reaches(head) == list(range(1, head + 1))


def _lookup(store: EventStore, event: DomainEvent) -> bool:
    """Whether ``event`` is stored, asking until the connection holds."""
    for _ in range(100):
        try:
            return store.get_event(event.event_id) is not None
        except EventStoreError as exc:
            assert exc.code == STORAGE_ERROR, exc
    raise AssertionError("get_event never got through")


# -- timeouts, and a long compaction beside appends ---------------------------------------------


def test_appends_run_beside_a_long_compaction_under_lock_and_statement_timeouts(
    pg_dsn: str, make_store: Callable[..., EventStore], tmp_path: Path
) -> None:
    """The documented bound: an append waits for a lock at most ``lock_timeout``, and
    compaction holds no lock an append needs, so appends keep going while it runs (held
    half-way through its first file until one has)."""
    # lock_timeout is the bound under test; statement_timeout only stops a runaway statement,
    # generous enough for the compaction's 60,000-event statements on a busy machine.
    timeouts = "-c lock_timeout=1000 -c statement_timeout=120000"
    store = make_store(dsn=make_conninfo(pg_dsn, options=timeouts), archive_dir=tmp_path)
    with psycopg.connect(store.dsn) as conn:
        assert conn.execute("SHOW lock_timeout").fetchone() == ("1s",)
    for _ in range(6):
        store.append_batch(
            [DomainEvent("Old", {"i": i}, {"issueId": f"I-{i % 500}"}) for i in range(10_000)]
        )
    before = datetime.now(timezone.utc)
    appended: list[int] = []
    failures: list[EventStoreError] = []
    done = threading.Event()
    progress = threading.Condition()
    held: list[tuple[str, int, int]] = []

    def append() -> None:
        query = Query.of(types=["New"], tags={"issueId": "I-1"})
        while not done.is_set():
            try:
                seen = store.read(query)
                event = DomainEvent("New", {"n": len(appended)}, {"issueId": "I-1"})
                appended.append(store.append(event, AppendCondition(query, seen.head)))
                with progress:
                    progress.notify_all()
                appended.append(store.append_batch([DomainEvent("New") for _ in range(50)]))
                with progress:
                    progress.notify_all()
            except EventStoreError as exc:
                failures.append(exc)

    def hold(step: str, first: int, last: int) -> None:
        """After the compaction's first step, wait until an append completes while the
        compaction is under way; the 120 s are a bound for a hang."""
        if held:
            return
        held.append((step, first, last))
        with progress:
            mark = len(appended)
            assert progress.wait_for(lambda: len(appended) > mark, timeout=120), failures[:3]

    thread = threading.Thread(target=append, daemon=True)
    thread.start()
    try:
        moved = store.compact_events(before, file_events=20_000, fault=hold)
    finally:
        done.set()
        thread.join(60)
    assert moved == 60_000
    assert held == [("written", 1, 20_000)]
    assert failures == []
    assert len(appended) > 0
    old = EventFilter(event_types=["Old"])
    assert store.get_events(old) == []
    assert len(store.get_events(old, include_archived=True)) == 60_000
    assert store.verify().ok


def test_an_append_waits_for_the_head_lock_at_most_lock_timeout(
    pg_dsn: str, make_store: Callable[..., EventStore]
) -> None:
    store = make_store(dsn=make_conninfo(pg_dsn, options="-c lock_timeout=200"))
    store.append(DomainEvent("A"))
    with psycopg.connect(pg_dsn) as holder:
        holder.execute(
            psycopg.sql.SQL("SELECT position FROM {} FOR UPDATE").format(
                psycopg.sql.Identifier(store.schema, "head")
            )
        )
        with pytest.raises(EventStoreError) as info:
            store.append(DomainEvent("B"))
        assert info.value.code == STORAGE_ERROR
        assert info.value.context.get("sqlstate") == "55P03", info.value.context
        holder.rollback()
    assert store.append(DomainEvent("C")) == 2
    assert [e.event_type for e in store.read()] == ["A", "C"]
    assert store.verify().ok
