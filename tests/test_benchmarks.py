"""Every benchmark entry point runs at a tiny size, so none of them rots: ``tamma-events bench
--suite full`` and ``--suite load-curve`` through the command line, and the pytest-benchmark
suites in ``benchmarks/`` in a child pytest. No timing is asserted: only that each figure is
there, beside its baseline, with the resources it used.

The benchmarks time the native and the pure-Python codec side by side, whichever codec the
test run forces, so these run once (codec_neutral), in the native pass."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from _figures import is_figure
from tamma_events.cli import main
from tamma_events.tools.usage import Usage, _resolved

pytestmark = pytest.mark.codec_neutral

ROOT = Path(__file__).resolve().parent.parent


def bench(pg_dsn: str, *args: str) -> dict[str, dict[str, Any]]:
    result = CliRunner().invoke(
        main, ["--dsn", pg_dsn, "bench", *args, "--json", "-"], catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    out = result.output
    summary = json.loads(out[out.index("{") :])
    return {r["name"]: r for r in summary["results"]}


def test_full_suite_reports_every_figure_beside_its_baseline(pg_dsn: str) -> None:
    results = bench(
        pg_dsn,
        "--suite",
        "full",
        "--events",
        "3000",
        "--append-events",
        "2000",
        "--batch-size",
        "1000",
        "--rounds",
        "1",
        "--conditional",
        "20",
        "--threads",
        "4",
        "--per-thread",
        "5",
        "--tasks",
        "8",
        "--per-task",
        "3",
        "--processes",
        "2",
        "--process-threads",
        "2",
        "--samples",
        "3",
        "--seconds",
        "1",
        "--rate",
        "500",
    )
    expected_baselines = {
        "encode.native": "encode.python",
        "append_batch": "copy_ceiling",
        "append_batch.vs.executemany": "executemany",
        "append_batch.vs.eventsourcing.application": "eventsourcing.application",
        "append_batch.vs.eventsourcing.dcb": "eventsourcing.dcb",
        "append_batch.vs.copy_indexed": "copy_indexed",
        "append_batch.vs.umadb": "umadb.batches",
        "append.conditional": "lean.conditional",
        "append.threads": "lean.threads",
        "append.conditional.threads": "commit_floor",
        "append.async_tasks": "commit_floor",
        "append.processes": "commit_floor",
        "append.conditional.vs.eventsourcing.dcb": "eventsourcing.dcb.conditional",
        "append.conditional.vs.umadb": "umadb.conditional",
        "append.threads.vs.umadb": "umadb.threads",
        "verify": "copy_to.chain",
        "verify.archive": "parquet_read",
        "export_arrow": "adbc_fetch_arrow_table",
        "read_1000": "copy_1000",
        "get_page_1000": "copy_1000.pages",
        "stream_events": "export_arrow.reads",
        "async.export": "export_arrow.reads",
        "async.stream": "stream_events",
        "async.read_1000": "sync.read_1000",
        "consumer": "consumer.stream_events",
        "consumer.transactional": "projection.no_checkpoint",
        "consumer.takeover": "consumer.lease_time",
        "query.by_issue": "round_trip",
        "query.count_by_type": "round_trip",
        "query.count_by_type.tail": "round_trip",
        "query.aggregate_by_day.tail": "round_trip",
        "subscribe.latency_p99": "listen_notify_p99",
    }
    for name, baseline in expected_baselines.items():
        result = results[name]
        assert result["baseline"] == baseline, name
        assert is_figure(result["value"]), name
        if name.startswith(("query.", "subscribe.")):
            # Latency against a floor measured alongside (a round trip, a bare listener).
            assert result["ratio"] is None or is_figure(result["ratio"]), name
        else:
            base = results[baseline]["value"]
            assert result["ratio"] == pytest.approx(result["value"] / base, rel=1e-6), name
    for name in ("copy_to", "commit_floor", "load", "read"):
        assert is_figure(results[name]["value"]), name
    # The invariants the append measures hold while they are timed.
    assert results["append.conditional.threads"]["detail"]["false_conflicts"] == 0
    assert results["append.processes"]["detail"]["gapless"] is True
    assert is_figure(results["lean.threads"]["detail"]["events_per_group"])
    assert results["query.count_by_type.tail"]["detail"]["unfolded_events"] > 0
    # Resources per measure: client and server CPU (the server is local here, and its CPU is
    # read from /proc, so known on Linux only) and WAL. A CPU time too short for its clock is
    # None and said so, never a 0 made of rounding; whether it resolved depends on the machine.
    for name, unit in (("append_batch", "event"), ("verify", "event"), ("query.by_issue", "query")):
        detail = results[name]["detail"]
        for side in ("client", "server"):
            value = detail[f"{side}_cpu_us_per_{unit}"]
            if value is not None:
                assert is_figure(value), name
            elif side == "client" or sys.platform.startswith("linux"):
                assert side in detail["cpu_below_resolution"], name
        assert is_figure(detail[f"wal_bytes_per_{unit}"]), name


def test_a_cpu_time_too_short_for_its_clock_is_unknown_not_zero() -> None:
    # Ten steps of the clock at least: one tick of /proc's clock is 10 ms, and a few fast
    # queries fit in less.
    tick = 0.01
    assert _resolved(0.0, tick) is None
    assert _resolved(0.09, tick) is None
    assert _resolved(0.1, tick) == 0.1
    usage = Usage(client_cpu_s=None, server_cpu_s=0.5, wal_bytes=300, unresolved=["client"])
    detail = usage.per(3, "query")
    assert detail["client_cpu_us_per_query"] is None
    assert detail["client_cpu_s"] is None
    assert detail["server_cpu_us_per_query"] == pytest.approx(0.5 / 3 * 1e6, abs=0.01)
    assert detail["cpu_below_resolution"] == ["client"]
    assert "cpu_below_resolution" not in Usage(client_cpu_s=1.0).per(3)


def test_the_bench_table_is_printed_whole_when_piped(pg_dsn: str) -> None:
    result = CliRunner().invoke(
        main, ["--dsn", pg_dsn, "bench", "--suite", "queries", "--events", "300", "--samples", "2"]
    )
    assert result.exit_code == 0, result.output
    # Not a terminal: the table keeps its own width, so no name or figure is cut to fit 80
    # characters.
    assert "…" not in result.output
    assert "query.keyset_page_1000.decoding" in result.output
    assert "psycopg_default_decoding" in result.output


def test_load_curve_reports_each_slice_against_the_first(pg_dsn: str) -> None:
    results = bench(pg_dsn, "--suite", "load-curve", "--events", "3000", "--batch-size", "100")
    slices = [results[f"load.slice_{n}"] for n in range(1, 11)]
    assert [s["detail"]["through"] for s in slices] == list(range(300, 3001, 300))
    first = slices[0]["value"]
    for piece in slices:
        assert piece["baseline"] == "load.slice_1"
        assert piece["ratio"] == pytest.approx(piece["value"] / first)
        assert is_figure(piece["detail"]["wal_bytes_per_event"])
    assert slices[-1]["detail"]["table_mb"] >= 0


# The child run starts servers of its own (a replica among them) and loads its stores: on a busy
# machine that takes minutes. Both bounds are for a hang, the child's inside this test's.
@pytest.mark.timeout(1800)
def test_pytest_benchmarks_run_at_a_tiny_size(pg_dsn: str) -> None:
    env = {
        **os.environ,
        "TAMMA_EVENTS_TEST_DSN": pg_dsn,
        # The benchmarks time the native codec (and the reference beside it) whichever codec
        # this test run forces.
        "TAMMA_EVENTS_IMPL": "native",
        "TAMMA_EVENTS_BENCH_EVENTS": "2000",
        "TAMMA_EVENTS_BENCH_QUERY_EVENTS": "3000",
        "TAMMA_EVENTS_BENCH_SINGLE": "30",
        "TAMMA_EVENTS_BENCH_SAMPLES": "3",
        "TAMMA_EVENTS_BENCH_SECONDS": "1",
        "TAMMA_EVENTS_BENCH_RATE": "1000",
        "TAMMA_EVENTS_BENCH_REPLICA_EVENTS": "2000",
    }
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "benchmarks", "-q", "-p", "no:cacheprovider"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-5000:]
    summary = re.search(r"(\d+) passed", out)
    assert summary is not None and int(summary.group(1)) >= 20, out[-2000:]
    assert not re.search(r"\d+ (skipped|failed|error)", out), out[-2000:]
    assert "ratios against baselines from this run" in out


@pytest.mark.parametrize("measure", ["append", "encode", "verify", "conditional"])
def test_profile_script_runs_each_measure(pg_dsn: str, measure: str) -> None:
    done = subprocess.run(
        [sys.executable, "benchmarks/profile.py", measure, "--events", "300"],
        cwd=ROOT,
        env={**os.environ, "TAMMA_EVENTS_DSN": pg_dsn},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.match(rf"{measure}: 300 in [0-9.]+ s, [0-9,]+/s", done.stdout), done.stdout
