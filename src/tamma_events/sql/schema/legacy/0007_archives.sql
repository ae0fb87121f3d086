-- Compaction: the log's oldest events move to verified Parquet archives.
-- Runs with search_path set to the store's schema.
--
-- `archives` is the manifest: one row per archive file, a contiguous range of positions, with
-- the file's SHA-256 and the chain hashes at its two ends. A row is written only once its file
-- has been synced and verified; `compacted_at` is set in the transaction that deletes its events
-- from `events`. `archived_events` keeps, for every archived event, what the write side checks
-- (its id, type, tags and time), so DCB conditions and event-id uniqueness still cover the whole
-- history; the payloads live in the files only.

CREATE TABLE archives (
    first_position bigint      PRIMARY KEY,
    last_position  bigint      NOT NULL UNIQUE,
    file_name      text        NOT NULL,
    directory      text        NOT NULL,
    events         bigint      NOT NULL,
    bytes          bigint      NOT NULL,
    sha256         bytea       NOT NULL,
    prev_hash      bytea       NOT NULL,
    last_hash      bytea       NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    compacted_at   timestamptz,
    CONSTRAINT archives_range CHECK (first_position > 0 AND last_position >= first_position),
    CONSTRAINT archives_events CHECK (events = last_position - first_position + 1)
);

CREATE TABLE archived_events (
    position    bigint      PRIMARY KEY,
    event_id    uuid        NOT NULL UNIQUE,
    event_type  text        NOT NULL,
    "timestamp" timestamptz NOT NULL,
    tags        jsonb       NOT NULL
);
CREATE INDEX archived_events_type_position ON archived_events (event_type, position);
CREATE INDEX archived_events_tags ON archived_events USING gin (tags jsonb_path_ops);
CREATE INDEX archived_events_timestamp_position ON archived_events ("timestamp", position);

-- Every event of the history, live or archived, as far as conditions and ids are concerned.
CREATE VIEW event_index AS
    SELECT position, event_id, event_type, "timestamp", tags FROM events
    UNION ALL
    SELECT position, event_id, event_type, "timestamp", tags FROM archived_events;

-- The one delete the log accepts: an event whose range is in the manifest and whose index row
-- is already in `archived_events` (the compaction's transaction writes it first). Updates and
-- every other delete are still refused.
CREATE OR REPLACE FUNCTION refuse_event_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' AND TG_TABLE_NAME = 'events'
       AND EXISTS (SELECT 1 FROM archives a
                   WHERE OLD.position BETWEEN a.first_position AND a.last_position)
       AND EXISTS (SELECT 1 FROM archived_events x
                   WHERE x.position = OLD.position AND x.event_id = OLD.event_id) THEN
        RETURN OLD;
    END IF;
    RAISE EXCEPTION 'tamma-events: % on %.% is refused: stored events are immutable',
        TG_OP, TG_TABLE_SCHEMA, TG_TABLE_NAME
        USING ERRCODE = 'insufficient_privilege',
              HINT = 'Events leave the log only through the verified archiving path.';
END
$$;
ALTER FUNCTION refuse_event_change() SET search_path FROM CURRENT;

-- An archived event is indexed only by the compaction of a recorded range that holds it.
CREATE FUNCTION guard_archived_events() RETURNS trigger LANGUAGE plpgsql
SET search_path FROM CURRENT AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM new_rows n
               WHERE NOT EXISTS (SELECT 1 FROM archives a
                                 WHERE a.compacted_at IS NULL
                                   AND n.position BETWEEN a.first_position AND a.last_position))
    THEN
        RAISE EXCEPTION 'tamma-events: % indexes only events of a recorded archive',
            TG_TABLE_NAME
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER archived_events_recorded
    AFTER INSERT ON archived_events
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION guard_archived_events();

-- Archived rows are as immutable as live ones.
CREATE TRIGGER archived_events_immutable_rows
    BEFORE UPDATE OR DELETE ON archived_events
    FOR EACH ROW EXECUTE FUNCTION refuse_event_change();
CREATE TRIGGER archived_events_immutable_truncate
    BEFORE TRUNCATE ON archived_events
    FOR EACH STATEMENT EXECUTE FUNCTION refuse_event_change();

-- The manifest grows by contiguous ranges, each recorded before it is compacted. A row never
-- changes its range or file and is never removed; only `compacted_at` is set, once, and only
-- when none of its events is left in the log.
CREATE FUNCTION guard_archive() RETURNS trigger LANGUAGE plpgsql
SET search_path FROM CURRENT AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        IF NEW.compacted_at IS NULL AND NEW.first_position
           = coalesce((SELECT max(last_position) FROM archives), 0) + 1 THEN
            RETURN NEW;
        END IF;
    ELSIF TG_OP = 'UPDATE' AND OLD.compacted_at IS NULL AND NEW.compacted_at IS NOT NULL
       AND (NEW.first_position, NEW.last_position, NEW.file_name, NEW.directory, NEW.events,
            NEW.bytes, NEW.sha256, NEW.prev_hash, NEW.last_hash, NEW.created_at)
           IS NOT DISTINCT FROM
           (OLD.first_position, OLD.last_position, OLD.file_name, OLD.directory, OLD.events,
            OLD.bytes, OLD.sha256, OLD.prev_hash, OLD.last_hash, OLD.created_at)
       AND NOT EXISTS (SELECT 1 FROM events
                       WHERE position BETWEEN OLD.first_position AND OLD.last_position) THEN
        RETURN NEW;
    END IF;
    RAISE EXCEPTION 'tamma-events: the archive manifest of % only records compactions',
        TG_TABLE_SCHEMA
        USING ERRCODE = 'insufficient_privilege';
END
$$;
CREATE TRIGGER archives_guard_rows
    BEFORE INSERT OR UPDATE OR DELETE ON archives
    FOR EACH ROW EXECUTE FUNCTION guard_archive();
CREATE TRIGGER archives_guard_truncate
    BEFORE TRUNCATE ON archives
    FOR EACH STATEMENT EXECUTE FUNCTION guard_archive();

-- An archived event's id stays taken: appending it again is a duplicate, as before.
CREATE FUNCTION refuse_archived_ids() RETURNS trigger LANGUAGE plpgsql
SET search_path FROM CURRENT AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM new_events n JOIN archived_events a USING (event_id)) THEN
        RAISE EXCEPTION 'duplicate key value violates unique constraint "events_event_id_key"'
            USING ERRCODE = 'unique_violation', CONSTRAINT = 'events_event_id_key',
                  TABLE = 'events', SCHEMA = current_schema(),
                  DETAIL = 'The event id belongs to an archived event.';
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER events_archived_ids
    AFTER INSERT ON events
    REFERENCING NEW TABLE AS new_events
    FOR EACH STATEMENT EXECUTE FUNCTION refuse_archived_ids();

-- The append function checks conditions against the whole history. Its text is the one
-- migration 0003 created, with each condition's `FROM events` reading `event_index` instead.
DO $$
DECLARE
    definition text := pg_get_functiondef('append_group'::regproc);
BEGIN
    IF position('SELECT 1 FROM events' IN definition) = 0 THEN
        RAISE EXCEPTION 'tamma-events: append_group is not the function migration 0003 made';
    END IF;
    EXECUTE replace(definition, 'SELECT 1 FROM events', 'SELECT 1 FROM event_index');
END
$$;

-- Roles that could read the events before this migration can read the manifest and the index.
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
        EXECUTE format('GRANT SELECT ON archives, archived_events, event_index TO %s',
                       CASE WHEN grantee = 0 THEN 'PUBLIC' ELSE quote_ident(pg_get_userbyid(grantee)) END);
    END LOOP;
END
$$;
