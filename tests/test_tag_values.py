"""`get_tag_values`: one key's values by prefix, in pages, with their counts, read through the
tag summary's index (migration 0011), the events not yet folded included."""

from __future__ import annotations

import asyncio
import hashlib
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from tamma_events import (
    AsyncEventStore,
    DomainEvent,
    EventStore,
    QueryError,
    TagValue,
    TagValuesPage,
)

VALUES = [
    "alpha",
    "alpine",
    "al",
    "beta",
    "Beta",
    "ß",
    "é",
    "zeta",
    "\U0010ffff",
    "a\U0010ffff",
    "a\U0010ffffb",
    "\ud7ffx",
    "\ue000",
    "",
    "x" * 200 + "1",
    "x" * 200 + "2",
    "x" * 200,
    "x" * 199,
]


def _events() -> list[DomainEvent]:
    events = []
    for n, value in enumerate(VALUES):
        for copy in range(n % 3 + 1):
            events.append(DomainEvent("T", {"n": n, "copy": copy}, {"k": value, "other": "o"}))
    return events


def _order(value: str) -> tuple[str, bytes]:
    """The documented order: the first 200 characters by code point, then the SHA-256."""
    return value[:200], hashlib.sha256(value.encode()).digest()


def _expected(prefix: str = "") -> list[TagValue]:
    counts = Counter(event.tags["k"] for event in _events())
    return [
        TagValue(value, counts[value])
        for value in sorted(counts, key=_order)
        if value.startswith(prefix)
    ]


def _walk(store: EventStore, key: str, prefix: str, page_size: int) -> list[TagValue]:
    got: list[TagValue] = []
    token = None
    while True:
        page = store.get_tag_values(key, prefix=prefix, page_size=page_size, token=token)
        assert isinstance(page, TagValuesPage)
        assert len(page.values) <= page_size
        got += page.values
        if page.next_token is None:
            return got
        assert len(page.values) == page_size
        token = page.next_token


@pytest.mark.parametrize("page_size", [1, 2, 5, 1000])
@pytest.mark.parametrize("prefix", ["", "al", "a", "alp", "x" * 200, "x" * 201, "\U0010ffff", "zz"])
def test_a_walk_returns_every_value_once_in_order(
    store: EventStore, page_size: int, prefix: str
) -> None:
    store.append_batch(_events())
    store.fold_summaries()
    assert _walk(store, "k", prefix, page_size) == _expected(prefix)


def test_counts_include_the_events_not_yet_folded(store: EventStore) -> None:
    store.append_batch(_events())
    store.fold_summaries()
    store.append_batch([DomainEvent("T", tags={"k": "alpha"}), DomainEvent("T", tags={"k": "new"})])
    page = store.get_tag_values("k", prefix="alpha")
    assert page.values == [TagValue("alpha", 2)]
    assert TagValue("new", 1) in store.get_tag_values("k").values
    store.fold_summaries()
    assert store.get_tag_values("k", prefix="alpha").values == [TagValue("alpha", 2)]
    assert store.get_tag_values("other").values == [TagValue("o", len(_events()))]
    assert store.get_tag_values("missing").values == []


def test_values_stay_listed_after_their_events_are_compacted(
    store: EventStore, tmp_path: Path
) -> None:
    store.append_batch(_events())
    cut = store.get_events()[-1].recorded_at + timedelta(microseconds=1)
    while datetime.now(timezone.utc) <= cut:
        pass
    assert store.compact_events(cut, archive_dir=tmp_path) == len(_events())
    assert _walk(store, "k", "", 4) == _expected()


def test_the_whole_listing_agrees(store: EventStore) -> None:
    store.append_batch(_events())
    listing = store.get_tags()
    assert sorted(listing["k"]) == sorted(value.value for value in _walk(store, "k", "", 3))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"key": ""}, "key"),
        ({"key": "k" * 129}, "key"),
        ({"key": 1}, "key"),
        ({"key": "k\x00"}, "key"),
        ({"key": "k", "prefix": None}, "prefix"),
        ({"key": "k", "prefix": "\ud800"}, "prefix"),
        ({"key": "k", "page_size": 0}, "page_size"),
        ({"key": "k", "page_size": 100_001}, "page_size"),
        ({"key": "k", "token": "not a token!"}, "token"),
        ({"key": "k", "token": 5}, "token"),
    ],
)
def test_bad_arguments_are_query_errors(
    store: EventStore, kwargs: dict[str, object], field: str
) -> None:
    with pytest.raises(QueryError) as raised:
        store.get_tag_values(**kwargs)  # type: ignore[arg-type]
    assert raised.value.context["field"] == field


def test_a_token_belongs_to_its_key_and_prefix(store: EventStore) -> None:
    store.append_batch(_events())
    token = store.get_tag_values("k", prefix="al", page_size=1).next_token
    assert token is not None
    for key, prefix in (("other", "al"), ("k", "a"), ("k", "")):
        with pytest.raises(QueryError, match="different key or prefix"):
            store.get_tag_values(key, prefix=prefix, page_size=1, token=token)
    assert store.get_tag_values("k", prefix="al", token=token).values == _expected("al")[1:]


def test_the_async_store_pages_alike(store: EventStore, pg_dsn: str) -> None:
    store.append_batch(_events())

    async def walk() -> list[TagValue]:
        async with AsyncEventStore(pg_dsn, schema=store.schema) as aio:
            got: list[TagValue] = []
            token = None
            while True:
                page = await aio.get_tag_values("k", page_size=4, token=token)
                got += page.values
                if page.next_token is None:
                    return got
                token = page.next_token

    assert asyncio.run(walk()) == _expected()
