-- Durable consumers (`EventStore.consumer`): a named consumer's partitions, each with its
-- checkpoint and its lease, the workers that share them, and the events it parked.
--
-- A consumer's events are split into `partitions` by a tag (`partition_key`; all in partition 0
-- without one). Each partition has a checkpoint, `position`: every matching event of the
-- partition up to it was handled (or parked). A worker holds a partition while its lease runs
-- (`owner`, `lease_until`, on the server's clock); a checkpoint moves only for the worker that
-- holds the partition, from the position it read (a compare-and-set), so a worker whose lease was
-- taken over cannot move it, and a transactional handler's writes roll back with it.
CREATE TABLE consumers (
    name          text        PRIMARY KEY,
    partitions    integer     NOT NULL,
    partition_key text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT consumers_name_check CHECK (length(name) BETWEEN 1 AND 200),
    CONSTRAINT consumers_partitions_check CHECK (partitions BETWEEN 1 AND 1024)
);

-- The tables below name their consumer without a foreign key: `drop_consumer` removes a
-- consumer's rows from all four in one statement, and a worker checks that its consumer still
-- exists each time it balances.
CREATE TABLE consumer_partitions (
    consumer    text        NOT NULL,
    partition   integer     NOT NULL,
    position    bigint      NOT NULL,
    owner       text,
    lease_until timestamptz,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, partition),
    CONSTRAINT consumer_partitions_position_check CHECK (position >= 0)
);

-- The workers of a consumer, seen alive until `seen_until`: each takes its share of the
-- partitions among those alive.
CREATE TABLE consumer_workers (
    consumer   text        NOT NULL,
    worker     text        NOT NULL,
    seen_until timestamptz NOT NULL,
    PRIMARY KEY (consumer, worker)
);

-- Events a handler kept failing on, set aside so that the consumer goes on; replayed on
-- request (`replay_requested`) by the worker that holds their partition, and removed once
-- handled.
CREATE TABLE parked_events (
    consumer         text        NOT NULL,
    position         bigint      NOT NULL,
    partition        integer     NOT NULL,
    attempts         integer     NOT NULL,
    error            text        NOT NULL,
    parked_at        timestamptz NOT NULL DEFAULT now(),
    replay_requested boolean     NOT NULL DEFAULT false,
    PRIMARY KEY (consumer, position)
);

-- Roles that can read the events can read these tables; roles that can append events (an
-- application role, `grant_app_role`) run consumers: they write these tables' rows. They still
-- cannot change events.
DO $$
DECLARE
    held record;
BEGIN
    FOR held IN
        SELECT DISTINCT a.grantee, a.privilege_type
        FROM pg_class c, aclexplode(c.relacl) AS a
        WHERE c.oid = 'events'::regclass AND a.privilege_type IN ('SELECT', 'INSERT')
          AND a.grantee <> c.relowner
    LOOP
        EXECUTE format('GRANT %s ON consumers, consumer_partitions, consumer_workers,'
                       ' parked_events TO %s',
                       CASE WHEN held.privilege_type = 'SELECT' THEN 'SELECT'
                            ELSE 'INSERT, UPDATE, DELETE' END,
                       CASE WHEN held.grantee = 0 THEN 'PUBLIC'
                            ELSE quote_ident(pg_get_userbyid(held.grantee)) END);
    END LOOP;
END
$$;
