-- The event log, its head, and the seed's snapshots table.
-- Runs with search_path set to the store's schema.

-- One row per event. `position` is global and gapless, in commit order, assigned under the head
-- lock. The seed's random UUID primary key is gone: `position` (append-ordered) is the key and
-- `event_id` (a UUIDv7 by default, so also nearly append-ordered) stays unique.
CREATE TABLE events (
    position    bigint      NOT NULL,
    event_id    uuid        NOT NULL,
    event_type  text        NOT NULL,
    "timestamp" timestamptz NOT NULL,
    tags        jsonb       NOT NULL DEFAULT '{}',
    metadata    jsonb       NOT NULL DEFAULT '{}',
    data        jsonb       NOT NULL DEFAULT '{}',
    recorded_at timestamptz NOT NULL DEFAULT now(),
    hash        bytea       NOT NULL,
    CONSTRAINT events_pkey PRIMARY KEY (position),
    CONSTRAINT events_event_id_key UNIQUE (event_id),
    CONSTRAINT events_event_type_length CHECK (char_length(event_type) BETWEEN 1 AND 255),
    CONSTRAINT events_position_positive CHECK (position > 0)
);

-- DCB items by type, and type + time ranges: (event_type, position) serves `type = ANY(..) AND
-- position > after` and, ordered by position, the type filters of reads.
CREATE INDEX events_type_position ON events (event_type, position);

-- One index for every tag filter (`tags @> '{"issueId": "..."}'`), whatever the key.
CREATE INDEX events_tags ON events USING gin (tags jsonb_path_ops);

-- Time ranges: events arrive in roughly timestamp order, so a BRIN index is tiny and nearly free
-- to maintain.
CREATE INDEX events_timestamp ON events USING brin ("timestamp") WITH (pages_per_range = 32);

-- The single head row every append locks first: its position is the last one written, its hash
-- the last link of the chain. Holding it from the condition check to the commit makes commit
-- order equal position order. A low fillfactor keeps its updates HOT.
CREATE TABLE head (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    position  bigint  NOT NULL,
    hash      bytea   NOT NULL
) WITH (fillfactor = 10);

-- The chain starts from sha256('tamma-events genesis v1').
INSERT INTO head (singleton, position, hash)
VALUES (true, 0, decode('118f238eaa92f2119fdbbbd4f1c90f0e99713837fc10ddaec86e44545822edc0', 'hex'));

CREATE TABLE event_snapshots (
    id           uuid         PRIMARY KEY DEFAULT gen_random_uuid(),
    aggregate_id varchar(255) NOT NULL,
    version      integer      NOT NULL,
    data         jsonb        NOT NULL,
    created_at   timestamptz  NOT NULL DEFAULT now(),
    UNIQUE (aggregate_id, version)
);
