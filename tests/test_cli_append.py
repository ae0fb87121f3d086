"""``tamma-events append``: JSON Lines from a file or stdin, through the real entry point (a
subprocess on the test server). Hostile lines are reported by number and nothing is written;
the server keeps serving."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tamma_events import DomainEvent, EventStore
from tamma_events.ops.migrating import drop


@pytest.fixture
def schema(pg_dsn: str) -> Iterator[str]:
    name = f"cli_{uuid.uuid4().hex[:10]}"
    yield name
    drop(pg_dsn, name)


def append(
    pg_dsn: str, schema: str, *args: str, stdin: bytes | None = None
) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "tamma_events", "--dsn", pg_dsn, "--schema", schema]
    result = subprocess.run(
        [*command, "append", *args], input=stdin, capture_output=True, timeout=120
    )
    return subprocess.CompletedProcess(
        result.args,
        result.returncode,
        result.stdout.decode(errors="replace"),
        result.stderr.decode(errors="replace"),
    )


def line(event: dict[str, object]) -> bytes:
    return json.dumps(event).encode() + b"\n"


def stored(pg_dsn: str, schema: str) -> list[DomainEvent]:
    with EventStore(pg_dsn, schema=schema, max_connections=1) as store:
        assert store.verify().ok
        return list(store.read())


def test_a_file_is_appended_in_batches(pg_dsn: str, schema: str, tmp_path: Path) -> None:
    source = tmp_path / "events.jsonl"
    lines = [
        line({"event_type": "IssueCreated", "tags": {"issueId": f"I-{n}"}, "data": {"n": n}})
        for n in range(25)
    ]
    source.write_bytes(b"".join(lines[:10]) + b"\n  \n" + b"".join(lines[10:]))
    result = append(pg_dsn, schema, str(source), "--batch-size", "7")
    assert result.returncode == 0, result.stderr
    assert "appended 25 events (last position 25)" in result.stdout
    events = stored(pg_dsn, schema)
    assert [e.data["n"] for e in events] == list(range(25))
    assert events[3].tags == {"issueId": "I-3"}


def test_stdin_is_read_when_no_file_is_given(pg_dsn: str, schema: str) -> None:
    event_id = str(uuid.uuid4())
    payload = line({"event_type": "A", "event_id": event_id}) + line({"event_type": "B"})
    result = append(pg_dsn, schema, stdin=payload)
    assert result.returncode == 0, result.stderr
    assert [(str(e.event_id) == event_id, e.event_type) for e in stored(pg_dsn, schema)] == [
        (True, "A"),
        (False, "B"),
    ]


#: Each hostile line, and what its report must say.
HOSTILE: list[tuple[bytes, str]] = [
    (b"not json at all", "not JSON"),
    (b"\xff\xfe{}", "not JSON"),  # invalid UTF-8
    (b'{"event_type": "A", "data": {"x": "\xed\xa0\x80"}}', "not JSON"),  # a UTF-8 surrogate
    (b'{"event_type": "A", "data": {"x": "\\ud800"}}', "not JSON"),  # an escaped lone one
    (b'{"event_type": "A\\u0000"}', "NUL"),
    (b'{"event_type": "A", "tags": {"k\\u0000": "v"}}', "NUL"),
    (b'{"event_type": "A", "data": {"x": NaN}}', "not JSON"),
    (b'{"event_type": "A", "data": {"x": 1e999}}', "out of range"),
    (b'{"event_type": "A", "data": ' + b"[" * 10_000 + b"]" * 10_000 + b"}", "nested too deeply"),
    (b'{"event_type": "A", "event_id": "not-a-uuid"}', "UUID"),
    (b'{"event_type": "A", "timestamp": "10000-01-01T00:00:00Z"}', "datetime"),
    (b'{"event_type": "A", "timestamp": "yesterday"}', "datetime"),
    (b'{"event_type": ""}', "event_type"),
    (b'{"event_type": 7}', "Expected `str`"),
    (b'{"event_type": "A", "tags": {"k": 1}}', "Expected `str`"),
    (b'{"data": {}}', "event_type"),
    (b"[1, 2]", "JSON object"),
    (b'"IssueCreated"', "JSON object"),
    (b'{"event_type": "A", "data": {"blob": "' + b"x" * 2_000_000 + b'"}}', "over the limit"),
]


@pytest.mark.parametrize("from_stdin", [False, True], ids=["file", "stdin"])
def test_hostile_lines_are_each_reported_and_nothing_is_written(
    pg_dsn: str, schema: str, tmp_path: Path, from_stdin: bool
) -> None:
    good = line({"event_type": "Good", "tags": {"k": "v"}})
    payload = good + b"".join(bad + b"\n" for bad, _needle in HOSTILE) + good
    if from_stdin:
        result = append(pg_dsn, schema, stdin=payload)
    else:
        source = tmp_path / "hostile.jsonl"
        source.write_bytes(payload)
        result = append(pg_dsn, schema, str(source))
    assert result.returncode == 1, result.stdout + result.stderr
    reported = result.stderr.splitlines()
    for number, (_bad, needle) in enumerate(HOSTILE, start=2):
        [report] = [r for r in reported if r.startswith(f"line {number}:")] or [
            r for r in reported if r.startswith(f"line {number} (")
        ]
        assert needle.lower() in report.lower(), (number, report)
        assert "Traceback" not in result.stderr
    assert not any(r.startswith(("line 1:", "line 1 (")) for r in reported)
    assert f"{len(HOSTILE)} bad lines of {len(HOSTILE) + 2}; nothing was written" in result.stderr
    assert stored(pg_dsn, schema) == []
    # The server keeps serving: the good lines alone go in.
    result = append(pg_dsn, schema, stdin=good + good)
    assert result.returncode == 0, result.stderr
    assert [e.event_type for e in stored(pg_dsn, schema)] == ["Good", "Good"]


def test_sql_and_json_path_text_is_stored_literally(pg_dsn: str, schema: str) -> None:
    hostile = {
        "'; DROP TABLE events; --": "$.a[*] ? (@ == 1)",
        "@>": '"}, {"x": "',
        "$$": "' OR '1'='1",
    }
    result = append(pg_dsn, schema, stdin=line({"event_type": "Odd'Type--", "tags": hostile}))
    assert result.returncode == 0, result.stderr
    [event] = stored(pg_dsn, schema)
    assert event.tags == hostile and event.event_type == "Odd'Type--"


def test_a_duplicate_id_names_its_line_and_keeps_earlier_batches(pg_dsn: str, schema: str) -> None:
    event_id = str(uuid.uuid4())
    payload = (
        line({"event_type": "A", "event_id": event_id})
        + line({"event_type": "B"})
        + line({"event_type": "C", "event_id": event_id})
    )
    result = append(pg_dsn, schema, "--batch-size", "2", stdin=payload)
    assert result.returncode == 1
    assert "DUPLICATE_EVENT" in result.stderr and '"lines": [3]' in result.stderr
    assert "lines up to 2 (2 events) are stored, up to position 2" in result.stderr
    assert [e.event_type for e in stored(pg_dsn, schema)] == ["A", "B"]
    # In one batch, the duplicate is found before anything is written.
    other = f"{schema}_b"
    try:
        result = append(pg_dsn, other, stdin=payload)
        assert result.returncode == 1 and "DUPLICATE_EVENT" in result.stderr
        assert "nothing was written" in result.stderr
        assert stored(pg_dsn, other) == []
    finally:
        drop(pg_dsn, other)


def test_only_the_first_bad_lines_are_shown(pg_dsn: str, schema: str) -> None:
    result = append(pg_dsn, schema, "--max-errors", "2", stdin=b"x\n" * 5)
    assert result.returncode == 1
    assert result.stderr.count("not JSON") == 2
    assert "... and 3 more bad lines" in result.stderr
    assert "5 bad lines of 5" in result.stderr


def test_a_missing_file_is_a_usage_error(pg_dsn: str, schema: str, tmp_path: Path) -> None:
    result = append(pg_dsn, schema, str(tmp_path / "absent.jsonl"))
    assert result.returncode == 2 and "No such file" in result.stderr
