"""The ``tamma-events`` command line, run in-process against the real test server."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families
from psycopg import sql

from _figures import is_figure
from tamma_events import DomainEvent, EventStore
from tamma_events.cli import main
from tamma_events.ops.migrating import drop
from tamma_events.sql.schema import migrations

#: The bench suites time the native and the pure-Python codec side by side whatever codec the
#: run forces: they run once, in the native pass (as tests/test_benchmarks.py).
BENCH = pytest.mark.codec_neutral


@pytest.fixture
def schema(pg_dsn: str) -> Iterator[str]:
    name = f"cli_{uuid.uuid4().hex[:10]}"
    yield name
    drop(pg_dsn, name)


def run(pg_dsn: str, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["--dsn", pg_dsn, *args], catch_exceptions=False)
    return result.exit_code, result.output


def test_init_is_idempotent(pg_dsn: str, schema: str) -> None:
    code, out = run(pg_dsn, "--schema", schema, "init")
    assert code == 0 and f"migrated to version {migrations()[-1].version}" in out
    code, out = run(pg_dsn, "--schema", schema, "init")
    assert code == 0 and "up to date" in out


def test_demo_appends_shows_a_conflict_and_reads_back(pg_dsn: str, schema: str) -> None:
    code, out = run(pg_dsn, "demo", "--events", "3000", "--batch-size", "1000", "--schema", schema)
    assert code == 0, out
    assert "appended 3,000 events" in out
    assert "APPEND_CONDITION_FAILED" in out
    assert "events/s" in out
    with EventStore(pg_dsn, schema=schema, migrate=False) as store:
        # 3000 generated, then agent B's assignment and agent A's second decision
        assert store.head() == 3002
        assert store.verify().ok


def test_verify_exits_1_on_a_broken_chain(pg_dsn: str, schema: str) -> None:
    run(pg_dsn, "demo", "--events", "500", "--batch-size", "250", "--schema", schema)
    code, out = run(pg_dsn, "--schema", schema, "verify")
    assert code == 0 and "502 events verified" in out
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("SET session_replication_role = replica")
        conn.execute(
            sql.SQL("UPDATE {} SET data = '{{}}' WHERE position = 321").format(
                sql.Identifier(schema, "events")
            )
        )
    code, out = run(pg_dsn, "--schema", schema, "verify")
    assert code == 1
    assert "broken at position 321" in out


@BENCH
def test_bench_reports_ratios_against_its_baselines(pg_dsn: str, tmp_path: object) -> None:
    code, out = run(
        pg_dsn,
        "bench",
        "--events",
        "4000",
        "--batch-size",
        "1000",
        "--rounds",
        "1",
        "--conditional",
        "40",
        "--threads",
        "4",
        "--per-thread",
        "10",
        "--json",
        "-",
    )
    assert code == 0, out
    summary = json.loads(out[out.index("{") :])
    results = {r["name"]: r for r in summary["results"]}
    assert set(results) >= {
        "append_batch",
        "copy_ceiling",
        "encode.python",
        "append.conditional",
        "append.threads",
        "append_batch.chain",
        "summaries.fold",
        "verify",
        "commit_floor",
    }
    assert results["append.conditional"]["baseline"] == "commit_floor"
    ceiling = results["copy_ceiling"]["value"]
    assert results["append_batch"]["ratio"] == pytest.approx(
        results["append_batch"]["value"] / ceiling
    )
    assert all(is_figure(r["value"]) for r in results.values())


def test_usage_error_exits_2(pg_dsn: str) -> None:
    code, _ = run(pg_dsn, "demo", "--events", "0")
    assert code == 2


@BENCH
def test_bench_stream_suite_reports_latency_and_throughput(pg_dsn: str) -> None:
    code, out = run(
        pg_dsn,
        "bench",
        "--suite",
        "stream",
        "--events",
        "3000",
        "--rate",
        "2000",
        "--seconds",
        "2",
        "--json",
        "-",
    )
    assert code == 0, out
    results = {r["name"]: r for r in json.loads(out[out.index("{") :])["results"]}
    assert set(results) == {"subscribe.latency_p99", "stream_events"}
    latency = results["subscribe.latency_p99"]
    assert isinstance(latency["detail"]["received"], int)
    assert latency["value"] == pytest.approx(latency["detail"]["p99_ms"], abs=1e-3)
    # Two order statistics of one sample, whatever the machine.
    assert latency["detail"]["p50_ms"] <= latency["detail"]["p99_ms"]
    assert isinstance(latency["detail"]["listen_notify"]["received"], int)
    assert results["stream_events"]["detail"]["events"] == 3000
    assert results["stream_events"]["ratio"] == pytest.approx(
        results["stream_events"]["value"]
        / results["stream_events"]["detail"]["cursor_events_per_s"],
        rel=1e-6,
    )
    assert all(is_figure(r["value"]) for r in results.values())


def _append_tailed(pg_dsn: str, schema: str) -> None:
    with EventStore(pg_dsn, schema=schema) as store:
        store.append_batch(
            [
                DomainEvent(kind, {"n": n}, {"issueId": f"I-{n % 2}"})
                for n, kind in enumerate(["A", "B", "A", "C", "A", "B"])
            ]
        )


def test_tail_prints_json_lines_after_a_position(pg_dsn: str, schema: str) -> None:
    _append_tailed(pg_dsn, schema)
    code, out = run(pg_dsn, "--schema", schema, "tail", "--after", "2", "--count", "3")
    assert code == 0, out
    lines = [json.loads(line) for line in out.splitlines()]
    assert [(e["position"], e["event_type"]) for e in lines] == [(3, "A"), (4, "C"), (5, "A")]
    assert lines[0]["data"] == {"n": 2} and lines[0]["tags"] == {"issueId": "I-0"}


def test_tail_filters(pg_dsn: str, schema: str) -> None:
    _append_tailed(pg_dsn, schema)
    code, out = run(
        pg_dsn, "--schema", schema, "tail", "--after", "0", "--count", "2",
        "--type", "A", "--type", "B", "--issue-id", "I-1",
    )  # fmt: skip
    assert code == 0, out
    assert [json.loads(line)["position"] for line in out.splitlines()] == [2, 6]
    code, out = run(
        pg_dsn, "--schema", schema, "tail", "--after", "0", "--count", "1", "--tag", "issueId:I-0"
    )
    assert code == 0, out
    assert [json.loads(line)["position"] for line in out.splitlines()] == [1]


def test_tail_follows_new_events(pg_dsn: str, schema: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _append_tailed(pg_dsn, schema)
    subscribed = threading.Event()
    subscribe = EventStore.subscribe

    def signalling(self: EventStore, *args: Any, **kwargs: Any) -> Any:
        subscription = subscribe(self, *args, **kwargs)
        subscribed.set()
        return subscription

    monkeypatch.setattr(EventStore, "subscribe", signalling)

    def append_once_tailing() -> None:
        # The new events are appended once tail follows the log, however long it took to
        # start; a bound for a hang only.
        if subscribed.wait(180):
            _append_tailed(pg_dsn, schema)

    appender = threading.Thread(target=append_once_tailing)
    appender.start()
    try:
        # Without --after it starts at the head: only the events appended later are printed.
        code, out = run(pg_dsn, "--schema", schema, "tail", "--count", "6")
    finally:
        subscribed.set()
        appender.join()
    assert code == 0, out
    assert [json.loads(line)["position"] for line in out.splitlines()] == list(range(7, 13))


def test_tail_rejects_a_malformed_tag(pg_dsn: str, schema: str) -> None:
    code, out = run(pg_dsn, "--schema", schema, "tail", "--tag", "no-colon")
    assert code == 2  # a usage error, reported before the server is reached
    assert "Invalid value for '--tag'" in out and "key:value" in out


def test_serve_runs_the_http_app(pg_dsn: str, schema: str, tmp_path: Path) -> None:
    _append_tailed(pg_dsn, schema)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "tamma_events", "--dsn", pg_dsn, "--schema", schema]
    with (tmp_path / "serve.log").open("w") as log:
        server = subprocess.Popen(
            [*command, "serve", "--port", str(port), "--log-level", "warning"],
            env={**os.environ, "TAMMA_EVENTS_TOKEN": "sesame"},
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180  # a bound for a hang, for a busy machine
        while True:
            try:
                health = httpx.get(f"{base}/health", timeout=10)
                break
            except httpx.TransportError:
                assert server.poll() is None, (tmp_path / "serve.log").read_text()
                assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
                time.sleep(0.1)
        assert health.json() == {"status": "ok", "head": 6, "subscriptions": 0, "consumers": []}
        assert httpx.get(f"{base}/events", timeout=30).status_code == 401
        page = httpx.get(
            f"{base}/events",
            params={"type": "C"},
            headers={"Authorization": "Bearer sesame"},
            timeout=30,
        )
        assert page.status_code == 200
        assert [e["position"] for e in page.json()["events"]] == [4]
        # Prometheus metrics, behind the same token, parsed with prometheus-client's parser.
        assert httpx.get(f"{base}/metrics", timeout=30).status_code == 401
        scraped = httpx.get(
            f"{base}/metrics", headers={"Authorization": "Bearer sesame"}, timeout=30
        )
        assert scraped.status_code == 200
        samples = {
            sample.name: sample.value
            for family in text_string_to_metric_families(scraped.text)
            for sample in family.samples
            if not sample.labels
        }
        assert samples["tamma_events_pool_size"] >= 1
        assert samples["tamma_events_append_events_total"] == 0  # this process appended none
        assert samples["tamma_events_subscriptions"] == 0
    finally:
        server.send_signal(signal.SIGINT)
        assert server.wait(180) == 0, (tmp_path / "serve.log").read_text()


@BENCH
def test_bench_export_suite_reports_adbc_ratio_and_compaction(pg_dsn: str) -> None:
    code, out = run(pg_dsn, "bench", "--suite", "export", "--events", "3000", "--json", "-")
    assert code == 0, out
    results = {r["name"]: r for r in json.loads(out[out.index("{") :])["results"]}
    assert set(results) == {"export_arrow", "compact_events"}
    export = results["export_arrow"]
    assert export["detail"]["events"] == 3000
    assert export["ratio"] == pytest.approx(
        export["value"] / export["detail"]["adbc_events_per_s"], rel=1e-6
    )
    compaction = results["compact_events"]["detail"]
    assert compaction["events"] > 0
    assert compaction["table_mb_after_vacuum_full"] < compaction["table_mb_before"]


@BENCH
def test_bench_replicas_suite_compares_a_replica_with_the_primary_alone(pg_dsn: str) -> None:
    code, out = run(
        pg_dsn, "bench", "--suite", "replicas", "--events", "2000", "--seconds", "1", "--json", "-"
    )
    assert code == 0, out
    results = {r["name"]: r for r in json.loads(out[out.index("{") :])["results"]}
    alone = results["reads, primary alone"]
    assert is_figure(alone["value"])
    for name in ("reads, one replica (read your writes)", "reads, one replica (eventual)"):
        replica = results[name]
        assert replica["baseline"] == "primary_alone"
        assert replica["ratio"] == pytest.approx(replica["value"] / alone["value"], rel=1e-2)
        # How many reads the replica served depends on how fast it replays on this machine
        # (tests/test_replicas.py shows reads going to it); every read was served somewhere.
        assert isinstance(replica["detail"]["replica_reads"], int)
        assert (
            replica["detail"]["replica_reads"] + replica["detail"]["fallbacks"]
            >= (replica["detail"]["queries"])
        )


def test_export_writes_parquet_arrow_and_jsonl(pg_dsn: str, schema: str, tmp_path: Path) -> None:
    import pyarrow.ipc
    import pyarrow.parquet as pq

    with EventStore(pg_dsn, schema=schema) as store:
        store.append_batch(
            [DomainEvent("IssueCreated", {"n": n}, {"issueId": f"I-{n % 3}"}) for n in range(30)]
        )
        wanted = [e.position for e in store.get_events() if e.tags["issueId"] == "I-1"]
    parquet = tmp_path / "out.parquet"
    code, out = run(
        pg_dsn,
        "--schema",
        schema,
        "export",
        "--format",
        "parquet",
        "-o",
        str(parquet),
        "--issue-id",
        "I-1",
    )
    assert code == 0, out
    assert "exported 10 events" in out
    assert pq.read_table(parquet).column("position").to_pylist() == wanted
    arrow_file = tmp_path / "out.arrow"
    code, out = run(
        pg_dsn, "--schema", schema, "export", "--format", "arrow", "-o", str(arrow_file)
    )
    assert code == 0, out
    with pyarrow.ipc.open_file(arrow_file) as reader:
        assert reader.read_all().num_rows == 30
    code, out = run(
        pg_dsn, "--schema", schema, "export", "--format", "jsonl", "--tag", "issueId:I-2"
    )
    assert code == 0, out
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [line["tags"]["issueId"] for line in lines] == ["I-2"] * 10
    code, out = run(pg_dsn, "--schema", schema, "export", "--format", "parquet")
    assert code == 2 and "--output is required" in out


def test_compact_archives_and_reports_bad_times(pg_dsn: str, schema: str, tmp_path: Path) -> None:
    with EventStore(pg_dsn, schema=schema) as store:
        store.append_batch([DomainEvent("IssueCreated", {"n": n}) for n in range(20)])
        everything = store.get_events()
    code, out = run(
        pg_dsn,
        "--schema",
        schema,
        "compact",
        "--before",
        "2999-01-01T00:00:00Z",
        "--archive-dir",
        str(tmp_path),
        "--file-events",
        "7",
    )
    assert code == 0, out
    assert "compacted 20 events" in out
    assert len(list(tmp_path.glob("events-*.parquet"))) == 3
    with EventStore(pg_dsn, schema=schema) as store:
        assert store.get_events() == []
        assert store.get_events(include_archived=True) == everything
    code, out = run(pg_dsn, "--schema", schema, "verify")
    assert code == 0 and "20 events verified" in out
    code, out = run(pg_dsn, "--schema", schema, "compact", "--before", "yesterday")
    assert code == 2 and "Invalid value for '--before'" in out


def test_consumers_commands(pg_dsn: str, schema: str) -> None:
    """`consumers list | lag | parked | replay | reset | drop` on a consumer with a parked
    event; JSON where asked; a missing consumer or event exits 1 with CONSUMER_CONFLICT."""
    with EventStore(pg_dsn, schema=schema) as store:
        store.append_batch(
            [DomainEvent("E", {"n": n}, {"issueId": f"I-{n % 3}"}) for n in range(30)]
        )

        def handler(events: list[Any]) -> None:
            if any(e.position == 7 for e in events):
                raise ValueError("cannot take 7")

        store.consumer("board", partition_by="issueId", partitions=2, max_attempts=1).run(
            handler, until_idle=True
        )
    code, out = run(pg_dsn, "--schema", schema, "consumers", "list")
    assert code == 0 and "board" in out and "issueId" in out, out
    code, out = run(pg_dsn, "--schema", schema, "consumers", "list", "--json")
    (listed,) = json.loads(out)
    assert (listed["name"], len(listed["partitions"]), listed["parked"]) == ("board", 2, 1)
    code, out = run(pg_dsn, "--schema", schema, "consumers", "lag", "board", "--json")
    (state,) = json.loads(out)
    assert [p["position"] for p in state["partitions"]] == [30, 30]
    assert [p["lag_positions"] for p in state["partitions"]] == [0, 0]
    code, out = run(pg_dsn, "--schema", schema, "consumers", "parked", "board")
    assert code == 0 and "cannot take 7" in out, out
    code, out = run(pg_dsn, "--schema", schema, "consumers", "parked", "board", "--json")
    assert [(p["position"], p["error"]) for p in json.loads(out)] == [
        (7, "ValueError: cannot take 7")
    ]
    code, out = run(pg_dsn, "--schema", schema, "consumers", "replay", "board")
    assert code == 0 and "replay asked for 1 parked event" in out, out
    code, out = run(pg_dsn, "--schema", schema, "consumers", "replay", "board", "--position", "8")
    assert code == 1 and "CONSUMER_CONFLICT" in out and "8" in out, out
    code, out = run(pg_dsn, "--schema", schema, "consumers", "reset", "board", "--to", "5")
    assert code == 0 and "2 partitions reset to position 5" in out, out
    code, out = run(pg_dsn, "--schema", schema, "consumers", "lag", "board", "--json")
    assert [p["lag_positions"] for p in json.loads(out)[0]["partitions"]] == [25, 25]
    code, out = run(pg_dsn, "--schema", schema, "consumers", "lag", "nobody")
    assert code == 1 and "no consumer is named 'nobody'" in out, out
    code, out = run(pg_dsn, "--schema", schema, "consumers", "drop", "board")
    assert code == 0 and "consumer board dropped (2 partitions)" in out, out
    code, out = run(pg_dsn, "--schema", schema, "consumers", "list")
    assert code == 0 and "no consumers" in out, out
    code, out = run(pg_dsn, "--schema", schema, "consumers", "reset", "board", "--to", "0")
    assert code == 1 and "CONSUMER_CONFLICT" in out, out
