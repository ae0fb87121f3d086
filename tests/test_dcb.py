"""DCB semantics against a real PostgreSQL: query matching, append conditions, read order, limit
and head, argument errors, hostile tag strings, and `EventStore.transaction`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from tamma_events import (
    APPEND_CONDITION_FAILED,
    QUERY_ERROR,
    AppendCondition,
    DomainEvent,
    EventStore,
    EventStoreError,
    Query,
    QueryItem,
    ReadResult,
)

# The log every query test reads: (type, tags) at positions 1..6.
LOG: list[tuple[str, dict[str, str]]] = [
    ("IssueOpened", {"issueId": "1", "userId": "u1"}),  # 1
    ("IssueClosed", {"issueId": "1"}),  # 2
    ("IssueOpened", {"issueId": "2", "userId": "u1"}),  # 3
    ("PrMerged", {"prId": "7", "userId": "u2"}),  # 4
    ("IssueOpened", {}),  # 5
    ("IssueCommented", {"issueId": "1", "userId": "u2"}),  # 6
]
ALL = [1, 2, 3, 4, 5, 6]


def positions(result: ReadResult) -> list[int]:
    return [event.position for event in result]


@pytest.fixture
def filled(store: EventStore) -> EventStore:
    for expected, (event_type, tags) in enumerate(LOG, 1):
        assert store.append(DomainEvent(event_type, {"n": expected}, tags)) == expected
    return store


def expect_error(code: str, call: Callable[[], Any]) -> EventStoreError:
    with pytest.raises(EventStoreError) as info:
        call()
    assert info.value.code == code, info.value
    return info.value


# -- query matching --------------------------------------------------------------------------


def test_empty_query_matches_all(filled: EventStore) -> None:
    for query in (None, Query(), Query.all(), Query(())):
        result = filled.read(query)
        assert positions(result) == ALL
        assert result.head == 6
    assert [(e.event_type, e.tags, e.data) for e in filled.read()] == [
        (t, tags, {"n": n}) for n, (t, tags) in enumerate(LOG, 1)
    ]


def test_types_are_ored_within_an_item(filled: EventStore) -> None:
    assert positions(filled.read(Query.of(types=["IssueClosed", "PrMerged"]))) == [2, 4]
    assert positions(filled.read(Query.of(types=["IssueOpened"]))) == [1, 3, 5]
    assert positions(filled.read(Query.of(types=["IssueOpened", "Unknown"]))) == [1, 3, 5]
    assert positions(filled.read(Query.of(types=["Unknown"]))) == []


def test_tags_are_anded_within_an_item(filled: EventStore) -> None:
    assert positions(filled.read(Query.of(tags={"issueId": "1"}))) == [1, 2, 6]
    assert positions(filled.read(Query.of(tags={"issueId": "1", "userId": "u1"}))) == [1]
    assert positions(filled.read(Query.of(tags={"issueId": "1", "userId": "u2"}))) == [6]
    # every pair must be carried: a key alone or a value under another key is not enough
    assert positions(filled.read(Query.of(tags={"issueId": "1", "prId": "7"}))) == []
    assert positions(filled.read(Query.of(tags={"issueId": "u1"}))) == []
    assert positions(filled.read(Query.of(tags={"issueid": "1"}))) == []


def test_types_and_tags_are_anded_within_an_item(filled: EventStore) -> None:
    query = Query.of(types=["IssueOpened"], tags={"userId": "u1"})
    assert positions(filled.read(query)) == [1, 3]
    query = Query.of(types=["IssueOpened", "IssueCommented"], tags={"issueId": "1"})
    assert positions(filled.read(query)) == [1, 6]
    assert positions(filled.read(Query.of(types=["PrMerged"], tags={"userId": "u1"}))) == []


def test_items_are_ored(filled: EventStore) -> None:
    query = Query((QueryItem(("PrMerged",)), QueryItem(tags={"issueId": "2"})))
    assert positions(filled.read(query)) == [3, 4]
    # events matched by several items come back once
    query = Query((QueryItem(tags={"issueId": "1"}), QueryItem(tags={"userId": "u1"})))
    assert positions(filled.read(query)) == [1, 2, 3, 6]
    query = Query((QueryItem(("Unknown",)), QueryItem(tags={"prId": "8"})))
    assert positions(filled.read(query)) == []


def test_an_item_without_types_or_tags_matches_all(filled: EventStore) -> None:
    assert positions(filled.read(Query((QueryItem(),)))) == ALL
    query = Query((QueryItem(("Unknown",), {"no": "such"}), QueryItem()))
    assert positions(filled.read(query)) == ALL
    assert positions(filled.read(Query((QueryItem(),)), after=4)) == [5, 6]
    with pytest.raises(EventStoreError) as info:
        filled.append(DomainEvent("X"), AppendCondition(Query((QueryItem(),)), after=5))
    assert info.value.code == APPEND_CONDITION_FAILED


def test_store_agrees_with_query_matches(filled: EventStore) -> None:
    """The SQL predicate and `Query.matches` (used inside a group commit) agree."""
    everything = list(filled.read())
    items = [
        QueryItem(),
        QueryItem(("IssueOpened",)),
        QueryItem(("IssueOpened", "PrMerged")),
        QueryItem(tags={"userId": "u2"}),
        QueryItem(tags={"issueId": "1", "userId": "u2"}),
        QueryItem(("IssueOpened",), {"issueId": "2"}),
        QueryItem(("Unknown",)),
        QueryItem(tags={"prId": "7", "userId": "u1"}),
    ]
    queries = [Query()] + [Query((item,)) for item in items]
    queries += [Query((a, b)) for a in items[1:] for b in items[1:] if a is not b]
    for query in queries:
        expected = [e.position for e in everything if query.matches(e.event_type, e.tags)]
        for after in (0, 3):
            got = positions(filled.read(query, after=after))
            assert got == [p for p in expected if p > after], query


# -- append conditions -----------------------------------------------------------------------


def test_after_is_exclusive(filled: EventStore) -> None:
    assert positions(filled.read(after=2)) == [3, 4, 5, 6]
    assert positions(filled.read(Query.of(tags={"issueId": "1"}), after=1)) == [2, 6]
    assert positions(filled.read(Query.of(tags={"issueId": "1"}), after=6)) == []
    issue2 = Query.of(tags={"issueId": "2"})  # matches position 3 only
    expect_error(
        APPEND_CONDITION_FAILED,
        lambda: filled.append(DomainEvent("X"), AppendCondition(issue2, after=2)),
    )
    assert filled.append(DomainEvent("X"), AppendCondition(issue2, after=3)) == 7
    everything = Query()
    expect_error(
        APPEND_CONDITION_FAILED,
        lambda: filled.append(DomainEvent("Y"), AppendCondition(everything, after=6)),
    )
    assert filled.append(DomainEvent("Y"), AppendCondition(everything, after=7)) == 8


def test_condition_without_after_fails_on_any_match(filled: EventStore) -> None:
    for query in (
        Query.of(types=["IssueOpened"]),  # the first event
        Query.of(types=["PrMerged"]),  # one in the middle
        Query.of(tags={"issueId": "1", "userId": "u2"}),  # the last one
        Query(),
    ):
        error = expect_error(
            APPEND_CONDITION_FAILED,
            lambda q=query: filled.append(
                DomainEvent("X", tags={"issueId": "1"}), AppendCondition(q)
            ),
        )
        assert error.context["after"] is None
    assert filled.head() == 6


def test_condition_that_does_not_match_passes(filled: EventStore) -> None:
    cases = [
        AppendCondition(Query.of(types=["Unknown"])),
        AppendCondition(Query.of(tags={"issueId": "1", "prId": "7"})),
        AppendCondition(Query.of(types=["PrMerged"], tags={"userId": "u1"})),
        AppendCondition(Query((QueryItem(("Unknown",)), QueryItem(tags={"issueId": "3"})))),
        AppendCondition(Query.of(tags={"issueId": "1"}), after=6),
    ]
    for expected, condition in enumerate(cases, 7):
        assert filled.append(DomainEvent("New", tags={"issueId": "9"}), condition) == expected
    assert positions(filled.read(Query.of(types=["New"]))) == [7, 8, 9, 10, 11]


def test_failed_condition_writes_nothing(filled: EventStore) -> None:
    batch = [DomainEvent("A", tags={"issueId": "1"}), DomainEvent("B"), DomainEvent("C")]
    condition = AppendCondition(Query.of(tags={"issueId": "1"}), after=2)
    for call in (
        lambda: filled.append_batch(batch, condition),
        lambda: filled.append(batch[0], condition),
    ):
        error = expect_error(APPEND_CONDITION_FAILED, call)
        assert error.context["after"] == 2
        assert filled.head() == 6
        result = filled.read()
        assert positions(result) == ALL
        assert result.head == 6
        for event in batch:
            assert filled.get_event(event.event_id) is None
    # the same events go in once the condition holds
    assert filled.append_batch(batch, AppendCondition(condition.fail_if_events_match, 6)) == 9
    assert [filled.get_event(e.event_id).position for e in batch] == [7, 8, 9]  # type: ignore[union-attr]


def test_positions_start_at_one_and_are_gapless(store: EventStore) -> None:
    assert store.head() == 0
    assert store.append(DomainEvent("A")) == 1
    assert store.append_batch([DomainEvent("B"), DomainEvent("C"), DomainEvent("D")]) == 4
    assert store.append_batch([DomainEvent("E")]) == 5
    with pytest.raises(EventStoreError):
        store.append(DomainEvent("F"), AppendCondition(Query()))
    assert store.append(DomainEvent("G")) == 6
    result = store.read()
    assert positions(result) == [1, 2, 3, 4, 5, 6]
    assert [e.event_type for e in result] == ["A", "B", "C", "D", "E", "G"]


# -- read order, limit, head -----------------------------------------------------------------


def test_backwards_and_limit(filled: EventStore) -> None:
    assert positions(filled.read(backwards=True)) == [6, 5, 4, 3, 2, 1]
    assert positions(filled.read(limit=2)) == [1, 2]
    assert positions(filled.read(limit=2, backwards=True)) == [6, 5]
    assert positions(filled.read(limit=100)) == ALL
    assert positions(filled.read(limit=1)) == [1]
    issue1 = Query.of(tags={"issueId": "1"})
    assert positions(filled.read(issue1, backwards=True)) == [6, 2, 1]
    assert positions(filled.read(issue1, limit=2)) == [1, 2]
    assert positions(filled.read(issue1, limit=2, backwards=True)) == [6, 2]
    assert positions(filled.read(issue1, after=1, limit=1)) == [2]
    assert positions(filled.read(issue1, after=1, backwards=True)) == [6, 2]
    assert positions(filled.read(after=2, limit=2, backwards=True)) == [6, 5]
    assert positions(filled.read(after=5, limit=3, backwards=True)) == [6]


def test_paging_with_limit_visits_everything_once(filled: EventStore) -> None:
    seen: list[int] = []
    after = 0
    while True:
        page = filled.read(after=after, limit=4)
        if not page:
            assert page.head is None
            break
        seen += positions(page)
        assert page.head == page[-1].position
        after = page.head
    assert seen == ALL


def test_head_follows_the_rules(filled: EventStore) -> None:
    # without a limit: the store's last position, whatever matched
    assert filled.read().head == 6
    assert filled.read(Query.of(types=["IssueClosed"])).head == 6
    assert filled.read(Query.of(types=["Unknown"])).head == 6
    assert filled.read(backwards=True).head == 6
    # with a limit: the newest position returned
    assert filled.read(Query.of(types=["IssueClosed"]), limit=10).head == 2
    assert filled.read(limit=3).head == 3
    assert filled.read(limit=3, backwards=True).head == 6
    assert filled.read(Query.of(tags={"issueId": "1"}), limit=2, backwards=True).head == 6
    assert filled.read(Query.of(tags={"userId": "u1"}), limit=5, backwards=True).head == 3
    # ... or None when nothing was returned
    assert filled.read(Query.of(types=["Unknown"]), limit=10).head is None
    assert filled.read(limit=0).head is None
    assert list(filled.read(limit=0)) == []
    assert filled.read(limit=0, backwards=True).head is None


def test_head_of_an_empty_store(store: EventStore) -> None:
    result = store.read()
    assert list(result) == []
    assert result.head == 0
    assert store.read(Query.of(types=["X"])).head == 0
    assert store.read(backwards=True).head == 0
    assert store.read(limit=5).head is None
    assert store.read(limit=0).head is None
    assert store.head() == 0
    # a condition built from that head lets the first append in
    assert store.append(DomainEvent("X"), AppendCondition(Query(), after=result.head)) == 1


def test_read_after_the_head_returns_nothing(filled: EventStore) -> None:
    for after in (6, 7, 1000, 2**62):
        result = filled.read(after=after)
        assert list(result) == []
        assert result.head == 6
        assert list(filled.read(after=after, backwards=True)) == []
        assert filled.read(after=after, limit=3).head is None


# -- argument errors -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"limit": -1},
        {"limit": -100},
        {"after": -1},
        {"after": -(2**40)},
        {"query": "issueId=1"},
        {"query": [QueryItem()]},
        {"query": QueryItem()},
        {"query": {"items": []}},
        {"query": Query(("not an item",))},  # type: ignore[arg-type]
    ],
)
def test_bad_read_arguments_raise_query_error(filled: EventStore, kwargs: dict[str, Any]) -> None:
    expect_error(QUERY_ERROR, lambda: filled.read(**kwargs))


@pytest.mark.parametrize(
    "condition",
    [
        AppendCondition(Query.of(types=["X"]), after=-1),
        AppendCondition("types=X"),  # type: ignore[arg-type]
        AppendCondition([QueryItem()]),  # type: ignore[arg-type]
        AppendCondition(Query(("not an item",))),  # type: ignore[arg-type]
    ],
)
def test_bad_conditions_raise_query_error_and_write_nothing(
    filled: EventStore, condition: AppendCondition
) -> None:
    event = DomainEvent("X")
    expect_error(QUERY_ERROR, lambda: filled.append(event, condition))
    assert filled.head() == 6
    assert filled.get_event(event.event_id) is None
    assert filled.append(event) == 7


# -- hostile tag keys and values -------------------------------------------------------------

HOSTILE = [
    "'",
    "''",
    '"',
    "\\",
    "\\\\",
    '\\"',
    "';",
    "' OR '1'='1",
    "'; DROP TABLE events; --",
    "x'); DELETE FROM head; --",
    "--",
    "/* comment */",
    "%s",
    "%(name)s",
    "$1",
    "$.a[0]",
    "$.**",
    "$ ? (@ == 1)",
    "lax $.a",
    "@>",
    '{"a": 1}',
    "[1, 2]",
    "null",
    "true",
    " ",
    "\t\n\r",
    "\u00e9",  # precomposed
    "e\u0301",  # decomposed: a different string
    "\u202egnp.exe",
    "\U0001f600\U0001f4a9",
    "\u4e2d\u6587",
    "\u05e9\u05dc\u05d5\u05dd",
    "\ufeffbom",
    "\x01\x1f\x7f",
    "\u2028\u2029",
    "\ud83d\ude00".encode("utf-16", "surrogatepass").decode("utf-16"),
    "k" * 128,
    "v" * 50_000,
]


def test_hostile_tags_are_matched_exactly(store: EventStore) -> None:
    stored: list[tuple[str, str, int]] = []
    for value in HOSTILE:
        key = value[:128]
        # the hostile string as a value under a plain key, and as a key with a plain value
        for tag_key, tag_value in (("k", value), (key, "v")):
            position = store.append(DomainEvent("Hostile", {"v": value}, {tag_key: tag_value}))
            stored.append((tag_key, tag_value, position))
    # near misses, which exact matching must tell apart
    store.append(DomainEvent("Hostile", tags={"k": "' or '1'='1"}))
    store.append(DomainEvent("Hostile", tags={"k": "v" * 49_999}))
    head = store.head()
    assert head == len(stored) + 2

    for tag_key, tag_value, position in stored:
        query = Query.of(tags={tag_key: tag_value})
        expected = [p for k, v, p in stored if k == tag_key and v == tag_value]
        assert positions(store.read(query)) == expected, (tag_key, tag_value)
        assert expected[0] == position
        event = store.read(query)[0]
        assert event.tags == {tag_key: tag_value}
        # as a condition: fails on the match, passes after it
        with pytest.raises(EventStoreError) as info:
            store.append(DomainEvent("X"), AppendCondition(query, after=position - 1))
        assert info.value.code == APPEND_CONDITION_FAILED
    assert store.head() == head

    # hostile strings as event types are exact too
    for value in HOSTILE[:20]:
        store.append(DomainEvent(value[:255], tags={"t": "1"}))
        [event] = store.read(Query.of(types=[value[:255]]))
        assert event.event_type == value[:255]
    assert positions(store.read(Query.of(types=[HOSTILE[0], HOSTILE[1]]))) == [head + 1, head + 2]
    # ... and reach a condition's check intact: alone, beside another type, with a tag
    for value in HOSTILE[:20]:
        [event] = store.read(Query.of(types=[value[:255]]))
        for types in ([value[:255]], ["Other", value[:255]]):
            for tags in (None, {"t": "1"}):
                condition = AppendCondition(
                    Query.of(types=types, tags=tags), after=event.position - 1
                )
                with pytest.raises(EventStoreError) as info:
                    store.append(DomainEvent("X"), condition)
                assert info.value.code == APPEND_CONDITION_FAILED, (value, types, tags)

    # strings nobody stored match nothing, and nothing was dropped or rewritten
    for query in (
        Query.of(tags={"k": "x' OR 'x'='x"}),
        Query.of(tags={"k": "*"}),
        Query.of(tags={"k": "%"}),
        Query.of(tags={"k": "_"}),
        Query.of(tags={"$.k": "v"}),
        Query.of(types=["%"]),
        Query.of(types=["' OR 'a'='a"]),
    ):
        assert list(store.read(query)) == [], query
    assert len(store.read()) == head + 20


@pytest.mark.parametrize(
    "query",
    [
        Query.of(tags={"k": "a\x00b"}),
        Query.of(tags={"a\x00b": "v"}),
        Query.of(types=["A\x00"]),
        Query.of(tags={"k": "lone \ud800 surrogate"}),
        Query.of(types=["lone \udfff"]),
    ],
    ids=["nul-value", "nul-key", "nul-type", "surrogate-value", "surrogate-type"],
)
def test_query_strings_no_event_can_hold(filled: EventStore, query: Query) -> None:
    """No stored event can carry a NUL or a lone surrogate (validation rejects them), so such a
    query matches nothing or is refused as a QUERY_ERROR; it must not surface as a storage
    failure or as a raw exception."""
    try:
        result = filled.read(query)
    except EventStoreError as exc:
        assert exc.code == QUERY_ERROR, exc
    else:
        assert list(result) == []
    event = DomainEvent("X")
    try:
        position = filled.append(event, AppendCondition(query))
    except EventStoreError as exc:
        assert exc.code == QUERY_ERROR, exc
        assert filled.get_event(event.event_id) is None
    else:
        assert position == 7
    assert filled.append(DomainEvent("Y")) == filled.head()


# -- transactions ----------------------------------------------------------------------------


def test_transaction_commits_its_appends_together(store: EventStore) -> None:
    store.append(DomainEvent("Before"))
    a, b = DomainEvent("A", tags={"order": "1"}), DomainEvent("B", tags={"order": "1"})
    with store.transaction() as tx:
        assert tx.append(a) == 2
        assert tx.append_batch([b, DomainEvent("C")]) == 4
    assert store.head() == 4
    assert [e.event_type for e in store.read()] == ["Before", "A", "B", "C"]
    assert store.get_event(a.event_id).position == 2  # type: ignore[union-attr]
    assert store.get_event(b.event_id).position == 3  # type: ignore[union-attr]
    # the head (and the chain) continue after the transaction
    assert store.append(DomainEvent("After")) == 5


def test_exception_in_transaction_rolls_back_everything(store: EventStore) -> None:
    store.append(DomainEvent("Before"))
    a, b = DomainEvent("A"), DomainEvent("B")

    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        with store.transaction() as tx:
            tx.append(a)
            tx.append(b)
            raise Boom
    assert store.head() == 1
    assert positions(store.read()) == [1]
    assert store.get_event(a.event_id) is None
    assert store.get_event(b.event_id) is None
    assert store.append(a) == 2


def test_condition_in_transaction_sees_earlier_appends(store: EventStore) -> None:
    store.append(DomainEvent("Other"))
    head = store.read().head
    course = Query.of(tags={"courseId": "c1"})
    first = DomainEvent("CourseDefined", tags={"courseId": "c1"})
    second = DomainEvent("CourseDefined", tags={"courseId": "c1"})
    with store.transaction() as tx:
        assert tx.append(first, AppendCondition(course, after=head)) == 2
        with pytest.raises(EventStoreError) as info:
            tx.append(second, AppendCondition(course, after=head))
        assert info.value.code == APPEND_CONDITION_FAILED
        with pytest.raises(EventStoreError) as info:
            tx.append(second, AppendCondition(course))
        assert info.value.code == APPEND_CONDITION_FAILED
        # a condition after the block's own append passes, and the block goes on
        assert tx.append(DomainEvent("Unrelated"), AppendCondition(course, after=2)) == 3
    assert positions(store.read(course)) == [2]
    assert store.get_event(second.event_id) is None
    assert store.head() == 3


def test_reads_in_transaction_see_own_appends(store: EventStore) -> None:
    store.append(DomainEvent("Before", tags={"k": "1"}))
    a = DomainEvent("A", tags={"k": "1"})
    with store.transaction() as tx:
        assert positions(tx.read()) == [1]
        tx.append(a)
        tx.append_batch([DomainEvent("B"), DomainEvent("C", tags={"k": "1"})])
        result = tx.read()
        assert positions(result) == [1, 2, 3, 4]
        assert result.head == 4
        assert positions(tx.read(Query.of(tags={"k": "1"}))) == [1, 2, 4]
        assert positions(tx.read(after=2, backwards=True)) == [4, 3]
        assert tx.read(limit=2, after=1).head == 3
        assert tx.read(Query.of(types=["A"])).head == 4
        # other connections do not see the uncommitted events
        outside = store.read()
        assert positions(outside) == [1]
        assert outside.head == 1
        assert store.get_event(a.event_id) is None
    assert positions(store.read()) == [1, 2, 3, 4]
    assert store.read().head == 4
