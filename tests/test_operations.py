"""Operations: the connection pool, metrics (a snapshot and Prometheus over HTTP), appends in
a caller's transaction, and logs and reprs that keep DSN passwords out."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from _cli_support import free_port
from _web_support import LiveServer
from tamma_events import (
    APPEND_CONDITION_FAILED,
    DUPLICATE_EVENT,
    STORAGE_ERROR,
    VALIDATION_FAILED,
    AppendCondition,
    DomainEvent,
    EventFilter,
    EventStore,
    EventStoreError,
    Query,
    QueryItem,
)
from tamma_events import codec as _codec
from tamma_events.ops.replicas import redact
from tamma_events.stores.aio import AsyncEventStore
from tamma_events.streaming.web import create_app


def _dsn_with(pg_dsn: str, **params: str) -> str:
    return psycopg.conninfo.make_conninfo(pg_dsn, **params)


def _terminate(pg_dsn: str, application_name: str) -> int:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pg_terminate_backend(pid, 10000) FROM pg_stat_activity"
            " WHERE application_name = %s AND pid <> pg_backend_pid()",
            [application_name],
        ).fetchall()
    return len(rows)


# -- the pool ------------------------------------------------------------------------------------


def test_pool_settings_and_stats(make_store: Callable[..., EventStore]) -> None:
    store = make_store(min_connections=2, max_connections=4, max_lifetime=120, max_idle=60)
    store.append(DomainEvent(event_type="A"))
    stats = store.pool_stats()
    assert stats["min"] == 2
    assert stats["max"] == 4
    assert 2 <= stats["size"] <= 4
    assert 0 <= stats["idle"] <= stats["size"]
    assert stats["waiting"] == 0
    assert stats["requests"] >= 2
    assert stats["connection_errors"] == 0


# -- a server that is not there ------------------------------------------------------------------


@contextmanager
def _silent_server() -> Iterator[int]:
    """A loopback port that accepts TCP connections (the kernel completes them) and never says
    a word: a server that does not answer."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        yield int(listener.getsockname()[1])


def _pool_retries(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith("psycopg.pool")]


@pytest.mark.codec_neutral
@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_refused_connection_is_one_clear_error_and_no_pool_retries(
    kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A server that refuses connections fails the store's opening with one STORAGE_ERROR that
    names the host and port, without the password, and says what to check. The pool never
    starts retrying: its retries are for connections lost later."""
    caplog.set_level(logging.INFO, logger="psycopg.pool")
    port = free_port()
    dsn = f"postgresql://u:s3cr3t-pw@127.0.0.1:{port}/x"
    with pytest.raises(EventStoreError) as info:
        if kind == "sync":
            EventStore(dsn)
        else:
            asyncio.run(AsyncEventStore(dsn).open())
    error = info.value
    assert error.code == STORAGE_ERROR
    assert error.message.startswith(f"cannot connect to PostgreSQL at 127.0.0.1:{port}: ")
    assert "connection refused" in error.message
    assert "check that the server is running there" in error.message
    assert "\n" not in error.message
    assert "s3cr3t-pw" not in error.message + repr(error.context)
    assert error.context["server"] == f"127.0.0.1:{port}"
    assert _pool_retries(caplog) == []


@pytest.mark.codec_neutral
def test_a_server_that_never_answers_is_reported_after_connect_timeout() -> None:
    with _silent_server() as port:
        with pytest.raises(EventStoreError) as info:
            EventStore(f"host=127.0.0.1 port={port} user=u", connect_timeout=2)
    assert info.value.message == (
        f"cannot connect to PostgreSQL at 127.0.0.1:{port}: no answer within 2 s; check the"
        " host and port, and that no firewall drops the connection"
    )


@pytest.mark.codec_neutral
def test_the_socket_a_dsn_names_is_said_when_nothing_listens(tmp_path: Path) -> None:
    with pytest.raises(EventStoreError) as info:
        EventStore(f"host={tmp_path} port=6543 user=u")
    assert info.value.message.startswith(
        f"cannot connect to PostgreSQL at the Unix socket {tmp_path}/.s.PGSQL.6543: "
    )


@pytest.mark.parametrize("name", ["connect_timeout", "pool_timeout"])
@pytest.mark.parametrize("value", [0, -1, float("inf"), float("nan"), "5", True])
def test_timeouts_must_be_positive_seconds(pg_dsn: str, name: str, value: object) -> None:
    with pytest.raises(EventStoreError) as info:
        EventStore(pg_dsn, **{name: value})
    assert info.value.code == VALIDATION_FAILED
    assert info.value.context == {"field": name}
    with pytest.raises(EventStoreError) as info:
        AsyncEventStore(pg_dsn, **{name: value})
    assert info.value.context == {"field": name}


def test_bad_pool_settings_are_a_validation_error(pg_dsn: str) -> None:
    with pytest.raises(EventStoreError) as info:
        EventStore(pg_dsn, min_connections=5, max_connections=2)
    assert info.value.code == VALIDATION_FAILED


def test_an_exhausted_pool_times_out_with_a_clear_error(
    make_store: Callable[..., EventStore],
) -> None:
    store = make_store(min_connections=1, max_connections=1, pool_timeout=0.5)
    store.append(DomainEvent(event_type="A"))
    with store.transaction() as tx:  # holds the only connection
        tx.append(DomainEvent(event_type="B"))
        with pytest.raises(EventStoreError) as info:
            store.get_events()
        error = info.value
        assert error.code == STORAGE_ERROR
        assert "getting a connection failed" in error.message
        assert error.context["pool_max"] == 1
        assert store.pool_stats()["request_timeouts"] >= 1
    # Released: the pool serves again, and the transaction committed.
    assert [e.event_type for e in store.get_events()] == ["A", "B"]


def test_killed_connections_are_replaced_and_the_next_operation_succeeds(pg_dsn: str) -> None:
    name = f"pool-{uuid.uuid4().hex[:8]}"
    store = EventStore(
        _dsn_with(pg_dsn, application_name=name),
        schema=f"t_{uuid.uuid4().hex[:12]}",
        min_connections=3,
        max_connections=3,
        cache_size=0,
    )
    try:
        store.append_batch([DomainEvent(event_type="A") for _ in range(3)])
        store._pool.wait(10)  # all three connections open
        assert _terminate(pg_dsn, name) == 3
        # Each operation right after the kill succeeds: a lost connection found before anything
        # was committed is checked out of the pool and the operation runs again.
        assert store.count_events() == 3
        assert store.append(DomainEvent(event_type="B")) == 4
        assert _terminate(pg_dsn, name) >= 1
        assert store.append(DomainEvent(event_type="C")) == 5
        assert _terminate(pg_dsn, name) >= 1
        assert [e.position for e in store.get_events()] == [1, 2, 3, 4, 5]
        assert store.pool_stats()["connections_lost"] + store.pool_stats()["connections"] > 3
        assert store.verify().ok
    finally:
        store.close()
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute(
                psycopg.sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(
                    psycopg.sql.Identifier(store.schema)
                )
            )


# -- appends in the caller's transaction ----------------------------------------------------------


def test_an_append_commits_with_the_callers_own_work(pg_dsn: str, store: EventStore) -> None:
    with psycopg.connect(pg_dsn) as conn:
        conn.execute("CREATE TEMP TABLE outbox_work (note text)")
        conn.execute("INSERT INTO outbox_work VALUES ('order placed')")
        position = store.append(DomainEvent(event_type="OrderPlaced"), conn=conn)
        assert position == 1
        # Not visible to others before the caller commits.
        assert store.get_events() == []
        conn.commit()
    assert [e.event_type for e in store.get_events()] == ["OrderPlaced"]
    assert store.head() == 1


def test_an_append_rolls_back_with_the_callers_transaction(pg_dsn: str, store: EventStore) -> None:
    store.append(DomainEvent(event_type="First"))
    with psycopg.connect(pg_dsn) as conn:
        store.append_batch(
            [DomainEvent(event_type="Lost"), DomainEvent(event_type="Lost")], conn=conn
        )
        conn.rollback()
    assert store.head() == 1
    assert store.count_events(EventFilter(event_types=["Lost"])) == 0
    assert store.append(DomainEvent(event_type="Next")) == 2
    assert store.verify().ok


def test_a_failed_append_leaves_the_callers_transaction_usable(
    pg_dsn: str, store: EventStore
) -> None:
    first = DomainEvent(event_type="Once")
    store.append(first)
    with psycopg.connect(pg_dsn) as conn:
        with pytest.raises(EventStoreError) as duplicate:
            store.append(first, conn=conn)
        assert duplicate.value.code == DUPLICATE_EVENT
        condition = AppendCondition(Query([QueryItem(types=["Once"])]), after=None)
        with pytest.raises(EventStoreError) as conflict:
            store.append(DomainEvent(event_type="Twice"), condition, conn=conn)
        assert conflict.value.code == APPEND_CONDITION_FAILED
        assert store.append(DomainEvent(event_type="Kept"), conn=conn) == 2
        conn.commit()
    assert [e.event_type for e in store.get_events()] == ["Once", "Kept"]
    assert store.verify().ok


def test_a_lock_timeout_in_the_callers_transaction_undoes_that_append_alone(
    pg_dsn: str, store: EventStore
) -> None:
    store.append(DomainEvent(event_type="First"))
    with psycopg.connect(pg_dsn) as conn:
        conn.execute("CREATE TEMP TABLE work (note text)")
        conn.execute("INSERT INTO work VALUES ('kept')")
        conn.execute("SET lock_timeout = '100ms'")
        with store.transaction() as tx:  # another writer holds the head lock meanwhile
            tx.append(DomainEvent(event_type="Other"))
            with pytest.raises(EventStoreError) as info:
                store.append(DomainEvent(event_type="Waited"), conn=conn)
            assert info.value.code == STORAGE_ERROR
            assert info.value.context["sqlstate"] == "55P03"  # lock_not_available
        # The caller's transaction is still usable, its own work intact; the append, tried
        # again once the lock is free, commits with it.
        assert conn.execute("SELECT note FROM work").fetchall() == [("kept",)]
        assert store.append(DomainEvent(event_type="Waited"), conn=conn) == 3
        conn.commit()
    assert [e.event_type for e in store.get_events()] == ["First", "Other", "Waited"]
    assert store.verify().ok


def test_an_autocommit_connection_gets_a_transaction_of_its_own(
    pg_dsn: str, store: EventStore
) -> None:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        assert store.append_batch([DomainEvent(event_type="A")] * 1, conn=conn) == 1
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    assert store.head() == 1


def test_an_append_in_the_callers_transaction_rejects_bad_input(store: EventStore) -> None:
    with pytest.raises(EventStoreError) as info:
        store.append(DomainEvent(event_type="A"), conn="not a connection")  # type: ignore[arg-type]
    assert info.value.code == VALIDATION_FAILED
    assert info.value.context["field"] == "conn"
    assert store.head() == 0


# -- metrics -------------------------------------------------------------------------------------


def test_metrics_count_known_operations(make_store: Callable[..., EventStore]) -> None:
    # A cached result lives far longer than this test takes on any machine: the hit it counts
    # does not depend on how fast the queries ran.
    store = make_store(cache_ttl=3600)
    batches = [
        [DomainEvent(event_type="M", tags={"k": str(i)}) for i in range(2)] for _ in range(3)
    ]
    for batch in batches:
        store.append_batch(batch)
    expected_bytes = sum(
        len(_codec.prepare(batch, store.max_event_bytes).buffer) for batch in batches
    )
    condition = AppendCondition(Query([QueryItem(types=["M"])]), after=None)
    with pytest.raises(EventStoreError):
        store.append(DomainEvent(event_type="N"), condition)
    with pytest.raises(EventStoreError):
        store.append(batches[0][0])
    with pytest.raises(EventStoreError):
        store.append({"event_type": ""})
    store.get_events(EventFilter(event_types=["M"]))
    store.get_events(EventFilter(event_types=["M"]))
    store.count_events()
    metrics = store.metrics()
    appends = metrics["appends"]
    assert appends["events"] == 6
    assert appends["batches"] == 3
    assert appends["bytes"] == expected_bytes
    assert appends["conflicts"] == 1
    assert appends["duplicates"] == 1
    assert appends["errors"] == 1
    assert appends["latency"]["count"] == 6
    assert appends["latency"]["buckets"]["+Inf"] == 6
    assert metrics["queries"]["get_events"]["count"] == 2
    assert metrics["queries"]["count"]["count"] == 1
    assert metrics["cache"]["hits"] == 1
    assert metrics["cache"]["misses"] >= 2
    assert metrics["pool"]["size"] >= 1
    assert metrics["subscriptions"] == {"open": 0, "lag_positions": 0, "lag_seconds": 0.0}
    assert metrics["replicas"] == []


def test_metrics_show_a_subscriptions_lag(store: EventStore) -> None:
    store.append_batch([DomainEvent(event_type="L") for _ in range(5)])
    with store.subscribe(after=0, buffer=100) as subscription:
        deadline = time.monotonic() + 120  # a bound for a hang
        while store._listener is None or store._listener.seen < 5:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        lag = store.metrics()["subscriptions"]
        assert lag["open"] == 1
        assert lag["lag_positions"] == 5
        assert isinstance(lag["lag_seconds"], float)  # a measured delay: its size varies
        for _ in range(5):
            next(subscription)
        lag = store.metrics()["subscriptions"]
        assert lag["lag_positions"] == 0
        assert lag["lag_seconds"] == 0.0


def test_metrics_are_scraped_over_http_with_prometheus_client(
    make_store: Callable[..., EventStore],
) -> None:
    store = make_store()
    store.append_batch([DomainEvent(event_type="P") for _ in range(4)])
    store.append(DomainEvent(event_type="P"))
    store.get_events()
    server = LiveServer(create_app(store, token="metrics-token"))
    try:
        with httpx.Client(base_url=server.url, trust_env=False, timeout=10) as client:
            assert client.get("/metrics").status_code == 401
            response = client.get("/metrics", headers={"Authorization": "Bearer metrics-token"})
    finally:
        server.stop()
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(response.text)}
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in families.values()
        for s in family.samples
    }
    assert samples[("tamma_events_append_events_total", ())] == 5
    assert samples[("tamma_events_append_batches_total", ())] == 2
    assert samples[("tamma_events_append_latency_seconds_count", ())] == 2
    assert samples[("tamma_events_append_latency_seconds_bucket", (("le", "+Inf"),))] == 2
    assert samples[("tamma_events_query_latency_seconds_count", (("kind", "get_events"),))] == 1
    assert samples[("tamma_events_pool_size", ())] >= 1
    assert ("tamma_events_cache_misses_total", ()) in samples
    assert samples[("tamma_events_subscriptions", ())] == 0
    assert families["tamma_events_append_latency_seconds"].type == "histogram"


def test_two_stores_have_registries_of_their_own(make_store: Callable[..., EventStore]) -> None:
    from prometheus_client import generate_latest

    first, second = make_store(), make_store()
    first.append(DomainEvent(event_type="A"))
    assert b"tamma_events_append_events_total 1.0" in generate_latest(first.prometheus_registry)
    assert b"tamma_events_append_events_total 0.0" in generate_latest(second.prometheus_registry)


# -- secrets -------------------------------------------------------------------------------------


def test_no_dsn_password_in_repr_errors_or_logs(
    pg_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "pa55-word-" + uuid.uuid4().hex[:6]
    assert secret not in redact(f"postgresql://u:{secret}@localhost/db")
    assert "***" in redact(f"postgresql://u:{secret}@localhost/db")
    caplog.set_level(logging.DEBUG)
    with pytest.raises(EventStoreError) as info:
        EventStore(
            f"postgresql://nobody:{secret}@127.0.0.1:1/none?connect_timeout=1",
            connect_timeout=1,
        )
    assert secret not in str(info.value)
    assert secret not in repr(info.value.context)
    # A store whose DSN carries a password (the test server trusts, so any will do) and a
    # replica that is down: its warnings name the replica without the password.
    schema = f"t_{uuid.uuid4().hex[:12]}"
    store = EventStore(
        _dsn_with(pg_dsn, password=secret),
        schema=schema,
        replicas=[f"postgresql://postgres:{secret}@127.0.0.1:1/postgres?connect_timeout=1"],
        replica_timeout=0.2,
    )
    try:
        assert secret not in repr(store)
        store.append(DomainEvent(event_type="A"))
        assert store.count_events() == 1
        assert store.metrics()["replicas"][0]["up"] is False
        assert secret not in repr(store.metrics())
    finally:
        store.close()
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute(
                psycopg.sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(
                    psycopg.sql.Identifier(schema)
                )
            )
    assert "is unavailable" in caplog.text
    assert secret not in caplog.text


def test_concurrent_appends_count_every_event(make_store: Callable[..., EventStore]) -> None:
    store = make_store()

    def work() -> None:
        for _ in range(10):
            store.append(DomainEvent(event_type="T"))

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert store.metrics()["appends"]["events"] == 80
    assert store.head() == 80
