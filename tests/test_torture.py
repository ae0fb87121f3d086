"""Concurrency torture (`tamma_events.tools.torture`): the dcb.events scenarios in short runs, the
oracle's own ability to catch each kind of violation, and the command line.

The long runs are recorded in docs/reliability.md; ``TAMMA_EVENTS_TORTURE_SECONDS`` makes these
longer. A scenario runs at least that long, then on until it has raced as much as the test needs
(its minimums), so a busy machine makes a run longer, never a failure; ``MAX_SECONDS`` only
bounds a hang.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable

import pytest

from tamma_events import DomainEvent, EventStore
from tamma_events.model import Query, QueryItem
from tamma_events.tools import torture

pytestmark = pytest.mark.codec_neutral

SECONDS = float(os.environ.get("TAMMA_EVENTS_TORTURE_SECONDS", "4"))
MAX_SECONDS = SECONDS + 300
#: Decisions each way that show the workers really raced.
RACED = 20


def test_consistency_every_decision_holds_at_commit(
    pg_dsn: str, make_store: Callable[..., EventStore]
) -> None:
    store = make_store()
    report = torture.run(
        "consistency",
        pg_dsn,
        schema=store.schema,
        seconds=SECONDS,
        workers=20,
        processes=2,
        min_accepted=RACED,
        min_rejected=RACED,
        max_seconds=MAX_SECONDS,
    )
    assert report.violations == [] and report.ok, report.to_dict()
    assert report.attempted == report.accepted + report.rejected
    # The workers really raced: some decisions were refused, and some were taken. The run goes
    # on until both happened, so this fails only if it never did within MAX_SECONDS.
    assert report.accepted >= RACED and report.rejected >= RACED, report.to_dict()
    assert report.false_conflicts == 0
    assert report.events == store.head() >= report.accepted
    assert store.verify().ok


def test_monotonic_reader_sees_every_position_once_in_order(
    pg_dsn: str, make_store: Callable[..., EventStore]
) -> None:
    store = make_store()
    report = torture.run(
        "monotonic",
        pg_dsn,
        schema=store.schema,
        seconds=SECONDS,
        workers=5,
        processes=5,
        min_accepted=100,
        max_seconds=MAX_SECONDS,
    )
    assert report.violations == [] and report.ok, report.to_dict()
    assert report.accepted == report.attempted >= 100, report.to_dict()
    assert report.details["delivered"] == report.events == store.head()
    assert store.verify().ok


def test_parallel_writes_on_disjoint_tags_never_conflict(
    pg_dsn: str, make_store: Callable[..., EventStore]
) -> None:
    store = make_store()
    report = torture.run(
        "parallel",
        pg_dsn,
        schema=store.schema,
        seconds=SECONDS,
        workers=20,
        processes=2,
        min_accepted=100,
        max_seconds=MAX_SECONDS,
    )
    assert report.violations == [] and report.ok, report.to_dict()
    assert report.rejected == 0 and report.accepted == report.attempted >= 100, report.to_dict()
    assert store.verify().ok


# -- the oracle fails when it should -------------------------------------------------------------


def _attempt(
    items: list[tuple[list[str], dict[str, str]]] | None,
    after: int | None,
    events: list[DomainEvent],
    outcome: str,
    first: int = 0,
    head: int = 0,
) -> torture.Attempt:
    described = [(str(e.event_id), e.event_type, dict(e.tags)) for e in events]
    last = first + len(events) - 1 if first else 0
    return (7, items, after, described, outcome, first, last, head, "")


def test_the_oracle_catches_each_kind_of_violation(store: EventStore) -> None:
    a = DomainEvent("A", tags={"course": "c1"})
    b = DomainEvent("B", tags={"course": "c2"})
    c = DomainEvent("A", tags={"course": "c1"})
    store.append_batch([a, b])  # positions 1, 2
    store.append(c)  # position 3
    course_1 = [(["A"], {"course": "c1"})]
    wrongly_refused = [
        _attempt(None, None, [a, b], "accepted", first=1),
        _attempt(course_1, 1, [c], "rejected", head=2),  # wrongly rejected: nothing after 1 by 2
    ]
    report = torture.TortureReport("consistency", 1, 1, 0.0)
    torture.check_log(store, wrongly_refused, report)
    # and c, at 3, is stored although its append says it was rejected
    assert report.false_conflicts == 1 and report.violation_count == 2
    assert any("rejected although no event" in v for v in report.violations)
    assert any("rejected append wrote" in v for v in report.violations)

    cases: dict[str, list[torture.Attempt]] = {
        # accepted at 3 although a (1) matches its condition after 0
        "accepted although": [
            _attempt(None, None, [a, b], "accepted", first=1),
            _attempt(course_1, 0, [c], "accepted", first=3),
        ],
        # claims c was stored at 2
        "is not at position": [
            _attempt(None, None, [a], "accepted", first=1),
            _attempt(None, None, [b], "accepted", first=3),
            _attempt(None, None, [c], "accepted", first=2),
        ],
        # c was written although its append was refused
        "rejected append wrote": [
            _attempt(None, None, [a, b], "accepted", first=1),
            _attempt([(["B"], {})], 0, [c], "rejected", head=2),
        ],
        # c is in the log, but no attempt appended it
        "come from no attempt": [_attempt(None, None, [a, b], "accepted", first=1)],
    }
    for needle, attempts in cases.items():
        report = torture.TortureReport("consistency", 1, 1, 0.0)
        torture.check_log(store, attempts, report)
        assert not report.ok and any(needle in v for v in report.violations), (needle, report)

    # The reader's checks: a skip, a repeat, a foreign id, a short read.
    log = store.read()
    ids = [str(e.event_id) for e in log]
    for needle, deliveries in {
        "skipped": [(1, ids[0]), (3, ids[2])],
        "after": [(1, ids[0]), (2, ids[1]), (2, ids[1]), (3, ids[2])],
        "not the log's": [(1, ids[0]), (2, ids[2]), (3, ids[2])],
        "stopped at": [(1, ids[0]), (2, ids[1])],
    }.items():
        report = torture.TortureReport("monotonic", 1, 1, 0.0)
        attempts = [_attempt(None, None, [a, b], "accepted", first=1)]
        attempts.append(_attempt(None, None, [c], "accepted", first=3))
        torture.check_log(store, attempts, report, deliveries)
        assert any(needle in v for v in report.violations), (needle, report)

    # And a disjoint-tag conflict counts even when an event justified it.
    report = torture.TortureReport("parallel", 1, 1, 0.0)
    all_a = Query([QueryItem(["A"])])
    items = [(list(i.types), dict(i.tags)) for i in all_a.items]
    torture.check_log(
        store,
        [
            _attempt(None, None, [a, b], "accepted", first=1),
            _attempt(None, None, [c], "accepted", first=3),
            _attempt(items, 0, [DomainEvent("A")], "rejected", head=3),
        ],
        report,
    )
    assert any("disjoint" in v for v in report.violations)


def test_the_command_runs_a_scenario_and_reports(pg_dsn: str, tmp_path: object) -> None:
    out = f"{tmp_path}/report.json"
    result = subprocess.run(
        [sys.executable, "-m", "tamma_events", "--dsn", pg_dsn, "torture", "parallel",
         "--seconds", "1", "--workers", "4", "--processes", "2", "--json", out],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no violations" in result.stdout

    with open(out) as handle:
        saved = json.load(handle)
    # Each worker tries at least once, however late its thread started, and on disjoint tags
    # none is refused: the 4 workers' first appends at least were accepted.
    assert saved["ok"] is True and saved["scenario"] == "parallel" and saved["accepted"] >= 4


def test_unknown_scenarios_are_refused(pg_dsn: str) -> None:
    with pytest.raises(ValueError, match="unknown scenario"):
        torture.run("chaos", pg_dsn)
    result = subprocess.run(
        [sys.executable, "-m", "tamma_events", "--dsn", pg_dsn, "torture", "chaos"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2 and "chaos" in result.stderr
