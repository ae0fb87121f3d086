-- Summaries for queries that must not scan the log, kept in the append transaction.
-- Runs with search_path set to the store's schema.
--
-- Every append statement (COPY or the append function's INSERT) fires one statement-level
-- trigger that folds its new rows into three tables: counts by event type, by tag pair, and by
-- time bucket (minute, hour, day) and type. Appends are serialised by the head lock, so the
-- upserts never contend, and the summaries commit or roll back with the events they count.
-- The trigger runs as the role that ran this migration: an application role can read the
-- summaries but not write them.

CREATE TABLE type_summary (
    event_type      text        PRIMARY KEY,
    count           bigint      NOT NULL,
    first_timestamp timestamptz NOT NULL,
    last_timestamp  timestamptz NOT NULL
);

-- Keyed by the SHA-256 of the value, not the value: a tag value may be far longer than a btree
-- index entry can be.
CREATE TABLE tag_summary (
    key    text   NOT NULL,
    digest bytea  NOT NULL,
    value  text   NOT NULL,
    count  bigint NOT NULL,
    PRIMARY KEY (key, digest)
) WITH (fillfactor = 50);

-- Buckets are UTC. first/last_position bound where a bucket's events lie in the log, which turns
-- a time window into a position range for reads ordered by position.
CREATE TABLE time_summary (
    grain           text        NOT NULL CHECK (grain IN ('minute', 'hour', 'day')),
    bucket          timestamptz NOT NULL,
    event_type      text        NOT NULL,
    count           bigint      NOT NULL,
    first_timestamp timestamptz NOT NULL,
    last_timestamp  timestamptz NOT NULL,
    first_position  bigint      NOT NULL,
    last_position   bigint      NOT NULL,
    PRIMARY KEY (grain, bucket, event_type)
) WITH (fillfactor = 50);

-- The one statement that folds the rows of `source` (the trigger's transition table, or the
-- whole log when this migration backfills a store that has events) into the summaries.
CREATE FUNCTION summary_statement(source text) RETURNS text
LANGUAGE sql IMMUTABLE
RETURN format($sql$
    WITH by_type AS (
        INSERT INTO type_summary AS s (event_type, count, first_timestamp, last_timestamp)
        SELECT event_type, count(*), min("timestamp"), max("timestamp")
        FROM %1$I GROUP BY event_type
        ON CONFLICT (event_type) DO UPDATE SET
            count = s.count + excluded.count,
            first_timestamp = least(s.first_timestamp, excluded.first_timestamp),
            last_timestamp = greatest(s.last_timestamp, excluded.last_timestamp)
        RETURNING 1
    ), by_tag AS (
        INSERT INTO tag_summary AS s (key, digest, value, count)
        SELECT t.key, sha256(convert_to(t.value, 'UTF8')), t.value, count(*)
        FROM %1$I e, jsonb_each_text(e.tags) t GROUP BY t.key, t.value
        ON CONFLICT (key, digest) DO UPDATE SET count = s.count + excluded.count
        RETURNING 1
    ), minutes AS (
        SELECT date_trunc('minute', "timestamp", 'UTC') AS bucket, event_type,
               count(*) AS count, min("timestamp") AS first_timestamp,
               max("timestamp") AS last_timestamp, min(position) AS first_position,
               max(position) AS last_position
        FROM %1$I GROUP BY 1, 2
    )
    INSERT INTO time_summary AS s (grain, bucket, event_type, count, first_timestamp,
                                   last_timestamp, first_position, last_position)
    SELECT 'minute', * FROM minutes
    UNION ALL
    SELECT g.grain, date_trunc(g.grain, m.bucket, 'UTC'), m.event_type, sum(m.count),
           min(m.first_timestamp), max(m.last_timestamp), min(m.first_position),
           max(m.last_position)
    FROM minutes m, (VALUES ('hour'), ('day')) AS g (grain)
    GROUP BY 1, 2, 3
    ON CONFLICT (grain, bucket, event_type) DO UPDATE SET
        count = s.count + excluded.count,
        first_timestamp = least(s.first_timestamp, excluded.first_timestamp),
        last_timestamp = greatest(s.last_timestamp, excluded.last_timestamp),
        first_position = least(s.first_position, excluded.first_position),
        last_position = greatest(s.last_position, excluded.last_position)
$sql$, source);

-- The trigger function holds the statement as static SQL, so PL/pgSQL plans it once per session
-- instead of on every append (dynamic EXECUTE cost a single append a third of its time). It runs
-- as the role that ran this migration, with pg_catalog first (nothing in the schema can stand in
-- for a built-in), then the schema, and pg_temp last (no session's temporary table can stand in
-- for a summary).
DO $$
BEGIN
    EXECUTE format(
        'CREATE FUNCTION summarize_events() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER'
        ' SET search_path = pg_catalog, %I, pg_temp AS %L',
        current_schema(),
        'BEGIN ' || summary_statement('new_events') || '; RETURN NULL; END');
END
$$;

CREATE TRIGGER events_summarize
    AFTER INSERT ON events
    REFERENCING NEW TABLE AS new_events
    FOR EACH STATEMENT EXECUTE FUNCTION summarize_events();

-- Roles that could read the events before this migration (an application role set up by
-- `grant_app_role`, say) can read the summaries the queries now use.
DO $$
DECLARE
    grantee oid;
BEGIN
    FOR grantee IN
        SELECT DISTINCT a.grantee
        FROM pg_class c, aclexplode(c.relacl) AS a
        WHERE c.oid = 'events'::regclass AND a.privilege_type = 'SELECT'
          AND a.grantee <> c.relowner
    LOOP
        EXECUTE format('GRANT SELECT ON type_summary, tag_summary, time_summary TO %s',
                       CASE WHEN grantee = 0 THEN 'PUBLIC' ELSE quote_ident(pg_get_userbyid(grantee)) END);
    END LOOP;
END
$$;

-- A store that already holds events gets its summaries now.
DO $$ BEGIN EXECUTE summary_statement('events'); END $$;

-- Time windows ordered by time, and keyset pages in time order.
DROP INDEX events_timestamp;
CREATE INDEX events_timestamp_position ON events ("timestamp", position);

-- The planner estimates a tag filter (`tags @> ...`) from a histogram of sampled tag documents.
-- With the default 100 entries, a filter matching 5% of the log can sample as a few rows and be
-- served by fetching all of its matches from the GIN index (0.5 s at 1M events instead of 5 ms
-- walking the primary key); 1000 entries keep such estimates within a few percent.
ALTER TABLE events ALTER COLUMN tags SET STATISTICS 1000;
