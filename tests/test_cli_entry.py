"""Every ``tamma-events`` command through the real entry point: the console script pip
installed, run as a subprocess, on the embedded server (one the command starts itself, or the
test session's). The in-process tests (test_cli.py, test_cli_append.py) go into each command's
details; these check what a shell sees: output, files and exit codes (0 success, 1 failure,
2 usage error), and that ``TAMMA_EVENTS_DSN``/``TAMMA_EVENTS_SCHEMA`` are honoured."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pyarrow.parquet as pq
import pytest

from _cli_support import SCRIPT, cli, free_port
from tamma_events import DomainEvent, EventStore
from tamma_events.cli import main
from tamma_events.ops.migrating import drop

pytestmark = pytest.mark.codec_neutral


#: The commands each test below runs: `test_every_command_has_an_entry_point_test` keeps this
#: in step with the CLI.
COVERED = {
    "init",
    "demo",
    "bench",
    "append",
    "query",
    "tail",
    "export",
    "compact",
    "verify",
    "serve",
    "stats",
    "torture",
    "embedded start",
    "embedded stop",
    "embedded status",
    "consumers list",
    "consumers lag",
    "consumers parked",
    "consumers replay",
    "consumers reset",
    "consumers drop",
}


@pytest.fixture
def schema(pg_dsn: str) -> Iterator[str]:
    name = f"entry_{uuid.uuid4().hex[:10]}"
    yield name
    drop(pg_dsn, name)


@pytest.fixture
def env(pg_dsn: str, schema: str) -> dict[str, str]:
    """The server and the store given by environment variables only."""
    return {
        **os.environ,
        "TAMMA_EVENTS_DSN": pg_dsn,
        "TAMMA_EVENTS_SCHEMA": schema,
        "COLUMNS": "200",
    }


def events_file(path: Path, count: int) -> Path:
    lines = [
        json.dumps(
            {
                "event_type": "IssueCreated" if i % 2 else "CiRunCompleted",
                "data": {"n": i},
                "tags": {"issueId": f"I-{i % 3}"},
            }
        )
        for i in range(count)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_every_command_has_an_entry_point_test() -> None:
    commands = set()
    for name, command in main.commands.items():
        sub = getattr(command, "commands", None)
        commands |= {f"{name} {s}" for s in sub} if sub else {name}
    assert commands == COVERED


def test_embedded_start_status_stop_and_init_on_the_embedded_default(tmp_path: Path) -> None:
    """No DSN anywhere: the commands start (and stop) the embedded server of --data-dir."""
    env = {k: v for k, v in os.environ.items() if k not in ("TAMMA_EVENTS_DSN", "PGHOST")}
    data = ["--data-dir", str(tmp_path / "pg")]
    status = cli(*data, "embedded", "status", env=env)
    assert status.returncode == 1 and "not running" in status.stdout, status
    started = cli(*data, "embedded", "start", env=env)
    try:
        assert started.returncode == 0, started
        dsn = started.stdout.split("TAMMA_EVENTS_DSN='", 1)[1].split("'", 1)[0]
        init = cli(*data, "--schema", "entry", "init", env=env)
        assert init.returncode == 0 and "migrated to version" in init.stdout, init
        # init's process has exited: the server started by `embedded start` still runs.
        status = cli(*data, "embedded", "status", env=env)
        assert status.returncode == 0 and dsn in status.stdout, status
        again = cli("--dsn", dsn, "--schema", "entry", "init", env=env)
        assert again.returncode == 0 and "up to date" in again.stdout, again
    finally:
        stopped = cli(*data, "embedded", "stop", env=env)
    assert stopped.returncode == 0 and "stopped the server" in stopped.stdout, stopped
    status = cli(*data, "embedded", "status", env=env)
    assert status.returncode == 1 and "not running" in status.stdout, status
    assert cli(*data, "embedded", "stop", env=env).stdout.startswith("no server runs")


def test_append_query_stats_verify(env: dict[str, str], schema: str, tmp_path: Path) -> None:
    appended = cli("append", str(events_file(tmp_path / "events.jsonl", 30)), env=env)
    assert appended.returncode == 0 and "appended 30 events" in appended.stdout, appended

    lines = cli("query", "--type", "IssueCreated", "--issue-id", "I-1", env=env)
    assert lines.returncode == 0, lines
    found = [json.loads(line) for line in lines.stdout.splitlines()]
    assert [e["data"]["n"] for e in found] == [1, 7, 13, 19, 25]
    assert {e["event_type"] for e in found} == {"IssueCreated"}

    newest = cli("query", "--order-by", "position", "--direction", "desc", "--limit", "2", env=env)
    assert [json.loads(line)["position"] for line in newest.stdout.splitlines()] == [30, 29]

    table = cli("query", "--format", "table", "--limit", "3", "--tag", "issueId:I-2", env=env)
    assert table.returncode == 0, table
    assert "rows 1 to 3 of the matching live events (10 in the whole history)" in table.stdout
    assert "--offset 3 for the next" in table.stdout
    assert "issueId=I-2" in table.stdout and "position" in table.stdout

    bad = cli("query", "--tag", "no-colon", env=env)
    assert bad.returncode == 2 and "Invalid value for '--tag'" in bad.stderr, bad
    assert cli("query", "--order-by", "size", env=env).returncode == 2

    stats = cli("stats", "--json", env=env)
    assert stats.returncode == 0, stats
    figures = json.loads(stats.stdout)
    assert figures["schema"] == schema
    assert (figures["events"], figures["live_events"], figures["archived_events"]) == (30, 30, 0)
    assert {t["event_type"]: t["count"] for t in figures["event_types"]} == {
        "IssueCreated": 15,
        "CiRunCompleted": 15,
    }
    shown = cli("stats", env=env)
    assert shown.returncode == 0 and "IssueCreated" in shown.stdout, shown

    verified = cli("verify", env=env)
    assert verified.returncode == 0 and "30 events verified" in verified.stdout, verified


def test_reading_commands_refuse_a_schema_that_holds_no_store(
    env: dict[str, str], pg_dsn: str, schema: str
) -> None:
    """A mistyped --schema is an error for the commands that only read, and creates nothing."""
    for command in (["query"], ["stats"], ["verify"], ["export", "--format", "jsonl"]):
        result = cli(*command, env=env)
        assert result.returncode == 1, result
        assert "STORAGE_ERROR" in result.stderr and "holds no event store" in result.stderr
    with psycopg.connect(pg_dsn) as conn:
        found = conn.execute(
            "SELECT count(*) FROM pg_namespace WHERE nspname = %s", [schema]
        ).fetchone()
    assert found == (0,)


def test_query_table_shows_event_strings_as_they_are(env: dict[str, str]) -> None:
    """Brackets in an event's data or tags are text, never rich markup."""
    line = json.dumps(
        {"event_type": "NoteAdded", "data": {"note": "[red]x[/red]"}, "tags": {"k": "[b]v"}}
    )
    assert cli("append", stdin=line.encode() + b"\n", env=env).returncode == 0
    table = cli("query", "--format", "table", env=env)
    assert table.returncode == 0, table
    assert '"[red]x[/red]"' in table.stdout and "k=[b]v" in table.stdout
    assert "rows 1 to 1 of the matching live events (1 in the whole history)" in table.stdout
    assert "--offset" not in table.stdout  # no next page


def test_export_compact_and_archived_reads(
    env: dict[str, str], pg_dsn: str, schema: str, tmp_path: Path
) -> None:
    assert cli("append", str(events_file(tmp_path / "e.jsonl", 20)), env=env).returncode == 0
    parquet = tmp_path / "out.parquet"
    exported = cli("export", "--type", "CiRunCompleted", "-o", str(parquet), env=env)
    assert exported.returncode == 0 and "exported 10 events" in exported.stderr, exported
    table = pq.read_table(parquet)
    assert table.num_rows == 10
    assert table.column("position").to_pylist() == list(range(1, 21, 2))

    before = (datetime.now(timezone.utc) + timedelta(seconds=1)).isoformat()
    time.sleep(1)  # every event is recorded before `before`
    archive = tmp_path / "archives"
    compacted = cli("compact", "--before", before, "--archive-dir", str(archive), env=env)
    assert compacted.returncode == 0 and "compacted 20 events" in compacted.stdout, compacted
    assert list(archive.rglob("*.parquet"))

    live = cli("query", env=env)
    assert live.returncode == 0 and live.stdout == ""
    every = cli("query", "--include-archived", env=env)
    assert len(every.stdout.splitlines()) == 20
    page = cli("query", "--include-archived", "--format", "table", "--limit", "15", env=env)
    assert "rows 1 to 15 of 20 matching events; --offset 15 for the next" in page.stdout, page
    last = cli(
        "query",
        "--include-archived",
        "--format",
        "table",
        "--limit",
        "5",
        "--offset",
        "15",
        env=env,
    )
    assert "rows 16 to 20 of 20 matching events" in last.stdout and "--offset" not in last.stdout
    none_live = cli("query", "--format", "table", "--limit", "5", env=env)
    assert "no rows of the matching live events (20 in the whole history)" in none_live.stdout
    assert "--offset" not in none_live.stdout
    figures = json.loads(cli("stats", "--json", env=env).stdout)
    assert (figures["live_events"], figures["archived_events"], figures["archive_files"]) == (
        0,
        20,
        1,
    )
    assert cli("verify", env=env).returncode == 0
    bad = cli("compact", "--before", "yesterday", "--archive-dir", str(archive), env=env)
    assert bad.returncode == 2 and "Invalid value for '--before'" in bad.stderr, bad


def test_tail_and_a_broken_chain(env: dict[str, str], pg_dsn: str, schema: str) -> None:
    with EventStore(pg_dsn, schema=schema, max_connections=1) as store:
        store.append_batch([{"event_type": t, "tags": {"k": "v"}} for t in "ABCAB"])
    tailed = cli("tail", "--after", "1", "--type", "A", "--type", "B", "--count", "3", env=env)
    assert tailed.returncode == 0, tailed
    assert [json.loads(line)["position"] for line in tailed.stdout.splitlines()] == [2, 4, 5]


def test_demo_and_usage_errors(env: dict[str, str], pg_dsn: str, tmp_path: Path) -> None:
    demo_schema = f"entry_demo_{uuid.uuid4().hex[:8]}"
    try:
        demo = cli(
            "demo", "--events", "2000", "--batch-size", "500", "--schema", demo_schema, env=env
        )
        assert demo.returncode == 0, demo
        assert "appended 2,000 events" in demo.stdout and "APPEND_CONDITION_FAILED" in demo.stdout
    finally:
        drop(pg_dsn, demo_schema)
    assert cli("no-such-command", env=env).returncode == 2
    assert cli("demo", "--events", "0", env=env).returncode == 2
    assert cli("append", str(tmp_path / "missing.jsonl"), env=env).returncode == 2
    version = cli("--version", env=env)
    assert version.returncode == 0 and "tamma-events" in version.stdout
    module = subprocess.run(
        [sys.executable, "-m", "tamma_events", "--help"], capture_output=True, text=True, env=env
    )
    assert module.returncode == 0 and "embedded" in module.stdout


def test_bench_prints_ratios_against_a_baseline_of_the_same_run(env: dict[str, str]) -> None:
    args = ["bench", "--events", "2000", "--batch-size", "1000", "--rounds", "1"]
    args += ["--conditional", "20", "--threads", "2", "--per-thread", "5", "--json", "-"]
    bench = cli(*args, env=env)
    assert bench.returncode == 0, bench
    summary = json.loads(bench.stdout[bench.stdout.index("{") :])
    results = {r["name"]: r for r in summary["results"]}
    assert results["append_batch"]["baseline"] == "copy_ceiling"
    assert results["append_batch"]["ratio"] == pytest.approx(
        results["append_batch"]["value"] / results["copy_ceiling"]["value"], rel=1e-6
    )


def test_torture_finds_no_violation(env: dict[str, str], tmp_path: Path) -> None:
    report = tmp_path / "torture.json"
    args = ["torture", "consistency", "--seconds", "1", "--workers", "2", "--processes", "1"]
    run = cli(*args, "--seed", "7", "--json", str(report), env=env)
    assert run.returncode == 0 and "no violations" in run.stdout, run
    assert json.loads(report.read_text())["violations"] == []


def test_serve_answers_until_interrupted(env: dict[str, str], tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "serve.log"
    with log.open("w") as sink:
        server = subprocess.Popen(
            [str(SCRIPT), "serve", "--port", str(port), "--log-level", "warning"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=sink,
        )
    try:
        deadline = time.monotonic() + 180  # a bound for a hang, for a busy machine
        while True:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=10)
                break
            except httpx.TransportError:
                assert server.poll() is None, log.read_text()
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.1)
        assert health.status_code == 200 and health.json()["head"] == 0
    finally:
        server.send_signal(signal.SIGINT)
        assert server.wait(180) == 0, log.read_text()


def test_consumers_commands_through_the_console_script(env: dict[str, str], schema: str) -> None:
    """The consumers' commands as a shell runs them; a refusal exits 1 with its code."""
    dsn = env["TAMMA_EVENTS_DSN"]
    with EventStore(dsn, schema=schema) as store:
        store.append_batch([DomainEvent("E", {"n": n}) for n in range(5)])

        def handler(events: list[Any]) -> None:
            if events[0].position == 2:
                raise ValueError("two")

        store.consumer("audit", batch_size=1, max_attempts=1).run(handler, until_idle=True)
    listed = cli("consumers", "list", env=env)
    assert listed.returncode == 0 and "audit" in listed.stdout, listed
    lag = cli("consumers", "lag", "audit", env=env)
    assert lag.returncode == 0 and "audit" in lag.stdout, lag
    parked = cli("consumers", "parked", "audit", "--json", env=env)
    assert [p["position"] for p in json.loads(parked.stdout)] == [2]
    replay = cli("consumers", "replay", "audit", "--position", "2", env=env)
    assert replay.returncode == 0 and "replay asked for 1 parked event" in replay.stdout
    reset = cli("consumers", "reset", "audit", "--to", "0", env=env)
    assert reset.returncode == 0 and "1 partition reset to position 0" in reset.stdout
    dropped = cli("consumers", "drop", "audit", env=env)
    assert dropped.returncode == 0 and "consumer audit dropped" in dropped.stdout
    again = cli("consumers", "drop", "audit", env=env)
    assert again.returncode == 1 and "CONSUMER_CONFLICT" in again.stderr, again
