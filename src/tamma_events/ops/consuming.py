"""Durable consumers' database work: checkpoints, leases, workers and parked events, as
operations (generators of steps) that the sync and the async store run alike. The consumer
itself, which reads and delivers events, is `tamma_events.stores.consumers_async`.

A consumer's rows (``sql/schema/0012_consumers.sql``): one per partition, holding its
checkpoint (every matching event of the partition up to ``position`` was handled or parked)
and its lease (``owner``, ``lease_until``, on the server's clock). A checkpoint moves only for
the worker that holds the partition and only from the position that worker read: a
compare-and-set, so that a worker whose lease was taken over moves nothing, and a transactional
handler's writes roll back with its checkpoint.
"""

from __future__ import annotations

import functools
import math
from datetime import datetime
from typing import Final

import msgspec
import psycopg.errors
from psycopg import sql

from tamma_events.checks import whole
from tamma_events.errors import ConsumerConflict, QueryError
from tamma_events.ops.steps import Op, Rollback, Run
from tamma_events.sql import BEGIN, COMMIT

__all__ = [
    "ConsumerState",
    "ConsumerStatements",
    "ParkedEvent",
    "PartitionState",
    "check_name",
    "check_partitions",
    "consumer_statements",
    "fair_share",
    "positive_seconds",
]

#: The most partitions a consumer may have.
MAX_PARTITIONS: Final = 1024
#: A transaction whose commit does not wait for the WAL flush (at-least-once checkpoints).
LAZY_COMMIT: Final = "SET LOCAL synchronous_commit TO OFF"
#: How long a reset or a drop that is not forced waits for a worker's row lock.
LOCK_PATIENCE: Final = "SET LOCAL lock_timeout = '2s'"
MAX_NAME_LENGTH: Final = 200


class PartitionState(msgspec.Struct, frozen=True, kw_only=True):
    """One partition of a consumer: its checkpoint, who holds it, and how far behind it is."""

    partition: int
    #: The checkpoint: every matching event of the partition up to here was handled or parked.
    position: int
    #: The worker holding its lease, if any is held now.
    owner: str | None
    lease_until: datetime | None
    updated_at: datetime
    #: The store's head minus the checkpoint: events of every kind and partition count.
    lag_positions: int
    #: Seconds since the first event after the checkpoint was recorded (0 when caught up; None
    #: when that event was compacted into an archive).
    lag_seconds: float | None


class ConsumerState(msgspec.Struct, frozen=True, kw_only=True):
    """A consumer as the store holds it (`EventStore.consumers`)."""

    name: str
    partition_key: str | None
    created_at: datetime
    partitions: list[PartitionState]
    #: The workers seen alive, by name.
    workers: list[str]
    #: How many events it parked (replayed ones are no longer counted).
    parked: int

    @property
    def lag_positions(self) -> int:
        """The largest lag of its partitions, in positions."""
        return max((p.lag_positions for p in self.partitions), default=0)

    @property
    def lag_seconds(self) -> float | None:
        """The largest lag of its partitions, in seconds (None when one is unknown)."""
        lags = [p.lag_seconds for p in self.partitions]
        if any(lag is None for lag in lags):
            return None
        return max((lag for lag in lags if lag is not None), default=0.0)


class ParkedEvent(msgspec.Struct, frozen=True, kw_only=True):
    """An event a consumer's handler kept failing on, set aside with its last error."""

    consumer: str
    position: int
    partition: int
    attempts: int
    error: str
    parked_at: datetime
    #: A replay was asked for and no worker has taken it yet.
    replay_requested: bool


def check_name(name: object) -> str:
    if not isinstance(name, str) or not 1 <= len(name) <= MAX_NAME_LENGTH or "\x00" in name:
        raise QueryError(
            f"a consumer's name is a string of 1 to {MAX_NAME_LENGTH} characters (no NUL),"
            f" not {name!r}"[:300],
            {"field": "name"},
        )
    return name


def check_partitions(partitions: object, partition_by: object) -> tuple[int, str | None]:
    if partition_by is not None and (not isinstance(partition_by, str) or not partition_by):
        raise QueryError("partition_by is a tag key or None", {"field": "partition_by"})
    count = whole(
        partitions,
        "partitions",
        f"an int from 1 to {MAX_PARTITIONS}",
        low=1,
        high=MAX_PARTITIONS,
        error=QueryError,
    )
    if partition_by is None and count != 1:
        raise QueryError(
            "a consumer with more than one partition needs partition_by, the tag key that"
            " splits its events",
            {"field": "partitions"},
        )
    return count, partition_by


def fair_share(partitions: int, workers: list[str], worker: str) -> int:
    """How many of ``partitions`` ``worker`` holds when ``workers`` (sorted, itself among
    them) share them: as many each, the first ones in order one more."""
    if worker not in workers:
        workers = sorted([*workers, worker])
    rank = workers.index(worker)
    return partitions // len(workers) + (1 if rank < partitions % len(workers) else 0)


def _seconds(value: float) -> str:
    return f"{max(value, 0.001):.3f} seconds"


class ConsumerStatements:
    """The statements of the consumers of one schema."""

    def __init__(self, schema: str) -> None:
        consumers = sql.Identifier(schema, "consumers")
        partitions = sql.Identifier(schema, "consumer_partitions")
        workers = sql.Identifier(schema, "consumer_workers")
        parked = sql.Identifier(schema, "parked_events")
        events = sql.Identifier(schema, "events")
        head = sql.Identifier(schema, "head")
        self.register = sql.SQL(
            "INSERT INTO {} (name, partitions, partition_key) VALUES (%s, %s, %s)"
            " ON CONFLICT (name) DO NOTHING"
        ).format(consumers)
        self.definition = sql.SQL(
            "SELECT partitions, partition_key FROM {} WHERE name = %s"
        ).format(consumers)
        self.add_partitions = sql.SQL(
            "INSERT INTO {} (consumer, partition, position)"
            " SELECT %s, p, %s FROM generate_series(0, %s - 1) AS p ON CONFLICT DO NOTHING"
        ).format(partitions)
        self.seen = sql.SQL(
            "INSERT INTO {} (consumer, worker, seen_until)"
            " VALUES (%s, %s, clock_timestamp() + %s::interval)"
            " ON CONFLICT (consumer, worker) DO UPDATE SET seen_until = excluded.seen_until"
        ).format(workers)
        # Rows locked by one of the worker's own transactions (a transactional handler's
        # checkpoint) are skipped: that transaction renews their lease itself.
        self.renew = sql.SQL(
            "UPDATE {p} SET lease_until = clock_timestamp() + %s::interval"
            " WHERE (consumer, partition) IN (SELECT consumer, partition FROM {p}"
            " WHERE consumer = %s AND owner = %s FOR UPDATE SKIP LOCKED)"
        ).format(p=partitions)
        self.forget_dead = sql.SQL(
            "DELETE FROM {} WHERE consumer = %s AND seen_until < clock_timestamp()"
        ).format(workers)
        self.alive = sql.SQL("SELECT worker FROM {} WHERE consumer = %s ORDER BY worker").format(
            workers
        )
        self.owned = sql.SQL(
            "SELECT partition, position FROM {} WHERE consumer = %s AND owner = %s"
            " ORDER BY partition"
        ).format(partitions)
        self.release = sql.SQL(
            "UPDATE {} SET owner = NULL, lease_until = NULL"
            " WHERE consumer = %s AND owner = %s AND partition = ANY(%s)"
        ).format(partitions)
        self.claim = sql.SQL(
            "UPDATE {p} SET owner = %s, lease_until = clock_timestamp() + %s::interval"
            " WHERE consumer = %s AND partition IN (SELECT partition FROM {p}"
            " WHERE consumer = %s AND partition < %s"
            " AND (owner IS NULL OR lease_until < clock_timestamp())"
            " ORDER BY partition LIMIT %s FOR UPDATE SKIP LOCKED)"
            " RETURNING partition, position"
        ).format(p=partitions)
        self.touch = sql.SQL(
            "UPDATE {} SET lease_until = clock_timestamp() + %s::interval"
            " WHERE consumer = %s AND partition = %s AND owner = %s"
        ).format(partitions)
        self.leave = sql.SQL(
            "WITH gone AS (DELETE FROM {} WHERE consumer = %s AND worker = %s)"
            " UPDATE {} SET owner = NULL, lease_until = NULL WHERE consumer = %s AND owner = %s"
        ).format(workers, partitions)
        self.advance = sql.SQL(
            "UPDATE {} AS c SET position = v.new, updated_at = now(),"
            " lease_until = clock_timestamp() + %s::interval"
            " FROM unnest(%s::int[], %s::bigint[], %s::bigint[]) AS v (partition, old, new)"
            " WHERE c.consumer = %s AND c.partition = v.partition AND c.owner = %s"
            " AND c.position = v.old RETURNING c.partition"
        ).format(partitions)
        self.park = sql.SQL(
            "WITH moved AS (UPDATE {} SET position = %s, updated_at = now()"
            " WHERE consumer = %s AND partition = %s AND owner = %s AND position = %s"
            " RETURNING 1)"
            " INSERT INTO {} (consumer, position, partition, attempts, error)"
            " SELECT %s, %s, %s, %s, %s FROM moved"
            " ON CONFLICT (consumer, position) DO UPDATE SET attempts = excluded.attempts,"
            " error = excluded.error, parked_at = now(), replay_requested = false"
            " RETURNING 1"
        ).format(partitions, parked)
        self.requested = sql.SQL(
            "SELECT position, partition FROM {} WHERE consumer = %s AND replay_requested"
            " AND partition = ANY(%s) ORDER BY position LIMIT %s"
        ).format(parked)
        self.replayed = sql.SQL(
            "DELETE FROM {} WHERE consumer = %s AND position = %s AND replay_requested RETURNING 1"
        ).format(parked)
        self.replay_failed = sql.SQL(
            "UPDATE {} SET attempts = attempts + %s, error = %s, parked_at = now(),"
            " replay_requested = false WHERE consumer = %s AND position = %s"
        ).format(parked)
        self.request_replay = sql.SQL(
            "UPDATE {} SET replay_requested = true WHERE consumer = %s"
            " AND (%s::bigint[] IS NULL OR position = ANY(%s)) RETURNING position"
        ).format(parked)
        self.parked = sql.SQL(
            "SELECT consumer, position, partition, attempts, error, parked_at, replay_requested"
            " FROM {} WHERE consumer = %s ORDER BY position"
        ).format(parked)
        # The consumer's partitions locked (after a claim, a renewal or a transactional batch
        # in progress), and how many of them are leased.
        self.leased = sql.SQL(
            "SELECT count(*) FILTER (WHERE owner IS NOT NULL AND lease_until > clock_timestamp())"
            " FROM (SELECT owner, lease_until FROM {} WHERE consumer = %s FOR UPDATE) AS held"
        ).format(partitions)
        self.reset = sql.SQL(
            "UPDATE {} SET position = %s, owner = NULL, lease_until = NULL, updated_at = now()"
            " WHERE consumer = %s"
        ).format(partitions)
        self.drop = sql.SQL(
            "WITH p AS (DELETE FROM {} WHERE consumer = %s),"
            " w AS (DELETE FROM {} WHERE consumer = %s),"
            " k AS (DELETE FROM {} WHERE consumer = %s)"
            " DELETE FROM {} WHERE name = %s"
        ).format(partitions, workers, parked, consumers)
        self.states = sql.SQL(
            "SELECT c.name, c.partition_key, c.created_at, p.partition, p.position,"
            " CASE WHEN p.lease_until > clock_timestamp() THEN p.owner END,"
            " CASE WHEN p.lease_until > clock_timestamp() THEN p.lease_until END, p.updated_at,"
            " greatest(h.position - p.position, 0),"
            " CASE WHEN h.position <= p.position THEN 0 ELSE extract(epoch FROM"
            " clock_timestamp() - (SELECT recorded_at FROM {events} e"
            " WHERE e.position = p.position + 1)) END,"
            " (SELECT array_agg(worker ORDER BY worker) FROM {workers} w"
            " WHERE w.consumer = c.name AND w.seen_until > clock_timestamp()),"
            " (SELECT count(*) FROM {parked} k WHERE k.consumer = c.name)"
            " FROM {consumers} c JOIN {partitions} p ON p.consumer = c.name, {head} h"
            " WHERE %s::text IS NULL OR c.name = %s ORDER BY c.name, p.partition"
        ).format(
            events=events,
            workers=workers,
            parked=parked,
            consumers=consumers,
            partitions=partitions,
            head=head,
        )

    # -- a worker's operations ---------------------------------------------------------------

    def op_register(
        self, name: str, partitions: int, partition_key: str | None, start: int
    ) -> Op[None]:
        """Create the consumer (its partitions' checkpoints at ``start``) unless it exists;
        refuse one that exists with other partitions."""
        yield Run(self.register, [name, partitions, partition_key], fetch="none")
        row = yield Run(self.definition, [name], fetch="one")
        if row is None:  # dropped between the two statements
            raise ConsumerConflict(f"consumer {name!r} was dropped while starting", {"name": name})
        if (int(row[0]), row[1]) != (partitions, partition_key):
            raise ConsumerConflict(
                f"consumer {name!r} exists with {row[0]} partition(s)"
                + (f" by tag {row[1]!r}" if row[1] else "")
                + f", not {partitions}"
                + (f" by tag {partition_key!r}" if partition_key else "")
                + ": drop it (`tamma-events consumers drop`) to change how it is split",
                {"name": name, "partitions": int(row[0]), "partition_key": row[1]},
            )
        yield Run(self.add_partitions, [name, start, partitions], fetch="none")

    def op_heartbeat(self, name: str, worker: str, lease: float) -> Op[None]:
        """The worker is alive, and keeps the partitions it holds for ``lease`` seconds more."""
        yield Run(self.seen, [name, worker, _seconds(lease)], fetch="none")
        yield Run(self.renew, [_seconds(lease), name, worker], fetch="none")

    def op_balance(
        self, name: str, worker: str, partitions: int, partition_key: str | None, lease: float
    ) -> Op[dict[int, int]]:
        """Take the worker's fair share of the partitions among the workers alive: release the
        ones beyond it, claim free or expired ones up to it. Returns the partitions it holds,
        with their checkpoints. A consumer dropped meanwhile, or dropped and made again with
        other partitions, is a `ConsumerConflict`: this worker would split its events wrong."""
        row = yield Run(self.definition, [name], fetch="one")
        if row is None:
            raise ConsumerConflict(f"consumer {name!r} was dropped", {"name": name})
        if (int(row[0]), row[1]) != (partitions, partition_key):
            raise ConsumerConflict(
                f"consumer {name!r} was dropped and made again with other partitions",
                {"name": name, "partitions": int(row[0]), "partition_key": row[1]},
            )
        yield from self.op_heartbeat(name, worker, lease)
        yield Run(self.forget_dead, [name], fetch="none")
        alive = [row[0] for row in (yield Run(self.alive, [name]))]
        share = fair_share(partitions, alive, worker)
        owned = {int(p): int(pos) for p, pos in (yield Run(self.owned, [name, worker]))}
        if len(owned) > share:
            excess = sorted(owned)[share:]
            yield Run(self.release, [name, worker, excess], fetch="none")
            for partition in excess:
                del owned[partition]
        elif len(owned) < share:
            claimed = yield Run(
                self.claim, [worker, _seconds(lease), name, name, partitions, share - len(owned)]
            )
            owned.update({int(p): int(pos) for p, pos in claimed})
        return owned

    def op_touch(self, name: str, worker: str, partition: int, lease: float) -> Op[None]:
        """Renew one partition's lease in the transaction that holds its row (which the
        heartbeat skips): a transactional batch that ran long commits with a fresh lease."""
        yield Run(self.touch, [_seconds(lease), name, partition, worker], fetch="none")

    def op_leave(self, name: str, worker: str) -> Op[None]:
        """The worker stops: its partitions are free for the others at once."""
        yield Run(self.leave, [name, worker, name, worker], fetch="none")

    def op_advance(
        self,
        name: str,
        worker: str,
        moves: list[tuple[int, int, int]],
        lease: float,
        *,
        durable: bool = True,
    ) -> Op[set[int]]:
        """Move checkpoints, each ``(partition, from, to)``, for partitions the worker still
        holds at ``from``; returns the partitions moved (the others were taken over or
        reset). Inside a caller's transaction, it is part of it. Not ``durable`` (for at
        least once, where a checkpoint lost in a crash only delivers a batch again), it is its
        own transaction, which does not wait for the WAL to reach the disk."""
        if not moves:
            return set()
        params = [
            _seconds(lease),
            [m[0] for m in moves],
            [m[1] for m in moves],
            [m[2] for m in moves],
            name,
            worker,
        ]
        if durable:
            rows = yield Run(self.advance, params)
            return {int(row[0]) for row in rows}
        yield Run(BEGIN, fetch="none")
        try:
            yield Run(LAZY_COMMIT, fetch="none")
            rows = yield Run(self.advance, params)
            yield Run(COMMIT, fetch="none")
        except BaseException:
            yield Rollback()
            raise
        return {int(row[0]) for row in rows}

    def op_park(
        self,
        name: str,
        worker: str,
        partition: int,
        checkpoint: int,
        position: int,
        attempts: int,
        error: str,
    ) -> Op[bool]:
        """Park the event at ``position`` and move the partition's checkpoint to it, in one
        statement; False (nothing done) when the worker no longer holds the partition at
        ``checkpoint``."""
        params = [position, name, partition, worker, checkpoint]
        params += [name, position, partition, attempts, error]
        row = yield Run(self.park, params, fetch="one")
        return row is not None

    def op_requested(
        self, name: str, partitions: list[int], limit: int
    ) -> Op[list[tuple[int, int]]]:
        rows = yield Run(self.requested, [name, partitions, limit])
        return [(int(position), int(partition)) for position, partition in rows]

    def op_replayed(self, name: str, position: int) -> Op[bool]:
        return (yield Run(self.replayed, [name, position], fetch="one")) is not None

    def op_replay_failed(self, name: str, position: int, attempts: int, error: str) -> Op[None]:
        yield Run(self.replay_failed, [attempts, error, name, position], fetch="none")

    # -- operations on consumers (`EventStore.consumers`, the CLI) --------------------------------

    def op_states(self, name: str | None) -> Op[list[ConsumerState]]:
        rows = yield Run(self.states, [name, name])
        found: dict[str, ConsumerState] = {}
        for (
            consumer,
            key,
            created,
            partition,
            position,
            owner,
            lease_until,
            updated,
            lag,
            seconds,
            workers,
            parked,
        ) in rows:
            state = found.get(consumer)
            if state is None:
                state = found[consumer] = ConsumerState(
                    name=consumer,
                    partition_key=key,
                    created_at=created,
                    partitions=[],
                    workers=list(workers or ()),
                    parked=int(parked),
                )
            state.partitions.append(
                PartitionState(
                    partition=int(partition),
                    position=int(position),
                    owner=owner,
                    lease_until=lease_until,
                    updated_at=updated,
                    lag_positions=int(lag),
                    lag_seconds=None if seconds is None else max(0.0, float(seconds)),
                )
            )
        return list(found.values())

    def op_reset(self, name: str, to: int, force: bool) -> Op[int]:
        """Set every partition's checkpoint to ``to``; refused while a worker holds a lease,
        unless ``force`` (the workers then lose their partitions at their next checkpoint).
        Returns how many partitions were reset."""
        return (yield from self._unleased(name, force, "reset", self.reset, [to, name]))

    def op_drop(self, name: str, force: bool) -> Op[int]:
        """Remove the consumer with its checkpoints, workers and parked events; refused while
        a worker holds a lease, unless ``force``. Returns how many partitions it had."""
        return (yield from self._unleased(name, force, "drop", self.drop, [name] * 4))

    def _unleased(
        self, name: str, force: bool, action: str, statement: sql.Composed, params: list[object]
    ) -> Op[int]:
        """Run ``statement`` on consumer ``name`` unless a worker holds one of its leases (or
        with ``force``), in one transaction; returns how many partitions it has."""
        yield Run(BEGIN, fetch="none")
        try:
            row = yield Run(self.definition, [name], fetch="one")
            if row is None:
                raise ConsumerConflict(f"no consumer is named {name!r}", {"name": name})
            if not force:
                # A worker's own statements hold a row for milliseconds; a transactional batch
                # holds it until it commits.
                yield Run(LOCK_PATIENCE, fetch="none")
            try:
                leased = yield Run(self.leased, [name], fetch="one")
            except psycopg.errors.LockNotAvailable:
                raise ConsumerConflict(
                    f"consumer {name!r} has a worker handling a batch: stop its workers first,"
                    f" or force the {action}",
                    {"name": name, "leased": "busy"},
                ) from None
            held = int(leased[0]) if leased else 0
            if held and not force:
                raise ConsumerConflict(
                    f"consumer {name!r} has workers holding {held} of its partitions: stop"
                    f" them first, or force the {action}",
                    {"name": name, "leased": held},
                )
            yield Run(statement, params, fetch="none")
            yield Run(COMMIT, fetch="none")
        except BaseException:
            yield Rollback()
            raise
        return int(row[0])

    def op_parked(self, name: str) -> Op[list[ParkedEvent]]:
        rows = yield Run(self.parked, [name])
        return [
            ParkedEvent(
                consumer=row[0],
                position=int(row[1]),
                partition=int(row[2]),
                attempts=int(row[3]),
                error=row[4],
                parked_at=row[5],
                replay_requested=bool(row[6]),
            )
            for row in rows
        ]

    def op_request_replay(self, name: str, positions: list[int] | None) -> Op[list[int]]:
        rows = yield Run(self.request_replay, [name, positions, positions])
        return sorted(int(row[0]) for row in rows)


def positive_seconds(value: object, field: str) -> float:
    """``value`` as seconds, from 0.05 to a day, or QUERY_ERROR naming ``field``."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or not 0.05 <= value <= 86_400
    ):
        raise QueryError(
            f"{field} is a number of seconds from 0.05 to 86400, not {value!r}"[:200],
            {"field": field},
        )
    return float(value)


@functools.lru_cache(maxsize=64)
def consumer_statements(schema: str) -> ConsumerStatements:
    """The `ConsumerStatements` of ``schema``, composed once per process."""
    return ConsumerStatements(schema)
