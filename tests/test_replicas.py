"""Read replicas, against a real streaming replica.

The module starts its own embedded primary and makes a replica of it with ``pg_basebackup -R``
from the embedded binaries, on a second port (`tamma_events.embedded.start_replica`), so that
pausing, stopping and restarting the replica touches no other test. (With
TAMMA_EVENTS_TEST_DSN set, the other tests use that server; these still use the embedded
binaries, which the package always installs.)

Every wait here is a hang bound, not a pass/fail threshold: the stores wait generously for the
replica (``replica_timeout``, ``replica_wait``) unless a test is about those bounds, and the
tests wait for the replica to stream and replay before relying on it.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from tamma_events import DomainEvent, EventFilter, EventStore, embedded
from tamma_events.ops.replicas import Replica
from tamma_events.stores.aio import AsyncEventStore

#: How long a test waits for the replica to stream, replay or serve before it fails: a bound
#: on a hang, never reached on a working replica however busy the machine.
HANG = 180.0
#: The stores' replica settings where a test is not about them (the defaults are 1 s each, which
#: a busy machine can miss: the read would go to the primary).
REPLICA_TIMEOUT = 30.0
REPLICA_WAIT = 60.0


@pytest.fixture(scope="module")
def cluster(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[embedded.EmbeddedServer, embedded.EmbeddedReplica]]:
    base: Path = tmp_path_factory.mktemp("replication")
    primary = embedded.start(base / "primary", cleanup="delete")
    replica = embedded.start_replica(primary, base / "replica", port=5433)
    try:
        yield primary, replica
    finally:
        if replica.running:
            replica.stop()
        primary.stop()


@pytest.fixture
def replica(
    cluster: tuple[embedded.EmbeddedServer, embedded.EmbeddedReplica],
) -> Iterator[embedded.EmbeddedReplica]:
    """The replica, running, streaming and caught up with the primary, whatever the previous
    test did to it."""
    primary, replica = cluster
    _make_ready(primary.dsn, replica)
    yield replica
    _make_ready(primary.dsn, replica)


def _make_ready(primary_dsn: str, replica: embedded.EmbeddedReplica) -> None:
    """Start the replica if it is stopped, resume its replay if paused, and wait until its WAL
    receiver streams and it has replayed everything the primary has written."""
    if not replica.running:
        replica.start()
    with psycopg.connect(replica.dsn, autocommit=True) as conn:
        if conn.execute("SELECT pg_is_wal_replay_paused()").fetchone() == (True,):
            conn.execute("SELECT pg_wal_replay_resume()")
    _wait_streaming(replica)
    _wait_replayed(primary_dsn, replica)


@pytest.fixture
def make_replicated(
    cluster: tuple[embedded.EmbeddedServer, embedded.EmbeddedReplica],
    replica: embedded.EmbeddedReplica,
) -> Iterator[Callable[..., EventStore]]:
    """Stores on the primary with the replica, each on a fresh schema; dropped afterwards.
    They wait `REPLICA_TIMEOUT` and `REPLICA_WAIT` for the replica unless told otherwise."""
    primary = cluster[0]
    opened: list[EventStore] = []

    def make(**kwargs: Any) -> EventStore:
        kwargs.setdefault("schema", f"r_{uuid.uuid4().hex[:12]}")
        kwargs.setdefault("replicas", [replica.dsn])
        kwargs.setdefault("cache_size", 0)
        kwargs.setdefault("replica_timeout", REPLICA_TIMEOUT)
        kwargs.setdefault("replica_wait", REPLICA_WAIT)
        store = EventStore(primary.dsn, **kwargs)
        opened.append(store)
        return store

    yield make
    for store in opened:
        store.close()
    with psycopg.connect(primary.dsn, autocommit=True) as conn:
        for store in opened:
            conn.execute(
                sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(store.schema))
            )


def _events(n: int, kind: str = "Seen") -> list[DomainEvent]:
    return [DomainEvent(event_type=kind, tags={"n": str(i)}, data={"i": i}) for i in range(n)]


def _replica_reads(store: EventStore) -> int:
    return store._replicas.members[0].reads


def _on_replica(replica: embedded.EmbeddedReplica, statement: str) -> Any:
    with psycopg.connect(replica.dsn, autocommit=True) as conn:
        return conn.execute(statement).fetchone()


def _wait_replayed(primary_dsn: str, replica: embedded.EmbeddedReplica) -> None:
    """Until the replica has replayed everything the primary has written (bounded)."""
    with psycopg.connect(primary_dsn, autocommit=True) as conn:
        row = conn.execute("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn").fetchone()
    assert row is not None
    deadline = time.monotonic() + HANG
    while time.monotonic() < deadline:
        replayed = _on_replica(replica, "SELECT pg_last_wal_replay_lsn() - '0/0'::pg_lsn")
        if replayed[0] >= row[0]:
            return
        time.sleep(0.05)
    raise AssertionError(f"the replica did not catch up within {HANG:.0f} s")


def _wait_streaming(replica: embedded.EmbeddedReplica) -> None:
    """Until the replica's WAL receiver streams from the primary (bounded): it connects a
    moment after the server starts, and again after a restart."""
    deadline = time.monotonic() + HANG
    while time.monotonic() < deadline:
        if _on_replica(replica, "SELECT status FROM pg_stat_wal_receiver") == ("streaming",):
            return
        time.sleep(0.05)
    raise AssertionError(f"the replica's WAL receiver did not stream within {HANG:.0f} s")


def _read_until_served(member: Replica, read: Callable[[], object]) -> None:
    """Repeat ``read`` until ``member`` serves one (bounded). A replica that has just come up
    can miss a short ``replica_timeout`` and is then left out for ``replica_retry``."""
    reads = member.reads
    deadline = time.monotonic() + HANG
    while member.reads == reads:
        assert time.monotonic() < deadline, f"the replica served no read within {HANG:.0f} s"
        read()
        time.sleep(0.05)


def test_the_replica_is_a_streaming_standby(replica: embedded.EmbeddedReplica) -> None:
    assert _on_replica(replica, "SELECT pg_is_in_recovery()") == (True,)
    _wait_streaming(replica)
    status = _on_replica(replica, "SELECT status FROM pg_stat_wal_receiver")
    assert status == ("streaming",)


def test_queries_are_served_by_the_replica(make_replicated: Callable[..., EventStore]) -> None:
    store = make_replicated()
    store.append_batch(_events(20))
    before = _replica_reads(store)
    events = store.get_events(EventFilter(event_types=["Seen"]))
    assert [e.data["i"] for e in events] == list(range(20))
    assert store.count_events() == 20
    assert store.get_event_types() == ["Seen"]
    assert store.get_event(events[3].event_id) == events[3]
    page = store.get_page(page_size=7)
    assert len(page.events) == 7
    assert sum(1 for _ in store.stream_events(batch_size=6)) == 20
    assert store.export_arrow(batch_size=8).read_all().num_rows == 20
    # Every one of those reads went to the replica; none fell back.
    assert _replica_reads(store) - before >= 8
    assert store.metrics()["replica_fallbacks"] == 0
    # Decisions and the head are the primary's.
    reads = _replica_reads(store)
    assert store.read().head == 20
    assert store.head() == 20
    assert _replica_reads(store) == reads


def test_reads_see_the_callers_own_appends_at_once(
    make_replicated: Callable[..., EventStore],
) -> None:
    store = make_replicated()
    before = _replica_reads(store)
    for n in range(1, 31):
        store.append(DomainEvent(event_type="Step", tags={"n": str(n)}))
        # Right after the append, the replica-served count already includes it.
        assert store.count_events(EventFilter(event_types=["Step"])) == n
        assert store.get_events(EventFilter(tags={"n": str(n)}))[0].position == n
    served = _replica_reads(store) - before
    fallbacks = store.metrics()["replica_fallbacks"]
    assert served + fallbacks == 60
    assert served > 0


def test_replay_lag_makes_reads_wait_then_fall_back_to_the_primary(
    make_replicated: Callable[..., EventStore], replica: embedded.EmbeddedReplica
) -> None:
    store = make_replicated(replica_wait=0.3)
    eventual = make_replicated(schema=store.schema, consistency="eventual", migrate=False)
    store.append_batch(_events(5))
    _wait_replayed(store.dsn, replica)
    _on_replica(replica, "SELECT pg_wal_replay_pause()")
    store.append_batch(_events(3, "Late"))
    member = store._replicas.members[0]
    fallbacks = store.metrics()["replica_fallbacks"]
    reads = member.reads
    # Read your writes: the paused replica has not replayed the append, so the read waits
    # for it (replica_wait), then the primary answers, with the new events.
    assert store.count_events(EventFilter(event_types=["Late"])) == 3
    assert store.metrics()["replica_fallbacks"] == fallbacks + 1
    assert member.reads == reads
    assert member.replayed < store._replicas.target
    # Measuring the replicas finds the lag, and the metrics show it from then on.
    (measured,) = store.measure_replicas()
    (status,) = store.metrics()["replicas"]
    assert status == measured
    assert status["up"] is True
    assert status["lag_bytes"] > 0
    # consistency="eventual" opts out: the replica answers with what it has.
    assert eventual.count_events(EventFilter(event_types=["Late"])) == 0
    assert eventual.metrics()["replica_fallbacks"] == 0
    # Once replay resumes, the replica serves the same store's reads again.
    _on_replica(replica, "SELECT pg_wal_replay_resume()")
    _wait_replayed(store.dsn, replica)
    assert store.count_events(EventFilter(event_types=["Late"])) == 3
    assert member.reads == reads + 1
    assert eventual.count_events(EventFilter(event_types=["Late"])) == 3


def test_a_walk_pinned_beyond_the_replicas_head_reads_the_primary(
    make_replicated: Callable[..., EventStore], replica: embedded.EmbeddedReplica
) -> None:
    """A page token (or the next batch of a stream) carries the head its walk is pinned to;
    a replica that has not reached it must not end the walk early."""
    store = make_replicated(consistency="eventual")
    store.append_batch(_events(10))
    _wait_replayed(store.dsn, replica)
    _on_replica(replica, "SELECT pg_wal_replay_pause()")
    store.append_batch(_events(10, "More"))
    # The first page from the primary (no replicas): pinned to head 20.
    with EventStore(store.dsn, schema=store.schema, migrate=False, cache_size=0) as primary:
        first = primary.get_page(page_size=5)
    assert first.next_token is not None
    fallbacks = store.metrics()["replica_fallbacks"]
    positions = [e.position for e in first.events]
    token: str | None = first.next_token
    while token is not None:
        page = store.get_page(page_size=5, token=token)
        positions += [e.position for e in page.events]
        token = page.next_token
    assert positions == list(range(1, 21))
    assert store.metrics()["replica_fallbacks"] > fallbacks


def test_a_stopped_replica_sends_reads_to_the_primary_and_a_restarted_one_is_used_again(
    make_replicated: Callable[..., EventStore], replica: embedded.EmbeddedReplica
) -> None:
    # Short bounds: a stopped replica is found down once a connection does not come within
    # replica_timeout (the pool waits that long), and tried again after replica_retry.
    store = make_replicated(replica_retry=0.5, replica_timeout=0.5)
    store.append_batch(_events(12))
    member = store._replicas.members[0]

    def count_all() -> None:
        assert store.count_events() == 12

    # Up: its first connection may take longer than replica_timeout on a busy machine.
    _read_until_served(member, count_all)
    replica.stop()
    # Reads keep working, on the primary.
    fallbacks = store.metrics()["replica_fallbacks"]
    for _ in range(5):
        assert len(store.get_events()) == 12
    assert store.metrics()["replica_fallbacks"] >= fallbacks + 5
    assert member.down is True
    (status,) = store.metrics()["replicas"]
    assert status["up"] is False
    store.append(DomainEvent(event_type="WhileDown"))
    replica.start()
    # Back: once its retry interval is over, reads go to it again (it catches up first).
    reads = member.reads

    def count_all_and_the_new_one() -> None:
        assert store.count_events() == 13

    _read_until_served(member, count_all_and_the_new_one)
    assert member.reads > reads
    assert member.down is False
    assert store.metrics()["replicas"][0]["up"] is True


def test_a_replica_down_when_the_store_opens(
    make_replicated: Callable[..., EventStore], replica: embedded.EmbeddedReplica
) -> None:
    replica.stop()
    # Short: the pool waits replica_timeout for a connection the stopped replica never gives.
    store = make_replicated(replica_timeout=0.3)
    store.append_batch(_events(4))
    assert store.count_events() == 4
    assert store.metrics()["replica_fallbacks"] >= 1


def test_the_async_store_reads_from_the_replica(
    cluster: tuple[embedded.EmbeddedServer, embedded.EmbeddedReplica],
    replica: embedded.EmbeddedReplica,
) -> None:
    primary = cluster[0]
    schema = f"r_{uuid.uuid4().hex[:12]}"

    async def scenario() -> tuple[int, int, list[int]]:
        async with AsyncEventStore(
            primary.dsn,
            schema=schema,
            replicas=[replica.dsn],
            cache_size=0,
            replica_timeout=REPLICA_TIMEOUT,
            replica_wait=REPLICA_WAIT,
        ) as store:
            counts = []
            for _ in range(5):
                await store.append(DomainEvent(event_type="Async"))
                counts.append(await store.count_events())
            member = store._replicas.members[0]
            return member.reads, store._replicas.fallbacks, counts

    try:
        reads, fallbacks, counts = asyncio.run(scenario())
    finally:
        with psycopg.connect(primary.dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
    assert counts == [1, 2, 3, 4, 5]
    assert reads + fallbacks == 5
    assert reads > 0


def test_an_append_whose_wal_position_cannot_be_read_is_not_reported_failed(
    make_replicated: Callable[..., EventStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    """After the commit, the store reads the primary's WAL position for read-your-writes. If
    that read fails, the append still succeeded: it must say so (a retry would store the
    events twice), and the next read asks the primary for the position instead."""
    import tamma_events.ops.appending

    store = make_replicated()
    monkeypatch.setattr(tamma_events.ops.appending, "PRIMARY_LSN", "SELECT no_such_function()")
    assert store.append(DomainEvent(event_type="Committed")) == 1
    assert store.append_batch(_events(5)) == 6
    assert store._replicas.pending
    monkeypatch.undo()
    # The next query settles the position first; it then sees both appends.
    assert store.count_events() == 6
    assert not store._replicas.pending
    assert store._replicas.target > 0
    assert store.head() == 6
    assert store.verify().ok
