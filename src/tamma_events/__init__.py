"""tamma-events: a DCB event store on PostgreSQL with a native hot path."""

from ._codec import IMPL as __impl__
from .aio import AsyncEventStore, AsyncTransaction
from .cache import CacheStats, QueryCache
from .errors import (
    APPEND_CONDITION_FAILED,
    DUPLICATE_EVENT,
    QUERY_ERROR,
    STORAGE_ERROR,
    VALIDATION_FAILED,
    AppendConditionFailed,
    DuplicateEvent,
    ErrorCode,
    EventStoreError,
    QueryError,
    StorageError,
    ValidationFailed,
)
from .filters import AggregateRow, EventFilter, Page
from .model import (
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
from .store import EventStore, Transaction
from .stream import Subscription

__version__ = "0.1.0"

__all__ = [
    "APPEND_CONDITION_FAILED",
    "DUPLICATE_EVENT",
    "QUERY_ERROR",
    "STORAGE_ERROR",
    "VALIDATION_FAILED",
    "AggregateRow",
    "AppendCondition",
    "AppendConditionFailed",
    "AsyncEventStore",
    "AsyncTransaction",
    "CacheStats",
    "DomainEvent",
    "DuplicateEvent",
    "ErrorCode",
    "EventFilter",
    "EventStore",
    "EventStoreError",
    "Page",
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
    "Transaction",
    "TypeStats",
    "ValidationFailed",
    "__impl__",
    "__version__",
    "new_event_id",
]
