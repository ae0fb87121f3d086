"""`EventStore.stats` and `AsyncEventStore.stats`: the figures of ``tamma-events stats``."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime, timezone

import msgspec
import pytest

from tamma_events import DomainEvent, EventStore, EventStoreError, StoreStats
from tamma_events.sql.schema import migrations
from tamma_events.stores.aio import AsyncEventStore


def test_stats_count_the_log_per_type_and_agree_across_stores(
    pg_dsn: str, store: EventStore
) -> None:
    early = datetime(2026, 1, 1, tzinfo=timezone.utc)
    late = datetime(2026, 3, 1, tzinfo=timezone.utc)
    store.append_batch(
        [DomainEvent("A", tags={"k": "1"}, timestamp=early)]
        + [DomainEvent("B", tags={"k": str(i % 2), "j": "x"}, timestamp=late) for i in range(3)]
    )
    stats = store.stats()
    assert (stats.schema, stats.schema_version) == (store.schema, migrations()[-1].version)
    assert (stats.head, stats.events, stats.live_events, stats.archived_events) == (4, 4, 4, 0)
    assert [(t.event_type, t.count) for t in stats.event_types] == [("B", 3), ("A", 1)]
    assert (stats.first_timestamp, stats.last_timestamp) == (early, late)
    assert (stats.tag_keys, stats.tag_values) == (2, 3)  # k=0, k=1, j=x
    assert stats.table_bytes > 0 and stats.codec == store.impl
    assert stats.server_version.split(".")[0].isdigit()
    assert store.schema_version() == stats.schema_version

    async def read() -> StoreStats:
        async with AsyncEventStore(pg_dsn, schema=store.schema, migrate=False) as async_store:
            return await async_store.stats()

    # The table's size on disk may change between the reads (autovacuum writes its maps).
    again = asyncio.run(read())
    assert again.table_bytes > 0
    assert msgspec.structs.replace(again, table_bytes=0) == msgspec.structs.replace(
        stats, table_bytes=0
    )


def test_stats_of_a_schema_without_a_store_say_so(make_store: Callable[..., EventStore]) -> None:
    empty = make_store(schema="stats_nowhere", migrate=False)
    assert empty.schema_version() == 0
    with pytest.raises(EventStoreError) as caught:
        empty.stats()
    assert caught.value.code == "STORAGE_ERROR"
    assert "tamma-events init" in caught.value.message
    assert caught.value.context == {"schema": "stats_nowhere"}
