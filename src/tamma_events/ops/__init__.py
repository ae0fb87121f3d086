"""The store's database work, by concern, and the drivers that do its I/O.

Each operation is a generator of steps (`tamma_events.ops.steps`) that never touches a
connection; `tamma_events.ops.drive_async.run_async` and `tamma_events.ops.drive.run` (generated
from it) do the steps on an async or a sync psycopg connection.

- `tamma_events.ops.appending`: validate and encode a batch, check its condition under the head
  lock, write it (append function or binary COPY), alone, in a group, or in a caller's
  transaction.
- `tamma_events.ops.reading`: DCB reads, queries, summaries, pages, keyset walks, snapshots and
  projections.
- `tamma_events.ops.exporting`: batches of the log as Arrow record batches, by binary COPY.
- `tamma_events.ops.archiving`: compaction into Parquet archives, and reading them back.
- `tamma_events.ops.verifying`: the hash chain, recomputed.
- `tamma_events.ops.replicas`: which replica may answer, and how far behind it is.
"""
