"""The two stores: `tamma_events.stores.aio.AsyncEventStore`, written for asyncio, and
`tamma_events.stores.store.EventStore`, generated from it by ``scripts/async_to_sync.py``.

They share `tamma_events.stores.core.StoreCore` (settings, and the operations of
`tamma_events.ops`), group commit (`tamma_events.stores.group_async`, and `group` generated
from it), the query cache and the metrics. Import them from `tamma_events`.
"""
