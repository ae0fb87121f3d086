"""tamma-events: a DCB event store on PostgreSQL with a native hot path."""

from tamma_events.codec import IMPL as __impl__
from tamma_events.errors import (
    APPEND_CONDITION_FAILED,
    CONSUMER_CONFLICT,
    DUPLICATE_EVENT,
    QUERY_ERROR,
    STORAGE_ERROR,
    VALIDATION_FAILED,
    AppendConditionFailed,
    ConsumerConflict,
    DuplicateEvent,
    ErrorCode,
    EventStoreError,
    QueryError,
    StorageError,
    ValidationFailed,
)
from tamma_events.filters import AggregateRow, EventFilter, Page, TagValue, TagValuesPage
from tamma_events.model import (
    AppendCondition,
    DomainEvent,
    Projection,
    Query,
    QueryItem,
    ReadResult,
    SequencedEvent,
    Snapshot,
    StoreStats,
    TypeStats,
    new_event_id,
)
from tamma_events.ops.cache import CacheStats, QueryCache
from tamma_events.ops.consuming import ConsumerState, ParkedEvent, PartitionState
from tamma_events.ops.verifying import IntegrityReport
from tamma_events.stores.aio import AsyncEventStore, AsyncTransaction
from tamma_events.stores.consumers import Consumer
from tamma_events.stores.consumers_async import AsyncConsumer
from tamma_events.stores.store import EventStore, Transaction
from tamma_events.streaming.subscriptions import Subscription

__version__ = "0.1.0"

__all__ = [
    "APPEND_CONDITION_FAILED",
    "CONSUMER_CONFLICT",
    "DUPLICATE_EVENT",
    "QUERY_ERROR",
    "STORAGE_ERROR",
    "VALIDATION_FAILED",
    "AggregateRow",
    "AppendCondition",
    "AppendConditionFailed",
    "AsyncConsumer",
    "AsyncEventStore",
    "AsyncTransaction",
    "CacheStats",
    "Consumer",
    "ConsumerConflict",
    "ConsumerState",
    "DomainEvent",
    "DuplicateEvent",
    "ErrorCode",
    "EventFilter",
    "EventStore",
    "EventStoreError",
    "IntegrityReport",
    "Page",
    "ParkedEvent",
    "PartitionState",
    "Projection",
    "Query",
    "QueryCache",
    "QueryError",
    "QueryItem",
    "ReadResult",
    "SequencedEvent",
    "Snapshot",
    "StorageError",
    "StoreStats",
    "Subscription",
    "TagValue",
    "TagValuesPage",
    "Transaction",
    "TypeStats",
    "ValidationFailed",
    "__impl__",
    "__version__",
    "new_event_id",
]
