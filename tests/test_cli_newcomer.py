"""What a newcomer trying the command line runs into, through the console script pip installed
and real processes: two demos at once, the demo's schema and archives, archives that follow the
data directory, a server that is not there, usage errors (exit 2), a reader that goes away
(``| head``), and counts said in words."""

from __future__ import annotations

import json
import os
import select
import subprocess
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import psycopg
import pytest

from _cli_support import SCRIPT, cli, free_port
from tamma_events import DomainEvent, EventStore
from tamma_events.cli import DEMO_MARK
from tamma_events.ops.migrating import drop

pytestmark = pytest.mark.codec_neutral

#: A bound for a hang, generous for a busy machine; never a measure of speed.
HANG = 300


@pytest.fixture
def schema(pg_dsn: str) -> Iterator[str]:
    name = f"newcomer_{uuid.uuid4().hex[:10]}"
    yield name
    drop(pg_dsn, name)


@pytest.fixture
def env(pg_dsn: str) -> dict[str, str]:
    """The test server by $TAMMA_EVENTS_DSN; no schema set."""
    return {
        **{k: v for k, v in os.environ.items() if k != "TAMMA_EVENTS_SCHEMA"},
        "TAMMA_EVENTS_DSN": pg_dsn,
    }


def _no_dsn_env() -> dict[str, str]:
    drop_keys = ("TAMMA_EVENTS_DSN", "TAMMA_EVENTS_DATA_DIR", "TAMMA_EVENTS_SCHEMA", "PGHOST")
    return {k: v for k, v in os.environ.items() if k not in drop_keys}


# -- 2. two demos at once ---------------------------------------------------------------------


def test_two_demos_started_together_both_finish(env: dict[str, str], schema: str) -> None:
    """Started in two terminals at once, on one schema: the second waits for the first, then
    runs on the schema reset anew. Neither shows an error."""
    demos = [
        subprocess.Popen(
            [str(SCRIPT), "--schema", schema, "demo", "--events", "3000", "--batch-size", "500"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [demo.communicate(timeout=HANG) for demo in demos]
    for demo, (out, err) in zip(demos, outputs, strict=True):
        assert demo.returncode == 0, out + err
        assert "appended 3,000 events" in out and "error" not in (out + err).lower()
    with EventStore(env["TAMMA_EVENTS_DSN"], schema=schema, migrate=False) as store:
        assert store.head() == 3002  # the last run's events only: the schema was reset


def test_a_second_demo_says_it_waits_for_the_first(
    env: dict[str, str], pg_dsn: str, schema: str
) -> None:
    """While a demo holds the schema (its lock, taken here as a running demo would), another
    says so in one line and waits; it runs once the first is done."""
    with psycopg.connect(pg_dsn, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(hashtext(%s))", [f"tamma-events demo:{schema}"])
        demo = subprocess.Popen(
            [str(SCRIPT), "--schema", schema, "demo", "--events", "1000"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert demo.stdout is not None
            # The demo is blocked until the lock goes; a bound for a hang before its first line.
            ready, _, _ = select.select([demo.stdout], [], [], HANG)
            assert ready, "the demo printed nothing"
            first = demo.stdout.readline()
            assert first == (
                f"a demo is already running in schema {schema} on this server: waiting for it"
                " to finish (Ctrl-C to stop; --schema NAME runs one beside it)\n"
            )
            assert demo.poll() is None
        except BaseException:
            demo.kill()
            demo.communicate()
            raise
    # The holder's session ended: its lock with it.
    out, err = demo.communicate(timeout=HANG)
    assert demo.returncode == 0, out + err
    assert "appended 1,000 events" in out


# -- the demo's schema ------------------------------------------------------------------------


def test_the_demo_honours_the_global_schema_and_resets_only_its_own(
    env: dict[str, str], pg_dsn: str, schema: str
) -> None:
    """`tamma-events --schema NAME demo` (or $TAMMA_EVENTS_SCHEMA) runs there. The demo resets
    its schema first, so it refuses one that holds anything it did not make: a store of yours
    named by mistake is never dropped."""
    mine = f"{schema}_mine"
    try:
        with EventStore(pg_dsn, schema=mine) as store:
            store.append(DomainEvent("Precious"))
        refused = cli("--schema", mine, "demo", "--events", "100", env=env)
        assert refused.returncode == 2, refused
        assert f"schema {mine} exists and was not made by this demo" in refused.stderr
        with EventStore(pg_dsn, schema=mine, migrate=False) as store:
            assert [e.event_type for e in store.read()] == ["Precious"]
    finally:
        drop(pg_dsn, mine)

    first = cli("--schema", schema, "demo", "--events", "100", env=env)
    assert first.returncode == 0, first
    assert f"schema {schema}" in first.stdout
    with psycopg.connect(pg_dsn) as conn:
        row = conn.execute(
            "SELECT obj_description(oid, 'pg_namespace') FROM pg_namespace WHERE nspname = %s",
            [schema],
        ).fetchone()
    assert row == (DEMO_MARK,)
    again = cli("demo", "--events", "200", env={**env, "TAMMA_EVENTS_SCHEMA": schema})
    assert again.returncode == 0, again
    named = cli("demo", "--events", "10", env={**env, "TAMMA_EVENTS_SCHEMA": "public"})
    assert named.returncode == 2
    assert "schema public (from $TAMMA_EVENTS_SCHEMA) exists" in named.stderr, named
    with EventStore(pg_dsn, schema=schema, migrate=False) as store:
        assert store.head() == 202


def test_archives_follow_the_data_dir_and_a_new_demo_removes_its_old_ones(
    tmp_path: Path,
) -> None:
    """No DSN: the embedded server of --data-dir. `compact` writes to <data dir>-archives/
    <schema> beside that data directory, and the next demo, which resets its schema, removes
    those archives too."""
    data = tmp_path / "pg"
    env = _no_dsn_env()
    base = ["--data-dir", str(data)]
    demo = cli(*base, "demo", "--events", "1000", env=env)
    assert demo.returncode == 0, demo
    before = (datetime.now(timezone.utc) + timedelta(days=1)).date().isoformat()  # a date
    compacted = cli(*base, "--schema", "tamma_demo", "compact", "--before", before, env=env)
    assert compacted.returncode == 0, compacted
    assert "compacted 1,002 events" in compacted.stdout
    archives = tmp_path / "pg-archives" / "tamma_demo"
    assert len(list(archives.glob("events-*.parquet"))) == 1
    again = cli(*base, "demo", "--events", "1000", env=env)
    assert again.returncode == 0, again
    assert list(archives.glob("*.parquet")) == []
    verified = cli(*base, "--schema", "tamma_demo", "verify", env=env)
    assert verified.returncode == 0 and "1,002 events verified" in verified.stdout, verified


# -- 4. a server that is not there --------------------------------------------------------------


def test_an_unreachable_server_is_one_line_naming_host_and_port() -> None:
    port = free_port()
    env = {**_no_dsn_env(), "TAMMA_EVENTS_DSN": f"postgresql://u:s3cr3t@127.0.0.1:{port}/x"}
    for command in (["stats"], ["query"], ["init"], ["demo", "--events", "10"]):
        done = cli(*command, env=env)
        assert done.returncode == 1, (command, done)
        assert done.stdout == ""
        lines = done.stderr.splitlines()
        assert len(lines) == 1, (command, done.stderr)
        assert lines[0].startswith(
            f"error STORAGE_ERROR: cannot connect to PostgreSQL at 127.0.0.1:{port}:"
        )
        assert "s3cr3t" not in done.stderr
    for bad in ("0", "-1", "soon"):
        usage = cli("--connect-timeout", bad, "stats", env=env)
        assert usage.returncode == 2 and "--connect-timeout" in usage.stderr, usage


# -- 5. usage errors, closed pipes, words ------------------------------------------------------


@pytest.fixture
def filled(env: dict[str, str], pg_dsn: str, schema: str) -> dict[str, str]:
    """A store of 30 events on ``schema``, and the environment that names it."""
    with EventStore(pg_dsn, schema=schema) as store:
        store.append_batch(
            [
                DomainEvent(
                    "IssueCreated",
                    {"n": n},
                    {"issueId": f"I-{n % 3}"},
                    timestamp=datetime(2026, 1, 1 + n % 3, 12, tzinfo=timezone.utc),
                )
                for n in range(30)
            ]
        )
    return {**env, "TAMMA_EVENTS_SCHEMA": schema}


def test_a_range_past_the_head_is_a_usage_error(filled: dict[str, str]) -> None:
    past = cli("verify", "--start", "300000", env=filled)
    assert past.returncode == 2, past
    assert "start 300000 is past the head, position 30" in past.stderr
    assert "broken" not in past.stdout + past.stderr
    backwards = cli("verify", "--start", "20", "--end", "10", env=filled)
    assert backwards.returncode == 2 and "--start 20 is after --end 10" in backwards.stderr
    # An end past the head stops at the head.
    tail = cli("verify", "--start", "25", "--end", "300000", env=filled)
    assert tail.returncode == 0 and "6 events verified (positions 25 to 30)" in tail.stdout, tail
    one = cli("verify", "--start", "30", env=filled)
    assert one.returncode == 0 and "ok: 1 event verified" in one.stdout, one


def test_times_take_a_date_and_the_help_says_what_is_accepted(filled: dict[str, str]) -> None:
    found = cli("query", "--start-time", "2026-01-02", "--end-time", "2026-01-03", env=filled)
    assert found.returncode == 0, found
    assert [json.loads(line)["data"]["n"] for line in found.stdout.splitlines()] == list(
        range(1, 30, 3)
    )
    assert (
        cli("query", "--start-time", "2026-01-02T00:00:00+00:00", env=filled).stdout.count("\n")
        == 20
    )
    help_text = " ".join(cli("query", "--help", env=filled).stdout.split())
    assert "or a date (2026-01-02: midnight UTC)" in help_text
    assert "2026-01-02T15:04:05Z" in help_text


@pytest.mark.parametrize(
    "args",
    [
        ["query", "--tag", "badtag"],
        ["query", "--start-time", "yesterday"],
        ["query", "--start-time", "2026-01-01T00:00:00"],  # no offset
        ["export", "--format", "jsonl", "--end-time", "2026-13-01"],
        ["tail", "--type", ""],
        ["compact", "--before", "yesterday"],
        ["verify", "--start", "0"],
        ["query", "--limit", "many"],
        ["query", "--limit"],  # a value missing
    ],
)
def test_usage_errors_exit_2_before_any_work(filled: dict[str, str], args: list[str]) -> None:
    done = cli(*args, env=filled)
    assert done.returncode == 2, done
    assert "Error: " in done.stderr
    assert done.stdout == ""  # no progress bar, no partial output


@pytest.mark.parametrize(
    "args",
    [
        ["stats"],
        ["query"],
        ["query", "--format", "table"],
        ["export", "--format", "jsonl"],
        ["--help"],
        ["bench", "--suite", "queries", "--events", "300", "--samples", "2"],
    ],
)
def test_a_reader_that_went_away_is_not_an_error(filled: dict[str, str], args: list[str]) -> None:
    """`tamma-events stats | head -2`: once the reader has gone, a write fails with EPIPE.
    Here the pipe's read end is closed before the command starts, so every write fails: the
    command ends quietly, exit status 0, whatever it was writing."""
    read, write = os.pipe()
    os.close(read)
    try:
        done = subprocess.run(
            [str(SCRIPT), *args],
            stdout=write,
            stderr=subprocess.PIPE,
            env=filled,
            timeout=HANG,
            text=True,
        )
    finally:
        os.close(write)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr and "Broken pipe" not in done.stderr, done.stderr


def test_a_reader_that_went_away_leaves_a_failure_a_failure(filled: dict[str, str]) -> None:
    """Output that nobody reads any more does not turn a failed command into a success: bad
    input appended with its report going to a closed pipe still exits 1, and writes nothing."""
    read, write = os.pipe()
    os.close(read)
    try:
        done = subprocess.run(
            [str(SCRIPT), "append"],
            input=b'{"event_type": ""}\n',
            stdout=write,
            stderr=write,
            env=filled,
            timeout=HANG,
        )
    finally:
        os.close(write)
    assert done.returncode == 1
    with EventStore(filled["TAMMA_EVENTS_DSN"], schema=filled["TAMMA_EVENTS_SCHEMA"]) as store:
        assert store.head() == 30


def test_counts_are_said_in_words(filled: dict[str, str], tmp_path: Path) -> None:
    one = cli("append", stdin=b'{"event_type": "Single"}\n', env=filled)
    assert one.returncode == 0 and "appended 1 event (last position 31)" in one.stdout, one
    exported = cli("export", "--type", "Single", "-o", str(tmp_path / "one.parquet"), env=filled)
    assert exported.returncode == 0 and "exported 1 event to" in exported.stderr, exported


def test_output_lines_are_whole_when_piped(filled: dict[str, str]) -> None:
    """Piped, a long line stays one line and a table keeps its width (rich would fold both at
    80 columns)."""
    table = cli("query", "--format", "table", "--limit", "3", env=filled)
    assert table.returncode == 0, table
    assert (
        "rows 1 to 3 of the matching live events (30 in the whole history); --offset 3 for the"
        " next\n" in table.stdout
    )
    stats = cli("stats", env=filled)
    assert stats.returncode == 0 and "…" not in stats.stdout, stats


def test_time_options_need_no_server_to_be_checked() -> None:
    """A malformed value is reported before any server is reached: here there is none."""
    env = {**_no_dsn_env(), "TAMMA_EVENTS_DSN": "postgresql://u@127.0.0.1:1/x"}
    done = cli("query", "--end-time", "tomorrow", env=env)
    assert done.returncode == 2 and "STORAGE_ERROR" not in done.stderr, done
    assert "midnight UTC" in done.stderr
