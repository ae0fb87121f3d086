-- The tamma-events schema, version 10: the baseline, the whole schema in one file.
--
-- A new store is created by this file alone and records version 10 ("baseline"). Changes
-- after it are small migrations on top (0011_*.sql, ...), applied to every store. Stores
-- created before the baseline were built by the migrations in legacy/; the migrator brings one
-- at version 1 to 9 up through the remaining legacy steps, which leave exactly the catalog
-- this file creates (tests/test_schema_catalog.py compares the two). So this file must keep
-- creating what the legacy steps leave: change the schema in a new migration, never here.
--
-- How it runs: by the migrator (`tamma_events.schema`), as the role that will own the store,
-- in one READ COMMITTED transaction under an advisory lock, with `search_path` set to the
-- store's schema alone. Every name below is therefore created in, and resolved against, that
-- schema.
--
-- The schema's name is known only when this runs, and two kinds of definition must carry it:
-- * Functions that run as the owner (SECURITY DEFINER) set their own search path to
--   `pg_catalog, <schema>, pg_temp`: pg_catalog first, so nothing in the schema can stand in
--   for a built-in, and pg_temp last, so no session's temporary table can stand in for the
--   log, the head or a summary (left out, pg_temp would be searched first). `SET search_path`
--   takes a literal, not an expression, so these functions are created by a DO block that
--   writes the name in with format('%I', current_schema()). condition_violated and
--   unfolded_events run as their caller, but inside append_group and inside the views every
--   reader uses, so they pin the same path.
-- * The notification channel and the owner's name are literals in append_channel() and in
--   the head trigger's WHEN clause: written in the same way, for the same reason.
-- Functions that run as their caller and only guard rows (the triggers' guards) take the
-- schema's path as it is when this runs (`SET search_path FROM CURRENT`), or need none.
--
-- Contents
--   1. The log: `events` and its indexes
--   2. The head and the chain's anchor
--   3. Immutability: the guards on the log, the head and the anchor
--   4. Appends: the head lock, the head trigger, conditions, the append function
--   5. Archives: the manifest, the index of archived events, `event_index`
--   6. Summaries: the folded tables, the tail, the `*_totals` views, the fold
--   7. Snapshots
--   8. Privileges


-- 1. The log -------------------------------------------------------------------------------------

-- One row per event. `position` is global and gapless, in commit order, assigned under the head
-- lock (section 4); it is the key. `event_id` (a UUIDv7 by default, so nearly append-ordered
-- too) stays unique, across archived events as well (advance_head and append_group check
-- those). `hash` is the event's link in the chain (section 2): sha256 of the previous link and
-- the event's encoded row with its position.
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

-- DCB items by type, and reads filtered by type: (event_type, position) serves
-- `event_type = ANY(..) AND position > after` and type filters in position order.
CREATE INDEX events_type_position ON events (event_type, position);

-- Every tag filter (`tags @> '{"issueId": "..."}'`), whatever the key; DCB conditions with tags
-- are checked through it. GIN defers new entries to a pending list that every search reads in
-- full until it is merged into the index (at 4 MB by default). A condition check is a tag
-- search, so with the default every conditional append read up to 4 MB: 9 ms each after 40k
-- events, against 1 ms with the list merged at 64 kB, the least it can be. Batches still merge
-- their entries in bulk, and loaded no slower.
CREATE INDEX events_tags ON events USING gin (tags jsonb_path_ops)
    WITH (gin_pending_list_limit = 64);

-- Time windows in time order, and keyset pages in time order.
CREATE INDEX events_timestamp_position ON events ("timestamp", position);

-- The planner estimates a tag filter from a histogram of sampled tag documents. With the
-- default 100 entries, a filter matching 5% of the log can sample as a few rows and be served
-- by fetching all of its matches from the GIN index (0.5 s at 1M events instead of 5 ms
-- walking the primary key); 1000 entries keep such estimates within a few percent.
ALTER TABLE events ALTER COLUMN tags SET STATISTICS 1000;


-- 2. The head and the chain's anchor -------------------------------------------------------------

-- The single row every append locks first: `position` is the last one written, `hash` the last
-- link of the chain. Holding its lock from the condition check to the commit makes commit order
-- equal position order, so a reader resuming after a position never skips an event. A low
-- fillfactor keeps its updates HOT.
CREATE TABLE head (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    position  bigint  NOT NULL,
    hash      bytea   NOT NULL
) WITH (fillfactor = 10);

-- The value the first event's hash chains from, sha256('tamma-events genesis v1'): the head
-- starts there, and `chain` keeps it for verify() once the head has moved on.
INSERT INTO head (singleton, position, hash)
VALUES (true, 0, decode('118f238eaa92f2119fdbbbd4f1c90f0e99713837fc10ddaec86e44545822edc0', 'hex'));

CREATE TABLE chain (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    genesis   bytea   NOT NULL
);
INSERT INTO chain (singleton, genesis)
VALUES (true, decode('118f238eaa92f2119fdbbbd4f1c90f0e99713837fc10ddaec86e44545822edc0', 'hex'));


-- 3. Immutability --------------------------------------------------------------------------------

-- Stored events are never updated or deleted, for every role that fires triggers, the owner
-- included (a superuser can turn triggers off; the hash chain shows what such a change did).
-- The one delete let through is compaction's: an event whose range is in the archive manifest
-- and whose index row is already in `archived_events` (section 5; the compaction's transaction
-- writes it first). The same guard keeps archived index rows and the anchor unchanged.
CREATE FUNCTION refuse_event_change() RETURNS trigger LANGUAGE plpgsql
SET search_path FROM CURRENT AS $$
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

CREATE TRIGGER events_immutable_rows
    BEFORE UPDATE OR DELETE ON events
    FOR EACH ROW EXECUTE FUNCTION refuse_event_change();

CREATE TRIGGER events_immutable_truncate
    BEFORE TRUNCATE ON events
    FOR EACH STATEMENT EXECUTE FUNCTION refuse_event_change();

CREATE TRIGGER chain_immutable_rows
    BEFORE UPDATE OR DELETE ON chain
    FOR EACH ROW EXECUTE FUNCTION refuse_event_change();

-- The head only moves forward, and is never removed. Its guard fires only when there is
-- something to refuse, so an append's update of the head pays nothing for it.
CREATE FUNCTION guard_head() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP <> 'UPDATE' OR NEW.position < OLD.position THEN
        RAISE EXCEPTION 'tamma-events: the head of %.events only moves forward', TG_TABLE_SCHEMA
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER head_forward_only
    BEFORE UPDATE ON head
    FOR EACH ROW
    WHEN (NEW.position < OLD.position)
    EXECUTE FUNCTION guard_head();

CREATE TRIGGER head_never_deleted
    BEFORE DELETE ON head
    FOR EACH ROW EXECUTE FUNCTION guard_head();

CREATE TRIGGER head_no_truncate
    BEFORE TRUNCATE ON head
    FOR EACH STATEMENT EXECUTE FUNCTION guard_head();


-- 4. Appends -------------------------------------------------------------------------------------
--
-- Under the head lock an append does only what it must: lock, check, write, move the head,
-- notify; the summaries are folded later, outside it (section 6). Two ways in:
-- * append_group(), one statement for small appends and groups of them (the store's group
--   commit), run in autocommit so the commit rides in the same round trip;
-- * an INSERT or COPY into `events` after lock_head() (batches, transaction()), whose rows the
--   statement trigger advance_head checks and follows with the head.
-- The application role holds no privilege on `head`: it locks it through lock_head() and moves
-- it only by writing events.

-- Subscribers LISTEN on one channel per store, the schema's name with ".appended" (a name too
-- long for PostgreSQL's 63-byte channels falls back to a digest of it); each append sends the
-- new head position on it. PostgreSQL delivers notifications at commit, in commit order, and
-- drops them on rollback. The channel is a literal, so listeners and senders agree on it
-- without looking the schema up.
DO $$
DECLARE
    channel text := CASE
        WHEN octet_length(current_schema()) <= 54 THEN current_schema() || '.appended'
        ELSE 'tamma_events.' || md5(current_schema())
    END;
BEGIN
    EXECUTE format(
        'CREATE FUNCTION append_channel() RETURNS text LANGUAGE sql IMMUTABLE RETURN %L',
        channel);
END
$$;

-- Takes the head row's lock and returns it, as the owner: callers need no privilege on `head`.
DO $$
BEGIN
    EXECUTE format(
        'CREATE FUNCTION lock_head(OUT "position" bigint, OUT hash bytea) LANGUAGE sql'
        ' SECURITY DEFINER SET search_path = pg_catalog, %I, pg_temp AS %L',
        current_schema(),
        'SELECT h.position, h.hash FROM head AS h FOR UPDATE');
END
$$;

-- The head follows every INSERT or COPY into `events`, in one statement trigger: it checks that
-- the rows written start right after the head and leave no gap (a row before it collides with a
-- stored one or falls in a compacted prefix; a row past head + 1 would leave a gap), refuses
-- the id of an archived event (a duplicate, as before it was archived; looked up only once
-- anything is archived), moves the head to the last row, hash included, and notifies
-- subscribers with the new head. It runs as the owner, who alone may update the head.
DO $$
BEGIN
    EXECUTE format(
        'CREATE FUNCTION advance_head() RETURNS trigger LANGUAGE plpgsql'
        ' SECURITY DEFINER SET search_path = pg_catalog, %I, pg_temp AS %L',
        current_schema(),
        $body$
DECLARE
    low bigint;
    high bigint;
    written bigint;
    head_at bigint;
BEGIN
    SELECT min(n.position), max(n.position), count(*) INTO low, high, written FROM new_events AS n;
    IF written = 0 THEN
        RETURN NULL;
    END IF;
    SELECT h.position INTO head_at FROM head AS h FOR UPDATE;
    IF low <> head_at + 1 OR high - low + 1 <> written THEN
        RAISE EXCEPTION 'tamma-events: events are appended at the head: positions % to % (% rows) after head %',
            low, high, written, head_at
            USING ERRCODE = 'integrity_constraint_violation',
                  HINT = 'Append through tamma-events, which takes the head lock first.';
    END IF;
    IF EXISTS (SELECT 1 FROM archived_events)
       AND EXISTS (SELECT 1 FROM new_events AS n JOIN archived_events AS a USING (event_id)) THEN
        RAISE EXCEPTION 'duplicate key value violates unique constraint "events_event_id_key"'
            USING ERRCODE = 'unique_violation', CONSTRAINT = 'events_event_id_key',
                  TABLE = 'events', SCHEMA = TG_TABLE_SCHEMA,
                  DETAIL = 'The event id belongs to an archived event.';
    END IF;
    UPDATE head SET position = high,
                    hash = (SELECT n.hash FROM new_events AS n WHERE n.position = high);
    PERFORM pg_notify(append_channel(), high::text);
    RETURN NULL;
END
$body$);
END
$$;

-- append_group() moves the head itself, once per call, running as the owner with the
-- transaction-local setting `tamma_events.appending` on for its own INSERT: only that INSERT
-- skips the trigger (the setting *and* the owner's name, written in here, must both match).
-- Any other INSERT or COPY, an application role's or the owner's own, goes through it.
DO $$
BEGIN
    EXECUTE format(
        'CREATE TRIGGER events_advance_head AFTER INSERT ON events'
        ' REFERENCING NEW TABLE AS new_events FOR EACH STATEMENT'
        ' WHEN (current_setting(''tamma_events.appending'', true) IS DISTINCT FROM ''on'''
        '       OR current_user <> %L)'
        ' EXECUTE FUNCTION advance_head()',
        current_user);
END
$$;

-- Whether an event after `after_position` matches any of a DCB condition's query items
-- ([{"types": "{..}", "tags": {..}}, ..], the types as a text[] literal; no item: any event
-- matches), over the live log and, when the condition reaches into it, the archive. Only the
-- checks are statements: the items are walked with expressions PL/pgSQL evaluates itself.
--
-- The checks are static statements, one per kind of item, planned for their values
-- (plan_cache_mode, for this function only): a generic plan for "no event of type T with tag K"
-- walks every event of T, and with `after` = 0 the plan drops the position test altogether
-- (a bitmap of every position otherwise). An item with tags is checked through its tags (GIN,
-- or the primary key for a recent `after`), its types tested on the rows found (`IS TRUE` keeps
-- the planner off the type index): the tags of a DCB condition name its consistency boundary,
-- the few events of one entity. The archive is read only when `after` lies before the end of
-- the compacted prefix, which is nearly never. Being STABLE, the function reads the live log,
-- the manifest and the archive in one snapshot, its caller's, taken after the head lock was
-- granted: an event a compaction moves is in exactly one of them.
DO $$
BEGIN
    EXECUTE format(
        'CREATE FUNCTION condition_violated(after_position bigint, items jsonb) RETURNS boolean'
        ' LANGUAGE plpgsql STABLE'
        ' SET search_path = pg_catalog, %I, pg_temp SET plan_cache_mode = force_custom_plan'
        ' AS %L',
        current_schema(),
        $body$
DECLARE
    item jsonb;
    item_types text[];
    item_tags jsonb;
    archived_end bigint;
    last_item integer := jsonb_array_length(items) - 1;
BEGIN
    IF last_item < 0 THEN
        IF EXISTS (SELECT 1 FROM events WHERE position > after_position) THEN
            RETURN true;
        END IF;
    END IF;
    FOR i IN 0 .. last_item LOOP
        item := items->i;
        item_types := (item->>'types')::text[];
        item_tags := item->'tags';
        IF cardinality(item_types) = 0 THEN
            IF EXISTS (SELECT 1 FROM events
                       WHERE (after_position = 0 OR position > after_position)
                         AND tags @> item_tags) THEN
                RETURN true;
            END IF;
        ELSIF cardinality(item_types) = 1 AND item_tags IS NULL THEN
            IF EXISTS (SELECT 1 FROM events
                       WHERE (after_position = 0 OR position > after_position)
                         AND event_type = item_types[1]) THEN
                RETURN true;
            END IF;
        ELSIF cardinality(item_types) = 1 THEN
            IF EXISTS (SELECT 1 FROM events
                       WHERE (after_position = 0 OR position > after_position)
                         AND (event_type = item_types[1]) IS TRUE AND tags @> item_tags) THEN
                RETURN true;
            END IF;
        ELSIF item_tags IS NULL THEN
            IF EXISTS (SELECT 1 FROM events
                       WHERE (after_position = 0 OR position > after_position)
                         AND event_type = ANY(item_types)) THEN
                RETURN true;
            END IF;
        ELSE
            IF EXISTS (SELECT 1 FROM events
                       WHERE (after_position = 0 OR position > after_position)
                         AND (event_type = ANY(item_types)) IS TRUE AND tags @> item_tags) THEN
                RETURN true;
            END IF;
        END IF;
    END LOOP;
    SELECT coalesce(max(a.last_position), 0) INTO archived_end
    FROM archives AS a WHERE a.compacted_at IS NOT NULL;
    IF after_position >= archived_end THEN
        RETURN false;
    END IF;
    IF last_item < 0 THEN
        RETURN EXISTS (SELECT 1 FROM archived_events WHERE position > after_position);
    END IF;
    FOR i IN 0 .. last_item LOOP
        item := items->i;
        item_types := (item->>'types')::text[];
        item_tags := item->'tags';
        IF cardinality(item_types) = 0 THEN
            IF EXISTS (SELECT 1 FROM archived_events
                       WHERE position > after_position AND tags @> item_tags) THEN
                RETURN true;
            END IF;
        ELSIF item_tags IS NULL THEN
            IF EXISTS (SELECT 1 FROM archived_events
                       WHERE position > after_position AND event_type = ANY(item_types)) THEN
                RETURN true;
            END IF;
        ELSIF EXISTS (SELECT 1 FROM archived_events
                      WHERE position > after_position
                        AND (event_type = ANY(item_types)) IS TRUE AND tags @> item_tags) THEN
            RETURN true;
        END IF;
    END LOOP;
    RETURN false;
END
$body$);
END
$$;

-- One round trip for small appends and groups: lock the head, check each request's condition,
-- write the accepted requests' events with the next positions and their hash chain, move the
-- head and notify. Called as a single statement in autocommit, so the commit rides in the same
-- round trip and the head lock is held only while the server runs it and commits. It runs as
-- the owner; its INSERT skips advance_head (above), and it moves the head once at its end.
--
-- p_doc: {"requests": [[count, condition], ..], "offsets": [..], "events": [..]}. A request's
-- condition is NULL or {"after": n, "items": [..]} (see condition_violated); "events" holds
-- every request's events in order, each as [event_id, event_type, timestamp (ISO 8601), tags,
-- metadata, data]. The chain is computed here with the built-in sha256() over the very bytes
-- the codec encoded (p_rows: the encoded rows back to back; "offsets": where each starts, then
-- where the last ends; each row's position is still zero), so it is the same chain the native
-- codec computes for batches written by COPY.
--
-- Returns the head position the lock found, then each request's first position, or NULL when
-- its condition failed (nothing of it is written). Each check runs after the lock is granted,
-- against the stored events and the events of the requests accepted before it in this call;
-- then every accepted row is inserted in one statement. This function's own statements keep
-- their plans (only the checks against stored events are planned for their values).
DO $$
BEGIN
    EXECUTE format(
        'CREATE FUNCTION append_group(p_doc jsonb, p_rows bytea) RETURNS bigint[]'
        ' LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, %I, pg_temp'
        ' AS %L',
        current_schema(),
        $body$
DECLARE
    head_position bigint;
    chain bytea;
    firsts bigint[];
    request jsonb;
    condition jsonb;
    offsets jsonb := p_doc->'offsets';
    first_event integer := 0;
    events integer;
    row_start integer;
    -- The rows accepted so far, inserted together at the end.
    pending_events integer[] := '{}';
    pending_positions bigint[] := '{}';
    pending_hashes bytea[] := '{}';
BEGIN
    SELECT h.position, h.hash INTO head_position, chain FROM head AS h FOR UPDATE;
    firsts := ARRAY[head_position];
    FOR request IN SELECT jsonb_array_elements(p_doc->'requests') LOOP
        events := (request->>0)::integer;
        condition := request->1;
        -- A condition is violated by a stored event, or by an event of an earlier request of
        -- this call: the rows are inserted together at the end, so those are matched here.
        IF jsonb_typeof(condition) = 'object'
           AND (condition_violated((condition->>'after')::bigint, condition->'items')
                OR EXISTS (
                    SELECT 1
                    FROM generate_subscripts(pending_events, 1) AS i,
                         LATERAL (SELECT p_doc->'events'->pending_events[i] AS e) AS event
                    WHERE pending_positions[i] > (condition->>'after')::bigint
                      AND (jsonb_array_length(condition->'items') = 0
                           OR EXISTS (
                               SELECT 1 FROM jsonb_array_elements(condition->'items') AS item
                               WHERE (item->>'types' = '{}'
                                      OR (e->>1) = ANY((item->>'types')::text[]))
                                 AND (item->'tags' IS NULL OR (e->3) @> (item->'tags')))))) THEN
            firsts := firsts || NULL::bigint;
        ELSE
            firsts := firsts || (head_position + 1);
            FOR k IN first_event .. first_event + events - 1 LOOP
                head_position := head_position + 1;
                row_start := (offsets->>k)::integer;
                -- The row without its hash field (4 + 32 bytes), its position written in.
                chain := sha256(chain || overlay(
                    substring(p_rows FROM row_start + 1
                              FOR (offsets->>(k + 1))::integer - row_start - 36)
                    PLACING int8send(head_position) FROM 7 FOR 8));
                pending_events := pending_events || k;
                pending_positions := pending_positions || head_position;
                pending_hashes := pending_hashes || chain;
            END LOOP;
        END IF;
        first_event := first_event + events;
    END LOOP;
    IF cardinality(pending_events) > 0 THEN
        -- An archived event's id stays taken (advance_head checks it for other INSERTs).
        IF EXISTS (SELECT 1 FROM archived_events)
           AND EXISTS (SELECT 1 FROM archived_events AS a
                       WHERE a.event_id IN (
                           SELECT (p_doc->'events'->i->>0)::uuid
                           FROM unnest(pending_events) AS i)) THEN
            RAISE EXCEPTION 'duplicate key value violates unique constraint "events_event_id_key"'
                USING ERRCODE = 'unique_violation', CONSTRAINT = 'events_event_id_key',
                      TABLE = 'events',
                      SCHEMA = (SELECT n.nspname FROM pg_class AS c
                                JOIN pg_namespace AS n ON n.oid = c.relnamespace
                                WHERE c.oid = 'events'::regclass),
                      DETAIL = 'The event id belongs to an archived event.';
        END IF;
        -- This function moves the head itself, below: its INSERT skips advance_head.
        PERFORM set_config('tamma_events.appending', 'on', true);
        INSERT INTO events (position, event_id, event_type, "timestamp", tags, metadata, data,
                            hash)
        SELECT pending_positions[i], (e->>0)::uuid, e->>1, (e->>2)::timestamptz, e->3, e->4,
               e->5, pending_hashes[i]
        FROM generate_subscripts(pending_events, 1) AS i,
             LATERAL (SELECT p_doc->'events'->pending_events[i] AS e) AS event;
        PERFORM set_config('tamma_events.appending', '', true);
        UPDATE head SET position = head_position, hash = chain;
        PERFORM pg_notify(append_channel(), head_position::text);
    END IF;
    RETURN firsts;
END
$body$);
END
$$;


-- 5. Archives ------------------------------------------------------------------------------------
--
-- Compaction moves the log's oldest events to verified Parquet archive files. `archives` is
-- the manifest: one row per file, a contiguous range of positions, with the file's SHA-256 and
-- the chain hashes at its two ends. A row is written only once its file has been synced and
-- verified; `compacted_at` is set in the transaction that deletes its events from `events`.
-- `archived_events` keeps, for every archived event, what the write side checks (its id, type,
-- tags and time), so DCB conditions and event-id uniqueness still cover the whole history; the
-- payloads live in the files only.

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


-- 6. Summaries -----------------------------------------------------------------------------------
--
-- Counts for queries that must not scan the log: by event type, by tag pair, and by time bucket
-- (minute, hour, day; UTC) and type. They stay off the append path: `summary_state.folded` is
-- the last position the summary tables count, the events after it are the tail, and the
-- `*_totals` views add the tail to the folded counts at read time, so every read is exact.
-- fold_summaries() folds the tail outside the head lock; stores call it in the background as
-- their appends grow the tail, and compaction calls it before it deletes.

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

-- first/last_position bound where a bucket's events lie in the log, which turns a time window
-- into a position range for reads ordered by position.
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

-- Every event up to `folded` is counted by the summary tables; later events are the tail.
CREATE TABLE summary_state (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    folded    bigint  NOT NULL CHECK (folded >= 0)
);
INSERT INTO summary_state (singleton, folded) VALUES (true, 0);

-- The folded part only moves forward, and only through fold_summaries() (or its owner).
CREATE FUNCTION guard_summary_state() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP <> 'UPDATE' OR NEW.folded < OLD.folded THEN
        RAISE EXCEPTION 'tamma-events: the summaries of %.events only fold forward',
            TG_TABLE_SCHEMA
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER summary_state_forward_only
    BEFORE UPDATE OR DELETE ON summary_state
    FOR EACH ROW EXECUTE FUNCTION guard_summary_state();
CREATE TRIGGER summary_state_no_truncate
    BEFORE TRUNCATE ON summary_state
    FOR EACH STATEMENT EXECUTE FUNCTION guard_summary_state();

-- The tail: the events after the folded position, read through the primary key. A function of
-- its own, planned for the folded position it reads (a plan made without it would expect a
-- third of the log and scan all of it); being STABLE, it reads in its caller's snapshot, the
-- same as the summary tables beside it.
DO $$
BEGIN
    EXECUTE format(
        'CREATE FUNCTION unfolded_events()'
        ' RETURNS TABLE ("position" bigint, event_type text, "timestamp" timestamptz, tags jsonb)'
        ' LANGUAGE plpgsql STABLE ROWS 256'
        ' SET search_path = pg_catalog, %I, pg_temp SET plan_cache_mode = force_custom_plan'
        ' AS %L',
        current_schema(),
        $body$
DECLARE
    low bigint;
BEGIN
    SELECT s.folded INTO low FROM summary_state AS s;
    RETURN QUERY SELECT e.position, e.event_type, e."timestamp", e.tags FROM events AS e
                 WHERE e.position > low;
END
$body$);
END
$$;

-- The summaries as of now: the folded counts plus the tail's, added up. A filter on the keys
-- (event_type; key and digest; grain, bucket and event_type) reaches both halves, so a lookup
-- reads one summary row and adds up the tail.
CREATE VIEW type_totals AS
    SELECT event_type, sum(count)::bigint AS count, min(first_timestamp) AS first_timestamp,
           max(last_timestamp) AS last_timestamp
    FROM (
        SELECT event_type, count, first_timestamp, last_timestamp FROM type_summary
        UNION ALL
        SELECT t.event_type, count(*), min(t."timestamp"), max(t."timestamp")
        FROM unfolded_events() AS t
        GROUP BY t.event_type
    ) AS parts
    GROUP BY event_type;

CREATE VIEW tag_totals AS
    SELECT key, digest, value, sum(count)::bigint AS count
    FROM (
        SELECT key, digest, value, count FROM tag_summary
        UNION ALL
        SELECT v.key, sha256(convert_to(v.value, 'UTF8')), v.value, count(*)
        FROM unfolded_events() AS t, jsonb_each_text(t.tags) AS v
        GROUP BY v.key, v.value
    ) AS parts
    GROUP BY key, digest, value;

CREATE VIEW time_totals AS
    SELECT grain, bucket, event_type, sum(count)::bigint AS count,
           min(first_timestamp) AS first_timestamp, max(last_timestamp) AS last_timestamp,
           min(first_position) AS first_position, max(last_position) AS last_position
    FROM (
        SELECT grain, bucket, event_type, count, first_timestamp, last_timestamp,
               first_position, last_position
        FROM time_summary
        UNION ALL
        SELECT g.grain, date_trunc(g.grain, e."timestamp", 'UTC'), e.event_type, count(*),
               min(e."timestamp"), max(e."timestamp"), min(e.position), max(e.position)
        FROM unfolded_events() AS e, (VALUES ('minute'), ('hour'), ('day')) AS g (grain)
        GROUP BY 1, 2, 3
    ) AS parts
    GROUP BY grain, bucket, event_type;

-- Folds the tail into the summary tables when it holds at least `min_tail` events; returns the
-- folded position afterwards. Without `wait`, a fold already running elsewhere is left to
-- finish the job (SKIP LOCKED). On a standby, or in a transaction that is read-only or not
-- READ COMMITTED (whose snapshot could predate the head it reads), it folds nothing. It runs as
-- the owner (an application role cannot write the summaries), and plans its statements for the
-- range it folds.
DO $$
BEGIN
    EXECUTE format(
        'CREATE FUNCTION fold_summaries(min_tail bigint DEFAULT 1, wait boolean DEFAULT false)'
        ' RETURNS bigint LANGUAGE plpgsql SECURITY DEFINER'
        ' SET search_path = pg_catalog, %I, pg_temp SET plan_cache_mode = force_custom_plan'
        ' AS %L',
        current_schema(),
        $body$
DECLARE
    low bigint;
    high bigint;
BEGIN
    SELECT s.folded INTO low FROM summary_state AS s;
    IF pg_is_in_recovery() OR current_setting('transaction_read_only')::boolean
       OR current_setting('transaction_isolation') <> 'read committed'
       OR (SELECT h.position FROM head AS h) - low < greatest(min_tail, 1) THEN
        RETURN low;
    END IF;
    IF wait THEN
        SELECT s.folded INTO low FROM summary_state AS s FOR UPDATE;
    ELSE
        SELECT s.folded INTO low FROM summary_state AS s FOR UPDATE SKIP LOCKED;
        IF NOT FOUND THEN
            RETURN (SELECT s.folded FROM summary_state AS s);
        END IF;
    END IF;
    -- A statement of its own after the lock: its snapshot holds every event up to this head
    -- (commits happen in position order, under the head lock).
    SELECT h.position INTO high FROM head AS h;
    IF high <= low THEN
        RETURN low;
    END IF;
    -- A background fold (without `wait`) does not wait for its commit to reach the disk: a
    -- crash can only lose the whole fold, summaries and folded position together, and the
    -- next fold does it again. A fold that waits commits with its caller's settings.
    IF NOT wait THEN
        PERFORM set_config('synchronous_commit', 'off', true);
    END IF;
    WITH tail AS (
        SELECT e.position, e.event_type, e."timestamp", e.tags FROM events AS e
        WHERE e.position > low AND e.position <= high
    ), by_type AS (
        INSERT INTO type_summary AS s (event_type, count, first_timestamp, last_timestamp)
        SELECT t.event_type, count(*), min(t."timestamp"), max(t."timestamp")
        FROM tail AS t GROUP BY t.event_type
        ON CONFLICT (event_type) DO UPDATE SET
            count = s.count + excluded.count,
            first_timestamp = least(s.first_timestamp, excluded.first_timestamp),
            last_timestamp = greatest(s.last_timestamp, excluded.last_timestamp)
        RETURNING 1
    ), by_tag AS (
        INSERT INTO tag_summary AS s (key, digest, value, count)
        SELECT v.key, sha256(convert_to(v.value, 'UTF8')), v.value, count(*)
        FROM tail AS t, jsonb_each_text(t.tags) AS v GROUP BY v.key, v.value
        ON CONFLICT (key, digest) DO UPDATE SET count = s.count + excluded.count
        RETURNING 1
    ), minutes AS (
        SELECT date_trunc('minute', t."timestamp", 'UTC') AS bucket, t.event_type,
               count(*) AS count, min(t."timestamp") AS first_timestamp,
               max(t."timestamp") AS last_timestamp, min(t.position) AS first_position,
               max(t.position) AS last_position
        FROM tail AS t GROUP BY 1, 2
    )
    INSERT INTO time_summary AS s (grain, bucket, event_type, count, first_timestamp,
                                   last_timestamp, first_position, last_position)
    SELECT 'minute', m.bucket, m.event_type, m.count, m.first_timestamp, m.last_timestamp,
           m.first_position, m.last_position
    FROM minutes AS m
    UNION ALL
    SELECT g.grain, date_trunc(g.grain, m.bucket, 'UTC'), m.event_type, sum(m.count),
           min(m.first_timestamp), max(m.last_timestamp), min(m.first_position),
           max(m.last_position)
    FROM minutes AS m, (VALUES ('hour'), ('day')) AS g (grain)
    GROUP BY 1, 2, 3
    ON CONFLICT (grain, bucket, event_type) DO UPDATE SET
        count = s.count + excluded.count,
        first_timestamp = least(s.first_timestamp, excluded.first_timestamp),
        last_timestamp = greatest(s.last_timestamp, excluded.last_timestamp),
        first_position = least(s.first_position, excluded.first_position),
        last_position = greatest(s.last_position, excluded.last_position);
    UPDATE summary_state SET folded = high;
    RETURN high;
END
$body$);
END
$$;


-- 7. Snapshots -----------------------------------------------------------------------------------

-- Saved states of aggregates. A snapshot takes the log's positions as versions: one at version
-- P holds a state folded from the events up to position P.
CREATE TABLE event_snapshots (
    id           uuid         PRIMARY KEY DEFAULT gen_random_uuid(),
    aggregate_id varchar(255) NOT NULL,
    version      bigint       NOT NULL,
    data         jsonb        NOT NULL,
    created_at   timestamptz  NOT NULL DEFAULT now(),
    UNIQUE (aggregate_id, version),
    CONSTRAINT event_snapshots_version_check CHECK (version >= 0)
);


-- 8. Privileges ----------------------------------------------------------------------------------
--
-- Nothing is granted here: the role that runs this owns everything it creates, and grants no
-- other role anything. `EventStore.grant_app_role` gives an application role what it needs and
-- nothing more (docs/security.md): USAGE on the schema, SELECT on every table and view, INSERT
-- on `events`, INSERT and UPDATE on `event_snapshots`. It never gets UPDATE or DELETE on the
-- log, the head, the anchor, the summaries or the manifest; the owner's work it needs is done by
-- the SECURITY DEFINER functions above, each of which does one thing: lock_head() locks and
-- returns the head, advance_head (a trigger, not callable) moves it with the events,
-- append_group() appends at the head, fold_summaries() folds the log into the summaries.
-- Functions keep PostgreSQL's default EXECUTE for PUBLIC, which reaches them only with USAGE on
-- the schema.
--
-- A migration that adds a table or view grants SELECT on it to every role that can read
-- `events`, as grant_app_role would have, so an application role set up earlier keeps reading
-- everything.
