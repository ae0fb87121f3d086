"""Snapshots and `project`: a state folded from the log, saved at a position, and folding only
what follows it gives what folding the whole log gives."""

from __future__ import annotations

import random
from typing import Any

import msgspec
import pytest

from tamma_events import DomainEvent, EventStore, EventStoreError, Projection, Query, SequencedEvent

QUERY = Query.of(types=["Opened", "Closed"], tags={"team": "core"})


class Tally(msgspec.Struct):
    opened: int = 0
    closed: int = 0
    last_issue: str | None = None


def tally(state: Tally, event: SequencedEvent) -> Tally:
    if event.event_type == "Opened":
        return Tally(state.opened + 1, state.closed, event.data["issue"])
    return Tally(state.opened, state.closed + 1, event.data["issue"])


def by_issue(state: dict[str, int], event: SequencedEvent) -> dict[str, int]:
    issue = event.data["issue"]
    return {**state, issue: state.get(issue, 0) + (1 if event.event_type == "Opened" else -1)}


def _events(rng: random.Random, count: int) -> list[DomainEvent]:
    return [
        DomainEvent(
            rng.choice(["Opened", "Closed", "Commented"]),
            {"issue": f"I-{rng.randrange(6)}"},
            {"team": rng.choice(["core", "web"])},
        )
        for _ in range(count)
    ]


def _matching(store: EventStore) -> list[SequencedEvent]:
    return list(store.read(QUERY))


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_project_with_snapshots_equals_project_without(store: EventStore, seed: int) -> None:
    rng = random.Random(seed)
    store.append_batch(_events(rng, 300))
    whole = store.project(QUERY, Tally(), tally)
    snapped = store.project(QUERY, Tally(), tally, key="tally", snapshot_every=17)
    assert snapped == whole
    matching = _matching(store)
    expected = Tally(
        sum(e.event_type == "Opened" for e in matching),
        sum(e.event_type == "Closed" for e in matching),
        matching[-1].data["issue"],
    )
    assert whole.state == expected and whole.head == store.head()

    # Snapshots were saved every 17 folded events, at the position of the 17th, 34th, ...
    snapshot = store.get_snapshot("tally", state_type=Tally)
    assert snapshot is not None
    assert snapshot.version == matching[(len(matching) // 17) * 17 - 1].position

    # More events: starting from the snapshot folds only what follows it, to the same state.
    store.append_batch(_events(rng, 200))
    for _ in range(2):  # the second run starts from the snapshots the first one saved
        resumed = store.project(QUERY, Tally(), tally, key="tally", snapshot_every=17)
        assert resumed == store.project(QUERY, Tally(), tally)


def test_project_folds_only_the_events_after_the_snapshot(store: EventStore) -> None:
    store.append_batch(_events(random.Random(7), 120))
    store.project(QUERY, {}, by_issue, key="open", snapshot_every=5)
    snapshot = store.get_snapshot("open", state_type=dict[str, int])
    assert snapshot is not None
    seen: list[int] = []

    def counting(state: dict[str, int], event: SequencedEvent) -> dict[str, int]:
        seen.append(event.position)
        return by_issue(state, event)

    result = store.project(QUERY, {}, counting, key="open")
    assert seen == [e.position for e in _matching(store) if e.position > snapshot.version]
    assert result == store.project(QUERY, {}, by_issue)


def test_an_empty_log_projects_the_initial_state(store: EventStore) -> None:
    assert store.project(None, 0, lambda n, _: n + 1) == Projection(0, 0)
    store.append_batch(_events(random.Random(3), 10))
    assert store.project(None, 0, lambda n, _: n + 1, batch_size=3) == Projection(10, 10)


def test_the_latest_version_wins_and_a_version_can_be_saved_again(store: EventStore) -> None:
    store.append_batch(_events(random.Random(5), 30))
    assert store.get_snapshot("a") is None
    store.create_snapshot("a", 20, {"v": 20})
    store.create_snapshot("a", 10, {"v": 10})
    saved = store.get_snapshot("a")
    assert saved is not None and (saved.version, saved.state) == (20, {"v": 20})
    store.create_snapshot("a", 20, {"v": "again"})
    saved = store.get_snapshot("a")
    assert saved is not None and saved.state == {"v": "again"}
    store.create_snapshot("a", 0, [1, 2.5, None, "ü"])  # version 0: before any event
    store.create_snapshot("b", 30, Tally(3, 1, "I-1"))
    tally_snapshot = store.get_snapshot("b", state_type=Tally)
    assert tally_snapshot is not None and tally_snapshot.state == Tally(3, 1, "I-1")
    assert store.get_snapshot("a") == saved  # another key's snapshot changes nothing here


@pytest.mark.parametrize(
    ("aggregate_id", "version", "state", "field"),
    [
        ("a", -1, {}, "version"),
        ("a", True, {}, "version"),
        ("a", 1.0, {}, "version"),
        ("a", 11, {}, "version"),  # beyond the head
        ("a", 5, object(), "state"),
        ("a", 5, {"text": "a\x00b"}, "state"),
        ("", 5, {}, "aggregate_id"),
        ("x" * 256, 5, {}, "aggregate_id"),
        (7, 5, {}, "aggregate_id"),
        ("a\x00", 5, {}, "aggregate_id"),
    ],
)
def test_bad_snapshots_are_refused_and_save_nothing(
    store: EventStore, aggregate_id: Any, version: Any, state: Any, field: str
) -> None:
    store.append_batch(_events(random.Random(9), 10))
    with pytest.raises(EventStoreError) as raised:
        store.create_snapshot(aggregate_id, version, state)
    error = raised.value
    assert error.code in ("VALIDATION_FAILED", "QUERY_ERROR")
    assert error.context["field"] == field
    assert store.get_snapshot("a") is None


def test_a_snapshot_of_another_type_is_a_query_error(store: EventStore) -> None:
    store.append(DomainEvent("Opened", {"issue": "I-1"}, {"team": "core"}))
    store.create_snapshot("t", 1, {"not": "a tally"})
    with pytest.raises(EventStoreError) as raised:
        store.get_snapshot("t", state_type=int)
    assert raised.value.code == "QUERY_ERROR" and raised.value.context["version"] == 1


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"key": "k", "snapshot_every": 0}, "snapshot_every"),
        ({"key": "k", "snapshot_every": True}, "snapshot_every"),
        ({"snapshot_every": 5}, "key"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_bad_projection_options(store: EventStore, kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(EventStoreError) as raised:
        store.project(QUERY, Tally(), tally, **kwargs)
    assert raised.value.code == "QUERY_ERROR" and raised.value.context["field"] == field
