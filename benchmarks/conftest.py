"""Fixtures for the pytest-benchmark suites: a real server and one generated workload.

Run with ``pytest benchmarks`` (they are not part of the test run). The server is the one at
TAMMA_EVENTS_TEST_DSN, or an embedded one started for the session.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tamma_events import DomainEvent, EventStore, embedded
from tamma_events.ops.migrating import drop
from tamma_events.tools.bench import load_query_store
from tamma_events.tools.workload import generate_events

EVENTS = int(os.environ.get("TAMMA_EVENTS_BENCH_EVENTS", "50000"))
BATCH = 10_000
#: Events in the store the query and stream benchmarks read (loading takes minutes at 1M).
QUERY_EVENTS = int(os.environ.get("TAMMA_EVENTS_BENCH_QUERY_EVENTS", "1000000"))
#: Single appends timed per measure (conditional appends; per thread: a third of it).
SINGLE = int(os.environ.get("TAMMA_EVENTS_BENCH_SINGLE", "900"))
#: Keep that store's schema (bench_q_<events>) for the next run.
KEEP = os.environ.get("TAMMA_EVENTS_BENCH_KEEP") == "1"


@pytest.fixture(scope="session")
def dsn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    configured = os.environ.get("TAMMA_EVENTS_TEST_DSN")
    if configured:
        yield configured
        return
    server = embedded.start(tmp_path_factory.mktemp("pg") / "data", cleanup="delete")
    yield server.dsn
    server.stop()


@pytest.fixture(scope="session")
def workload() -> list[DomainEvent]:
    return list(generate_events(EVENTS))


@pytest.fixture(scope="session")
def loaded(dsn: str) -> Iterator[EventStore]:
    """A store holding ``QUERY_EVENTS`` generated events, vacuumed and analysed."""
    schema = f"bench_q_{QUERY_EVENTS}"
    store = load_query_store(dsn, schema, QUERY_EVENTS)
    yield store
    store.close()
    if not KEEP:
        drop(dsn, schema)


@pytest.fixture
def schema(dsn: str) -> Iterator[str]:
    name = f"bench_{uuid.uuid4().hex[:10]}"
    yield name
    drop(dsn, name)


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    """Each figure with its same-run baseline and their ratio (kept in ``extra_info``)."""
    session = getattr(config, "_benchmarksession", None)
    if session is None or not session.benchmarks:
        return
    terminalreporter.section("ratios against baselines from this run")
    for bench in session.benchmarks:
        info = ", ".join(
            f"{key}={value:,.2f}" if isinstance(value, float) else f"{key}={value}"
            for key, value in bench.extra_info.items()
        )
        terminalreporter.write_line(f"{bench.name}: {info}")
