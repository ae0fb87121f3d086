"""The ``tamma-events`` command line, run in-process against the real test server."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from click.testing import CliRunner
from psycopg import sql

from tamma_events import EventStore
from tamma_events.cli import main
from tamma_events.schema import drop, migrations


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
        "verify",
        "commit_floor",
    }
    assert results["append.conditional"]["baseline"] == "commit_floor"
    ceiling = results["copy_ceiling"]["value"]
    assert results["append_batch"]["ratio"] == pytest.approx(
        results["append_batch"]["value"] / ceiling
    )
    assert all(r["value"] > 0 for r in results.values())


def test_usage_error_exits_2(pg_dsn: str) -> None:
    code, _ = run(pg_dsn, "demo", "--events", "0")
    assert code == 2
