"""Durable consumers run by real processes (``tests/_consumer_worker.py``), killed with
SIGKILL, joined late, and fed a poison event: what their handlers wrote holds every matching
event, exactly once for a transactional handler, at least once with no gap for a plain one, in
order within each key."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from _cli_support import SCRIPT
from tamma_events import DomainEvent, EventStore

pytestmark = pytest.mark.codec_neutral

WORKER = Path(__file__).with_name("_consumer_worker.py")
DEADLINE = 180.0


def issue_events(count: int, start: int = 0) -> list[DomainEvent]:
    return [
        DomainEvent("IssueUpdated", {"n": n}, {"issueId": f"ISSUE-{n % 17}"})
        for n in range(start, start + count)
    ]


class Workers:
    """The worker processes a test started; all are gone when it ends."""

    def __init__(self, store: EventStore) -> None:
        self.store = store
        self.started: dict[str, subprocess.Popen[str]] = {}

    def start(self, worker: str, name: str, *options: str) -> subprocess.Popen[str]:
        process = subprocess.Popen(
            [
                sys.executable,
                str(WORKER),
                self.store.dsn,
                self.store.schema,
                name,
                worker,
                *options,
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert process.stdout is not None and process.stdout.readline() == "running\n"
        self.started[worker] = process
        return process

    def kill(self, worker: str) -> None:
        process = self.started[worker]
        process.send_signal(signal.SIGKILL)
        assert process.wait(DEADLINE) == -signal.SIGKILL

    def stop(self, worker: str) -> None:
        process = self.started[worker]
        process.send_signal(signal.SIGTERM)
        assert process.wait(DEADLINE) == 0

    def close(self) -> None:
        for process in self.started.values():
            if process.poll() is None:
                process.kill()
                process.wait()
            if process.stdout is not None:
                process.stdout.close()


@pytest.fixture
def workers(store: EventStore) -> Iterator[Workers]:
    with psycopg.connect(store.dsn, autocommit=True) as conn:
        conn.execute(
            sql.SQL(
                "CREATE TABLE {} (seq bigserial, position bigint NOT NULL, issue text, worker text)"
            ).format(sql.Identifier(store.schema, "projection"))
        )
        conn.execute(
            sql.SQL("CREATE TABLE {} (on_ boolean)").format(
                sql.Identifier(store.schema, "poison_switch")
            )
        )
    started = Workers(store)
    yield started
    started.close()


def rows(store: EventStore) -> list[tuple[int, str, str]]:
    """The projection's (position, issue, worker) rows, in the order they were written."""
    with psycopg.connect(store.dsn, autocommit=True) as conn:
        found = conn.execute(
            sql.SQL("SELECT position, issue, worker FROM {} ORDER BY seq").format(
                sql.Identifier(store.schema, "projection")
            )
        )
        return [(int(p), i, w) for p, i, w in found]


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def assert_in_order_per_issue(written: list[tuple[int, str, str]]) -> None:
    by_issue: dict[str, list[int]] = {}
    for position, issue, _ in written:
        by_issue.setdefault(issue, []).append(position)
    for issue, positions in by_issue.items():
        assert positions == sorted(positions), issue


@pytest.mark.parametrize("mode", ["tx", "plain"])
def test_a_worker_killed_mid_batch_and_restarted_misses_nothing(
    store: EventStore, workers: Workers, mode: str
) -> None:
    total = 1_500
    store.append_batch(issue_events(total))
    options = ["--mode", mode, "--batch", "25", "--pause", "0.01", "--lease", "1"]
    first = workers.start("first", "projection", *options, "--stall-at", "290")
    assert first.stdout is not None and first.stdout.readline() == "stalled\n"
    workers.kill("first")  # in the batch of positions 276-300, having written 276-290
    partial = {p for p, _, _ in rows(store)}
    # Committed: the batches before (transactional), or every row written (plain).
    assert partial == set(range(1, 276 if mode == "tx" else 291))
    workers.start("second", "projection", *options)
    wait_until(lambda: len({p for p, _, _ in rows(store)}) == total, "every event")
    workers.stop("second")
    written = rows(store)
    assert sorted({p for p, _, _ in written}) == list(range(1, total + 1))
    if mode == "tx":
        # Exactly once, in log order: the killed batch rolled back with its checkpoint.
        assert [p for p, _, _ in written] == list(range(1, total + 1))
    else:
        # At least once: the batch the kill interrupted is written again, nothing is skipped.
        assert len(written) >= total
        assert next(p for p, _, w in written if w == "second") <= max(partial) + 1
    (state,) = store.consumers("projection")
    assert [p.position for p in state.partitions] == [total]


def test_three_workers_one_killed_one_joining_share_every_event_once(
    store: EventStore, workers: Workers
) -> None:
    store.append_batch(issue_events(2_000))
    options = ["--partition-by", "issueId", "--partitions", "8", "--batch", "20"]
    options += ["--pause", "0.01", "--lease", "1"]
    workers.start("w1", "shared", *options)
    workers.start("w2", "shared", *options)
    wait_until(lambda: len(rows(store)) >= 400, "the first two workers to get going")
    workers.kill("w1")
    workers.start("w3", "shared", *options)

    def holders() -> set[str]:
        (state,) = store.consumers("shared")
        return {p.owner for p in state.partitions if p.owner is not None}

    wait_until(lambda: holders() == {"w2", "w3"}, "w3 to take its share of w1's partitions")
    store.append_batch(issue_events(2_000, 2_000))
    wait_until(lambda: len({p for p, _, _ in rows(store)}) == 4_000, "every event")
    workers.stop("w2")
    workers.stop("w3")
    written = rows(store)
    assert sorted(p for p, _, _ in written) == list(range(1, 4_001))  # each once
    assert {w for _, _, w in written} == {"w1", "w2", "w3"}
    assert_in_order_per_issue(written)


def test_a_poison_event_is_parked_while_the_rest_flows_then_replayed(
    store: EventStore, workers: Workers
) -> None:
    store.append_batch(issue_events(400))
    with psycopg.connect(store.dsn, autocommit=True) as conn:
        conn.execute(
            sql.SQL("INSERT INTO {} VALUES (true)").format(
                sql.Identifier(store.schema, "poison_switch")
            )
        )
    workers.start("w", "poisoned", "--poison", "123", "--batch", "50")
    wait_until(lambda: len(rows(store)) == 399, "every other event")
    assert 123 not in {p for p, _, _ in rows(store)}
    (parked,) = store.parked_events("poisoned")
    assert (parked.position, parked.attempts) == (123, 2)
    assert parked.error == "ValueError: event 123 is poison"
    with psycopg.connect(store.dsn, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DELETE FROM {}").format(sql.Identifier(store.schema, "poison_switch"))
        )
    env = {**os.environ, "TAMMA_EVENTS_DSN": store.dsn, "TAMMA_EVENTS_SCHEMA": store.schema}
    replay = subprocess.run(
        [str(SCRIPT), "consumers", "replay", "poisoned"],
        env=env,
        capture_output=True,
        text=True,
        timeout=DEADLINE,
    )
    assert replay.returncode == 0, replay.stderr
    assert "replay asked for 1 parked event" in replay.stdout
    wait_until(lambda: store.parked_events("poisoned") == [], "the replay")
    workers.stop("w")
    written = rows(store)
    assert sorted(p for p, _, _ in written) == list(range(1, 401))
    assert written[-1][0] == 123
