"""The planned access path of each query shape, on a realistic store (50k generated events,
vacuumed and analysed): every filter is served by an index or a summary, never by a sequential
scan of the events table, and the counts and listings a summary answers do not read it at all.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import Any, TypeVar

import psycopg
import pytest
from psycopg import sql

from tamma_events import EventFilter, EventStore
from tamma_events.filters import normalize
from tamma_events.ops.migrating import drop
from tamma_events.ops.steps import Op, Run
from tamma_events.sql import summary_aggregate
from tamma_events.tools.workload import generate_events

EVENTS = 50_000

T = TypeVar("T")


@pytest.fixture(scope="module")
def planned(pg_dsn: str) -> Iterator[EventStore]:
    schema = f"plans_{uuid.uuid4().hex[:10]}"
    store = EventStore(pg_dsn, schema=schema, cache_size=0)
    events = list(generate_events(EVENTS))
    for start in range(0, EVENTS, 10_000):
        store.append_batch(events[start : start + 10_000])
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        for table in ("events", "type_summary", "tag_summary", "time_summary"):
            conn.execute(sql.SQL("VACUUM ANALYZE {}").format(sql.Identifier(schema, table)))
    yield store
    store.close()
    drop(pg_dsn, schema)


def _nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", []):
        yield from _nodes(child)


def _access(plan: dict[str, Any]) -> list[tuple[str, str | None, str | None]]:
    """(node type, relation, index) of every node of the plan that reads a relation (index
    nodes of a bitmap scan name no relation: theirs is that of the heap scan above them)."""
    found = []
    for node in _nodes(plan["Plan"]):
        if "Relation Name" in node or "Index Name" in node:
            found.append((node["Node Type"], node.get("Relation Name"), node.get("Index Name")))
    return found


def _start(store: EventStore) -> Any:
    return store.get_events(EventFilter(limit=1))[0].timestamp


# A filter, and the indexes of events any of which may serve it.
SHAPES: dict[str, tuple[dict[str, Any], set[str]]] = {
    "by issue": ({"issue_ids": ["ISSUE-77"], "limit": 100}, {"events_tags"}),
    "by issues (OR)": (
        {"issue_ids": [f"ISSUE-{n}" for n in range(10)], "limit": 100},
        {"events_tags"},
    ),
    "by issues (many)": (
        {"issue_ids": [f"ISSUE-{n}" for n in range(200)], "limit": 100},
        {"events_tags", "events_pkey"},
    ),
    "by user": ({"user_ids": ["user-7"], "limit": 100}, {"events_tags", "events_pkey"}),
    "by pr": ({"pr_ids": ["PR-30"], "limit": 100}, {"events_tags"}),
    "provider + platform": (
        {"providers": ["openai"], "platforms": ["github"], "limit": 100},
        {"events_pkey", "events_tags"},
    ),
    "tags": (
        {"tags": {"userId": "user-3", "provider": "local"}, "limit": 100},
        {"events_tags"},
    ),
    "event ids": (
        {"event_ids": [str(uuid.uuid4()) for _ in range(20)], "limit": 100},
        {"events_event_id_key"},
    ),
    "type": (
        {"event_types": ["IssueClosed"], "limit": 100},
        {"events_type_position", "events_pkey"},
    ),
    "types by type": (
        {"event_types": ["IssueClosed", "IssueCreated"], "limit": 100, "order_by": "type"},
        {"events_type_position"},
    ),
    "all by position desc": (
        {"limit": 100, "order_direction": "desc"},
        {"events_pkey"},
    ),
    "all by timestamp": ({"limit": 100, "order_by": "timestamp"}, {"events_timestamp_position"}),
}

WINDOWED: dict[str, tuple[dict[str, Any], set[str]]] = {
    "type + window": (
        {"event_types": ["IssueClosed"], "limit": 100},
        {"events_pkey", "events_type_position", "events_timestamp_position"},
    ),
    "type + window by time": (
        {"event_types": ["IssueClosed"], "limit": 100, "order_by": "timestamp"},
        {"events_timestamp_position", "events_type_position"},
    ),
    "window by time": (
        {"limit": 100, "order_by": "timestamp", "order_direction": "desc"},
        {"events_timestamp_position"},
    ),
    "provider + window": (
        {"providers": ["google"], "limit": 100},
        {"events_pkey", "events_tags", "events_timestamp_position"},
    ),
}


def _check_served(plan: dict[str, Any], allowed: set[str]) -> None:
    access = _access(plan)
    on_events = [(node, index) for node, relation, index in access if relation == "events"]
    assert on_events, access
    assert all(node != "Seq Scan" for node, _ in on_events), access
    used = {index for _, _, index in access if index is not None}
    assert used & allowed, (used, allowed)


@pytest.mark.parametrize("shape", list(SHAPES))
def test_each_filter_shape_is_served_by_an_index(planned: EventStore, shape: str) -> None:
    fields, allowed = SHAPES[shape]
    _check_served(planned.explain(EventFilter(**fields)), allowed)


@pytest.mark.parametrize("shape", list(WINDOWED))
def test_each_windowed_shape_is_served_by_an_index(planned: EventStore, shape: str) -> None:
    fields, allowed = WINDOWED[shape]
    start = _start(planned) + timedelta(hours=1, minutes=7)
    event_filter = EventFilter(**fields, start_time=start, end_time=start + timedelta(minutes=30))
    plan = planned.explain(event_filter)
    _check_served(plan, allowed)
    if event_filter.order_by == "position":
        # the window becomes a position range (read from the time summary) that an index
        # walks in log order
        conditions = [
            node.get("Index Cond", "")
            for node in _nodes(plan["Plan"])
            if node.get("Relation Name") == "events" or node.get("Index Name")
        ]
        assert any('"position" >=' in c and '"position" <=' in c for c in conditions), conditions


def test_a_keyset_page_reads_the_primary_key_from_its_position(planned: EventStore) -> None:
    page = planned.get_page(page_size=1000)
    assert page.next_token is not None
    analysed = planned.explain(EventFilter(limit=1000), analyze=True)
    _check_served(analysed, {"events_pkey"})


@pytest.mark.parametrize(
    ("fields", "summary"),
    [
        ({}, "head"),
        ({"event_types": ["IssueClosed"]}, "type_summary"),
        ({"event_types": ["IssueClosed", "CiRunCompleted"]}, "type_summary"),
        ({"issue_ids": ["ISSUE-77"]}, "tag_summary"),
        ({"providers": ["openai", "local"]}, "tag_summary"),
        ({"tags": {"platform": "github"}}, "tag_summary"),
    ],
)
def test_counts_come_from_summaries_without_reading_events(
    planned: EventStore, fields: dict[str, Any], summary: str
) -> None:
    relations = {
        relation for _, relation, _ in _access(planned.explain(EventFilter(**fields), count=True))
    }
    assert relations - {None} == {summary}


def test_a_count_over_a_whole_hour_window_comes_from_the_time_summary(
    planned: EventStore,
) -> None:
    start = _start(planned).replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
    event_filter = EventFilter(
        event_types=["IssueClosed"], start_time=start, end_time=start + timedelta(hours=2)
    )
    relations = {relation for _, relation, _ in _access(planned.explain(event_filter, count=True))}
    assert relations - {None} == {"time_summary"}
    # a window cut inside a minute is counted from the events, through an index
    cut = EventFilter(
        event_types=["IssueClosed"],
        start_time=start + timedelta(seconds=30),
        end_time=start + timedelta(hours=2),
    )
    _check_served(
        planned.explain(cut, count=True),
        {"events_timestamp_position", "events_type_position", "events_pkey"},
    )


@pytest.mark.parametrize("group_by", ["event_type", "minute", "hour", "day"])
def test_aggregates_by_type_and_bucket_come_from_summaries(
    planned: EventStore, group_by: Any
) -> None:
    statement = summary_aggregate(planned._statements, normalize(None), group_by)
    assert statement is not None
    with psycopg.connect(planned.dsn) as conn:
        row = conn.execute(
            sql.SQL("EXPLAIN (FORMAT JSON) {}").format(statement[0]), statement[1]
        ).fetchone()
    assert row is not None
    relations = {relation for _, relation, _ in _access(row[0][0])} - {None}
    assert relations <= {"type_summary", "time_summary"} and relations


def test_listings_read_only_summaries(planned: EventStore) -> None:
    """`get_event_types` and `get_tags` read the summaries: the plan of every statement they
    run reads some relation, and none reads the events table."""
    with psycopg.connect(planned.dsn, autocommit=True) as conn:
        types, type_plans = _run_explained(conn, planned._op_event_types())
        tags, tag_plans = _run_explained(conn, planned._op_tags())
    assert types == planned.get_event_types() and tags == planned.get_tags()
    assert len(types) == 9 and set(tags) == {"issueId", "prId", "userId", "provider", "platform"}
    assert type_plans and tag_plans
    for plan in type_plans + tag_plans:
        relations = {relation for _, relation, _ in _access(plan)} - {None}
        assert relations and "events" not in relations, relations


def _run_explained(conn: psycopg.Connection[Any], op: Op[T]) -> tuple[T, list[dict[str, Any]]]:
    """Run the store operation ``op`` on ``conn``, planning each statement it runs first
    (``EXPLAIN (FORMAT JSON)``): what it returned, and the plans."""
    plans: list[dict[str, Any]] = []
    result: Any = None
    while True:
        try:
            step = op.send(result)
        except StopIteration as done:
            return done.value, plans
        assert isinstance(step, Run) and step.fetch in ("all", "one"), step
        query = sql.SQL(step.query) if isinstance(step.query, str) else step.query
        assert isinstance(query, sql.Composable), query
        row = conn.execute(
            sql.SQL("EXPLAIN (FORMAT JSON) {}").format(query), step.params
        ).fetchone()
        assert row is not None
        plans.append(row[0][0])
        cursor = conn.execute(query, step.params)
        result = cursor.fetchall() if step.fetch == "all" else cursor.fetchone()


def test_selective_tags_use_the_gin_index_even_with_poor_statistics(
    planned: EventStore, pg_dsn: str
) -> None:
    """With one-entry statistics the planner cannot tell a rare tag value from a common one;
    the tag summary's exact count still has the store collect the few matches by the index
    instead of walking the log in position order."""
    events = sql.Identifier(planned.schema, "events")
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("ALTER TABLE {} ALTER COLUMN tags SET STATISTICS 1").format(events))
        conn.execute(sql.SQL("ANALYZE {}").format(events))
        try:
            for fields in (
                {"issue_ids": ["ISSUE-5"], "limit": 100},
                {"tags": {"userId": "user-4", "provider": "google"}, "limit": 10},
                {"pr_ids": ["PR-12", "PR-13"], "limit": 100, "order_direction": "desc"},
            ):
                _check_served(planned.explain(EventFilter(**fields)), {"events_tags"})
        finally:
            conn.execute(
                sql.SQL("ALTER TABLE {} ALTER COLUMN tags SET STATISTICS -1").format(events)
            )
            conn.execute(sql.SQL("ANALYZE {}").format(events))


def test_dcb_reads_are_planned_for_their_values_not_prepared(
    make_store: Any,
) -> None:
    """psycopg prepares a statement run five times; PostgreSQL's generic plan for a DCB read of
    a selective tag can take hundreds of times longer than a plan for the values. Reads are
    therefore never prepared."""
    from tamma_events import DomainEvent, Query

    store = make_store(min_connections=1, max_connections=1)
    store.append_batch(
        [DomainEvent("IssueCreated", {"n": n}, {"issueId": f"I-{n % 50}"}) for n in range(500)]
    )
    for n in range(12):
        result = store.read(Query.of(types=["IssueCreated"], tags={"issueId": f"I-{n}"}))
        assert len(result) == 10
    with store._connection() as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_prepared_statements WHERE statement ILIKE %s",
            ["%LEFT JOIN LATERAL%"],
        ).fetchone()
    assert row == (0,)


def test_dcb_conditions_are_checked_with_plans_for_their_values(make_store: Any) -> None:
    """A condition checked with a generic plan ("no event of type T with tag K") walks every
    event of type T; with a plan for its values it looks K up in the GIN index. The checks of
    append_group (small appends and groups) are planned for their values at every call, and the
    separate check statement of large batches and transactions is never prepared."""
    from tamma_events import AppendCondition, DomainEvent, Query
    from tamma_events.sql import condition_check

    store = make_store(min_connections=1, max_connections=1)
    store.append_batch(
        [DomainEvent("Decided", {"n": n}, {"courseId": f"c-{n}"}) for n in range(300)]
    )
    for n in range(12):
        condition = AppendCondition(Query.of(types=["Decided"], tags={"courseId": f"new-{n}"}))
        store.append(DomainEvent("Decided", {"n": n}, {"courseId": f"new-{n}"}), condition)
        with store.transaction() as tx:
            tags = {"courseId": f"tx-{n}"}
            tx.append(DomainEvent("Decided", {"n": n}, tags), AppendCondition(Query.of(tags=tags)))
    with store._connection() as conn:
        prepared = conn.execute(
            "SELECT count(*) FROM pg_prepared_statements WHERE statement ILIKE %s",
            ["%EXISTS (SELECT 1 FROM%"],
        ).fetchone()
        config = conn.execute(
            "SELECT proconfig, prosrc FROM pg_proc WHERE oid = %s::regprocedure",
            [f'"{store.schema}".condition_violated(bigint, jsonb)'],
        ).fetchone()
        # The check's plan, where the statistics know nothing of the 300 events of the type
        # yet: through the tags, not through every event of the type.
        conn.execute("SET plan_cache_mode = force_custom_plan")
        text, params = store._statements.checks(
            [condition_check(AppendCondition(Query.of(types=["Decided"], tags={"courseId": "x"})))]
        )
        plan = "\n".join(r[0] for r in conn.execute(b"EXPLAIN " + text, params).fetchall())
    assert prepared == (0,)
    assert config is not None and "plan_cache_mode=force_custom_plan" in config[0]
    assert "(event_type = item_types[1]) IS TRUE" in config[1]
    assert "events_type_position" not in plan and "events_tags" in plan
    assert store.head() == 324
